# The CUDA libraries a torch wheel ships (site-packages/nvidia/*/lib) must win
# over a system CUDA toolkit's copies when a program links libtorch_cuda.so:
# the linker resolves libtorch_cuda.so's own NEEDED libraries (libnccl.so.2,
# ...) through -rpath-link and the default paths, and a system CUDA's older
# NCCL lacks symbols the wheel's torch uses (measured with torch 2.15 against
# CUDA 13.0's /usr/local/cuda-13.0/lib). At run time libtorch_cuda.so finds the
# wheel's copies through its own RUNPATH. Empty for a CPU-only torch.
function(attnzoo_torch_wheel_link_options out_var)
  set(options)
  if(TORCH_INSTALL_PREFIX)
    file(GLOB _dirs LIST_DIRECTORIES true "${TORCH_INSTALL_PREFIX}/../nvidia/*/lib")
    foreach(dir IN LISTS _dirs)
      if(IS_DIRECTORY "${dir}")
        get_filename_component(dir "${dir}" REALPATH)
        list(APPEND options "LINKER:-rpath-link,${dir}")
      endif()
    endforeach()
  endif()
  set(${out_var} "${options}" PARENT_SCOPE)
endfunction()
