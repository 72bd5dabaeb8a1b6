"""pip install . : drives the same CMake build as tools/build.sh (nothing is
compiled twice); the extension and libattnzoo land inside the attnzoo package,
with lib/build_info.json (the torch it was built against, which `import
attnzoo` checks).

With ATTNZOO_CMAKE_BUILD_DIR set (tools/build-wheel does), an existing,
configured build tree (tools/build.sh's build/) is brought up to date
incrementally and its outputs are packaged: no second build tree."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXISTING_BUILD = os.environ.get("ATTNZOO_CMAKE_BUILD_DIR")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if EXISTING_BUILD:
            return self.package_existing_build(Path(EXISTING_BUILD).resolve(), Path(self.get_ext_fullpath(ext.name)))
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
        relocatable(package_dir / Path(self.get_ext_fullpath(ext.name)).name)

    def package_existing_build(self, build_dir, ext_path):
        """Brings the build tree's attnzoo._C up to date and copies it, with
        lib/ (libattnzoo, build_info.json), into the package being built."""
        cache = build_dir / "CMakeCache.txt"
        if not cache.exists():
            sys.exit(f"ATTNZOO_CMAKE_BUILD_DIR={build_dir}: not a configured CMake build (run tools/build.sh)")
        found = re.search(r"^ATTNZOO_PYTHON_OUT:\w+=(.*)$", cache.read_text(), re.M)
        out = Path(found.group(1)) if found else ROOT / "python" / "attnzoo"
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "attnzoo_python"], check=True)
        built = out / ext_path.name
        if not built.exists():
            sys.exit(f"{built} not found: {build_dir} was configured for another Python than {sys.executable}")
        import torch

        recorded = json.loads((out / "lib" / "build_info.json").read_text())["torch_version"]
        if recorded != torch.__version__:
            sys.exit(f"{build_dir} was built against torch {recorded}, this Python has torch {torch.__version__}")
        ext_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, ext_path)
        (ext_path.parent / "lib").mkdir(exist_ok=True)
        for name in ["build_info.json"] + [p.name for p in (out / "lib").glob("libattnzoo.so*")]:
            shutil.copy2(out / "lib" / name, ext_path.parent / "lib" / name)
        relocatable(ext_path)


def relocatable(extension):
    """Run-time search paths of the packaged attnzoo._C and libattnzoo without
    the build machine's directories: _C finds libattnzoo in lib/ beside it,
    libattnzoo finds torch's libraries in the torch beside the attnzoo package
    in site-packages (`import attnzoo` imports torch first, which loads them
    anyway)."""
    script = Path(extension).parent / "lib" / "relocate.cmake"
    script.write_text(f'file(RPATH_SET FILE "{extension}" NEW_RPATH "$ORIGIN/lib")\n'
                      f'foreach(lib IN ITEMS {" ".join(str(p) for p in script.parent.glob("libattnzoo.so*"))})\n'
                      '  file(RPATH_SET FILE "${lib}" NEW_RPATH "$ORIGIN/../../torch/lib")\n'
                      'endforeach()\n')
    try:
        subprocess.run(["cmake", "-P", str(script)], check=True)
    finally:
        script.unlink()


def requirements():
    """requirements.txt, except that torch is pinned there for CI only: the
    package builds against any torch >= 2.11 and then needs the one it was
    built with, the building Python's (--no-build-isolation): that release is
    required (`import attnzoo` checks the local tag, +cu132, too)."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    reqs = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    try:
        import torch

        torch_req = "torch==" + torch.__version__.split("+")[0]
    except ImportError:  # an isolated build environment: it will fail to configure anyway
        torch_req = "torch>=2.11"
    return [torch_req if r.startswith("torch==") else r for r in reqs]


setup(
    name="attnzoo",
    version="0.1.0",
    description="Fused, memory-efficient attention operators for PyTorch (CPU first) and a model zoo",
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("attnzoo._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=requirements(),
    python_requires=">=3.9",
    zip_safe=False,
    # A wheel from an existing build tree keeps setuptools' staging (and the
    # egg-info, else python/attnzoo.egg-info) in <build>/wheel, which
    # tools/build-wheel empties first.
    options={"build": {"build_base": str(Path(EXISTING_BUILD) / "wheel")},
             "egg_info": {"egg_base": str(Path(EXISTING_BUILD) / "wheel")}} if EXISTING_BUILD else {},
)
