# Finding torch, with or without a CUDA toolkit (used by CMakeLists.txt and
# by the installed AttnZooConfig.cmake).
#
# PyPI's Linux torch is a CUDA build, and its TorchConfig.cmake (through
# Caffe2Config.cmake) stops with a fatal error when it finds no CUDA toolkit,
# whatever the caller wants. So on a machine without nvcc attnzoo does not call
# find_package(Torch) for a CUDA wheel: it makes the `torch` target itself
# from the wheel's headers and libraries. That is all a CPU build needs:
# include paths, the three core libraries, C++17 or newer, and the C++ ABI
# flag. With a toolkit (or a CPU-only torch), find_package(Torch) runs as usual.
#
# attnzoo_find_torch(<torch_dir>) sets, in the caller's scope:
#   ATTNZOO_CUDA_TOOLKIT   the nvcc found (empty when none)
#   TORCH_HAS_CUDA         whether this torch is a CUDA build
#   TORCH_LIBRARIES, TORCH_INSTALL_PREFIX, Torch_VERSION, Torch_DIR
# A toolkit is an nvcc given as CMAKE_CUDA_COMPILER or CUDACXX, or found in
# $CUDA_HOME/bin, $CUDA_PATH/bin or on PATH; nowhere else, so that a CPU
# build is what a user without nvcc on PATH gets.
macro(attnzoo_find_torch torch_dir)
  set(Torch_DIR "${torch_dir}")
  get_filename_component(_attnzoo_torch_prefix "${torch_dir}/../../.." ABSOLUTE)
  set(TORCH_HAS_CUDA OFF)
  if(EXISTS "${_attnzoo_torch_prefix}/lib/libtorch_cuda.so")
    set(TORCH_HAS_CUDA ON)
  endif()

  set(ATTNZOO_CUDA_TOOLKIT "")
  if(TORCH_HAS_CUDA)
    if(CMAKE_CUDA_COMPILER)
      set(ATTNZOO_CUDA_TOOLKIT "${CMAKE_CUDA_COMPILER}")
    elseif(DEFINED ENV{CUDACXX} AND NOT "$ENV{CUDACXX}" STREQUAL "")
      set(ATTNZOO_CUDA_TOOLKIT "$ENV{CUDACXX}")
    else()
      find_program(_attnzoo_nvcc nvcc HINTS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin"
                   NO_CMAKE_PATH NO_CMAKE_ENVIRONMENT_PATH NO_CMAKE_SYSTEM_PATH NO_CMAKE_INSTALL_PREFIX
                   NO_PACKAGE_ROOT_PATH NO_CACHE)
      if(_attnzoo_nvcc)
        set(ATTNZOO_CUDA_TOOLKIT "${_attnzoo_nvcc}")
      endif()
      unset(_attnzoo_nvcc)
    endif()
  endif()

  if(NOT TORCH_HAS_CUDA OR ATTNZOO_CUDA_TOOLKIT)
    if(ATTNZOO_CUDA_TOOLKIT)
      # Caffe2's CUDA lookup should see the same toolkit as ours.
      get_filename_component(_attnzoo_cuda_root "${ATTNZOO_CUDA_TOOLKIT}" DIRECTORY)
      get_filename_component(_attnzoo_cuda_root "${_attnzoo_cuda_root}/.." ABSOLUTE)
      set(CUDA_TOOLKIT_ROOT_DIR "${_attnzoo_cuda_root}")
      set(CUDAToolkit_ROOT "${_attnzoo_cuda_root}")
      # Caffe2 enables the CUDA language itself, and CMake's own search would
      # take the first nvcc on PATH: a different one (a wrapper in
      # /usr/local/bin, say) makes CMake throw the cache away after the first
      # configure, -DPython3_EXECUTABLE with it. Name ours in the cache first.
      if(NOT CMAKE_CUDA_COMPILER)
        set(CMAKE_CUDA_COMPILER "${ATTNZOO_CUDA_TOOLKIT}" CACHE FILEPATH "The CUDA compiler (nvcc)")
      endif()
    endif()
    find_package(Torch REQUIRED)
  elseif(NOT TARGET torch)
    # The CUDA wheel without a toolkit: our own imported target.
    set(TORCH_INSTALL_PREFIX "${_attnzoo_torch_prefix}")
    add_library(torch INTERFACE IMPORTED)
    target_include_directories(torch INTERFACE "${TORCH_INSTALL_PREFIX}/include"
                                               "${TORCH_INSTALL_PREFIX}/include/torch/csrc/api/include")
    # libtorch_cpu holds static op registrations that a program may reach only
    # through the dispatcher: keep it linked, as TorchConfig does.
    target_link_libraries(torch INTERFACE "${TORCH_INSTALL_PREFIX}/lib/libtorch.so"
                          "-Wl,--no-as-needed,${TORCH_INSTALL_PREFIX}/lib/libtorch_cpu.so -Wl,--as-needed"
                          "${TORCH_INSTALL_PREFIX}/lib/libc10.so")
    # PyPI wheels since torch 2.7 use the C++11 ABI; torch >= 2.11 needs C++20
    # (the caller sets the standard; this is the floor).
    target_compile_definitions(torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
    target_compile_features(torch INTERFACE cxx_std_17)
    set(TORCH_LIBRARIES torch)
    set(Torch_FOUND TRUE)
    file(STRINGS "${TORCH_INSTALL_PREFIX}/include/torch/csrc/api/include/torch/version.h" _attnzoo_version_lines
         REGEX "define TORCH_VERSION_(MAJOR|MINOR|PATCH) ")
    set(Torch_VERSION "")
    foreach(_line IN LISTS _attnzoo_version_lines)
      string(REGEX REPLACE ".* ([0-9]+)$" "\\1" _part "${_line}")
      string(APPEND Torch_VERSION "${_part}.")
    endforeach()
    string(REGEX REPLACE "\\.$" "" Torch_VERSION "${Torch_VERSION}")
    unset(_attnzoo_version_lines)
  endif()
  if(NOT TORCH_INSTALL_PREFIX)
    set(TORCH_INSTALL_PREFIX "${_attnzoo_torch_prefix}")
  endif()
endmacro()
