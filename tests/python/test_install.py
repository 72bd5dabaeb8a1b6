"""The installed CMake package: `cmake --install`, then an outside project
finds it with find_package(AttnZoo), links with -Wl,--as-needed and runs the
op from C++ (DESIGN.md section 7: dropped static registrations)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, "build")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.mark.skipif(not os.path.exists(os.path.join(BUILD, "build.ninja")),
                    reason="needs the CMake build tree (tools/build.sh makes it)")
def test_find_package_consumer(tmp_path):
    prefix = tmp_path / "prefix"
    run(["cmake", "--install", BUILD, "--prefix", str(prefix)])
    assert (prefix / "include" / "attnzoo" / "attnzoo.h").exists()
    assert (prefix / "lib" / "cmake" / "AttnZoo" / "AttnZooConfig.cmake").exists()
    consumer = tmp_path / "consumer"
    launcher = ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"] if shutil.which("ccache") else []
    run(["cmake", "-S", os.path.join(ROOT, "tests", "cpp", "consumer"), "-B", str(consumer), "-G", "Ninja",
         f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPython3_EXECUTABLE={sys.executable}",
         "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed", *launcher])
    run(["cmake", "--build", str(consumer)])
    for exe in ("consumer_api", "consumer_dispatcher"):
        out = run([str(consumer / exe)])
        assert "max_err=" in out
