"""The shared library must run on any x86-64 CPU: AVX2 / AVX-512 instructions
may appear only inside the per-ISA engine builds (namespaces ...::AVX2 and
...::AVX512), never in code a baseline caller can reach. The linker merges
inline code the builds share and keeps the first copy; this checks that the
first copy is the baseline one (see CMakeLists.txt). Also: the engine's
policy check rejects a misspelt hook at compile time."""
import os
import platform
import re
import shutil
import subprocess

import pytest

import attnzoo

LIB = os.path.join(os.path.dirname(attnzoo.__file__), "lib", "libattnzoo.so")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_wide_vector_instructions_only_in_isa_builds():
    assert os.path.exists(LIB), LIB
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", LIB], capture_output=True, text=True,
                         check=True).stdout
    label = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    wide = re.compile(r"%[yz]mm\d+")
    current, offenders, isa_functions = None, set(), 0
    for line in dis.splitlines():
        m = label.match(line)
        if m:
            current = m.group(1)
            continue
        if current and wide.search(line):
            if "::AVX2::" in current or "::AVX512::" in current:
                isa_functions += 1
            else:
                offenders.add(current)
    assert isa_functions > 0, "no wide-vector code found at all: is the AVX2/AVX-512 engine built?"
    assert not offenders, f"AVX2/AVX-512 code outside the ISA builds: {sorted(offenders)[:10]}"


POLICY_PROGRAM = """
#include "attnzoo/ops/cpu/engine/policy.h"
using namespace attnzoo::cpu;
struct Base : PolicyHooks<float> {
  static constexpr uint32_t kOverrides = hooks(Hook::block_q, Hook::block_k, Hook::max_key_tile,
      Hook::max_query_tile, Hook::for_each_key_tile, Hook::for_each_query_tile, Hook::modify_scores,
      Hook::wants_score_grad, Hook::accumulate_score_grad);
  int64_t block_q() const { return 1; }
  int64_t block_k() const { return 1; }
  int64_t max_key_tile() const { return 1; }
  int64_t max_query_tile() const { return 1; }
  template <class Fn> void for_each_key_tile(int64_t, int64_t, int64_t, int64_t, Fn&&) const {}
  template <class Fn> void for_each_query_tile(int64_t, int64_t, int64_t, int64_t, Fn&&) const {}
  void modify_scores(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int64_t) const {}
  bool wants_score_grad() const { return false; }
  void accumulate_score_grad(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                             const float*, float*) {}
};
struct Derived : Base {
  static constexpr uint32_t kOverrides = hooks(Hook::on_rescale);
  void HOOK_NAME(int64_t, float) {}
};
static_assert(check_policy_hooks<Base>());
static_assert(check_policy_hooks<Derived>());
int main() {}
"""


@pytest.mark.parametrize("hook_name,compiles", [("on_rescale", True), ("on_rescal", False)])
def test_a_misspelt_policy_hook_does_not_compile(tmp_path, hook_name, compiles):
    """engine/policy.h: a policy that lists a hook in kOverrides must define
    it under that name; a misspelt one is a compile error naming the hook,
    not a silent fall-back to the base policy's hook."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    source = tmp_path / "policy.cpp"
    source.write_text(POLICY_PROGRAM)
    r = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-DCPU_CAPABILITY=DEFAULT",
                        f"-DHOOK_NAME={hook_name}", f"-I{os.path.join(ROOT, 'csrc')}", str(source)],
                       capture_output=True, text=True)
    if compiles:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode != 0 and "policy hook on_rescale" in r.stderr, r.stderr


CONSUMER_CMAKE = """cmake_minimum_required(VERSION 3.18)
project(no_toolkit_consumer CXX)
set(CMAKE_CXX_STANDARD 20)
include("{root}/cmake/AttnZooTorch.cmake")
attnzoo_find_torch("{torch_dir}")
message(STATUS "toolkit=[${{ATTNZOO_CUDA_TOOLKIT}}] torch_has_cuda=${{TORCH_HAS_CUDA}} torch=${{Torch_VERSION}}")
add_executable(consumer main.cpp)
target_link_libraries(consumer torch)
set_target_properties(consumer PROPERTIES BUILD_RPATH "${{TORCH_INSTALL_PREFIX}}/lib")
"""

CONSUMER_MAIN = """#include <ATen/ATen.h>
#include <iostream>
int main() { std::cout << "sum=" << at::ones({2, 3}).sum().item<float>() << std::endl; }
"""


def without_cuda_toolkit_env():
    """The environment of a machine whose user has no CUDA toolkit: no
    directory holding nvcc on PATH, no CUDA_HOME / CUDA_PATH / CUDACXX."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "CUDACXX")}
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep)
                                  if d and not os.path.exists(os.path.join(d, "nvcc")))
    return env


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_a_cuda_torch_configures_and_builds_without_a_cuda_toolkit(tmp_path):
    """PyPI's CUDA torch on a machine without nvcc: TorchConfig.cmake would
    stop with a fatal error; attnzoo's own torch target (cmake/AttnZooTorch.cmake)
    configures and builds a program that runs, and attnzoo's configure says
    its CUDA kernels are off for that reason."""
    import torch
    if torch.version.cuda is None:
        pytest.skip("this torch is a CPU build: nothing to hide from")
    env = without_cuda_toolkit_env()
    assert shutil.which("nvcc", path=env["PATH"]) is None
    torch_dir = os.path.join(torch.utils.cmake_prefix_path, "Torch")
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(CONSUMER_CMAKE.format(root=ROOT, torch_dir=torch_dir))
    (src / "main.cpp").write_text(CONSUMER_MAIN)
    cfg = subprocess.run(["cmake", "-S", str(src), "-B", str(tmp_path / "b"), "-G", "Ninja"],
                         capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "toolkit=[] torch_has_cuda=ON" in cfg.stdout, cfg.stdout
    build = subprocess.run(["cmake", "--build", str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(tmp_path / "b" / "consumer")], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "sum=6" in run.stdout, run.stdout + run.stderr

    # attnzoo itself: configures (a CPU build) and says why its CUDA kernels are off.
    import sys
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "attnzoo"), "-G", "Ninja",
                          f"-DPython3_EXECUTABLE={sys.executable}"], capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "CUDA kernels: off (no CUDA toolkit)" in cfg.stdout, cfg.stdout
