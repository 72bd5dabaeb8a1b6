"""pip install . : drives the same CMake build as tools/build.sh (nothing is
compiled twice); the extension and libattnzoo land inside the attnzoo package."""
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        package_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DATTNZOO_PYTHON_OUT={package_dir}",
            "-DATTNZOO_BUILD_TESTS=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "attnzoo_python"], check=True)


def requirements():
    """requirements.txt, except that torch is pinned there for CI only: the
    package builds against, and then needs, whichever torch >= 2.11 it was
    built with."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    reqs = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return ["torch>=2.11" if r.startswith("torch==") else r for r in reqs]


setup(
    name="attnzoo",
    version="0.1.0",
    description="Fused, memory-efficient attention operators for PyTorch (CPU first) and a model zoo",
    packages=["attnzoo"],
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("attnzoo._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=requirements(),
    python_requires=">=3.9",
    zip_safe=False,
)
