"""Packaging (docs/packaging.md). tools/build-wheel makes a wheel from the
CMake build tree; installed into a fresh venv that shares .venv's torch (a
.pth file: no second torch), it imports from there and runs the README's
quick tour, and refuses a torch other than the one it was built against. The
build tree is a CMake package too: an outside project configured with
-DAttnZoo_DIR=build builds and runs with nothing installed. And damaged
safetensors files read from Python are ValueErrors naming the file."""
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch
from test_docs import RUNNER, python_snippets
from test_install import BUILD, ROOT, outside, run  # noqa: F401  (outside: a fixture)

import attnzoo

needs_build = pytest.mark.skipif(not os.path.exists(os.path.join(BUILD, "build.ninja")),
                                 reason="needs the CMake build tree (tools/build.sh makes it)")


def quick_tour():
    """The README's quick tour: its ```python blocks, as test_docs runs them."""
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("## A quick tour")
    end = text.index("\n## ", start)
    first, last = text.count("\n", 0, start), text.count("\n", 0, end)
    blocks = [b for b in python_snippets("README.md") if first < b[1] < last]
    assert any("attnzoo.attention(" in code for _, _, code in blocks)
    assert any("attnzoo.models.GPT(" in code for _, _, code in blocks)
    return blocks


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel tools/build-wheel makes, installed with pip into a new venv
    whose only other packages are .venv's (torch, numpy, safetensors, ...),
    reached through a .pth file; commands run from a temporary directory
    without PYTHONPATH, so `import attnzoo` can only find the installed one."""
    tmp = tmp_path_factory.mktemp("wheel")
    run([os.path.join(ROOT, "tools", "build-wheel"), str(tmp / "dist")], cwd=ROOT)
    [wheel] = (tmp / "dist").glob("attnzoo-*.whl")
    venv = tmp / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env, cwd=tmp)
    python = str(venv / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env, cwd=tmp).strip()
    with open(os.path.join(site, "dot-venv.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", str(wheel)],
        env=env, cwd=tmp)
    return {"wheel": wheel, "venv": venv, "python": python, "site": site, "env": env, "cwd": tmp}


def in_venv(installed, code, check=True, **kw):
    r = subprocess.run([installed["python"], "-c", code], capture_output=True, text=True, cwd=installed["cwd"],
                       env=installed["env"], **kw)
    assert r.returncode == 0 or not check, f"{code}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@needs_build
def test_wheel_installs_and_runs_the_readme_quick_tour(installed):
    assert installed["wheel"].name.startswith(f"attnzoo-{attnzoo.__version__}-")
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = set(whl.namelist())
        recorded = json.loads(whl.read("attnzoo/lib/build_info.json"))
    assert {"attnzoo/__init__.py", "attnzoo/lib/libattnzoo.so",
            "attnzoo/_C" + sysconfig.get_config_var("EXT_SUFFIX")} <= names
    assert recorded == {"torch_version": torch.__version__}
    metadata = (installed["venv"] / "lib").glob("python*/site-packages/attnzoo-*.dist-info/METADATA")
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}\n" in next(metadata).read_text()
    package = os.path.join(installed["site"], "attnzoo")
    for lib, runpath in (("_C" + sysconfig.get_config_var("EXT_SUFFIX"), "$ORIGIN/lib"),
                         ("lib/libattnzoo.so", "$ORIGIN/../../torch/lib")):  # nothing of the build machine
        dynamic = run(["readelf", "-d", os.path.join(package, lib)])
        assert re.search(r"\((?:RUNPATH|RPATH)\).*\[(.*)\]", dynamic).group(1) == runpath, dynamic
    where = in_venv(installed, "import attnzoo, torch; print(attnzoo.__file__); print(torch.__version__); "
                               "print(attnzoo.engine_isa())").stdout.split()
    assert where[0] == os.path.join(installed["site"], "attnzoo", "__init__.py"), where
    assert where[1] == torch.__version__ and where[2] == attnzoo.engine_isa()
    blocks = quick_tour()
    r = in_venv(installed, RUNNER, input=repr(blocks), timeout=300)
    assert r.stdout.strip() == f"{len(blocks)} snippets ran"


@needs_build
def test_import_refuses_another_torch(installed):
    info = os.path.join(installed["site"], "attnzoo", "lib", "build_info.json")
    original = open(info).read()
    try:
        with open(info, "w") as f:
            json.dump({"torch_version": "2.14.0+cpu"}, f)
        r = in_venv(installed, "import attnzoo", check=False)
        assert r.returncode == 1
        assert (f"ImportError: attnzoo was built against torch 2.14.0+cpu, but this Python has torch "
                f"{torch.__version__}") in r.stderr, r.stderr
        assert "Rebuild attnzoo with this torch" in r.stderr and "or install torch==2.14.0+cpu" in r.stderr
        # the check comes first: the extension (and libattnzoo) was never loaded
        r = in_venv(installed, "try:\n import attnzoo\nexcept ImportError:\n pass\n"
                               "print('libattnzoo' in open('/proc/self/maps').read())")
        assert r.stdout.strip() == "False"
        os.remove(info)
        r = in_venv(installed, "import attnzoo", check=False)
        assert r.returncode == 1 and "cannot read" in r.stderr and "build_info.json" in r.stderr
    finally:
        with open(info, "w") as f:
            f.write(original)
    in_venv(installed, "import attnzoo")


def test_in_place_package_records_the_running_torch():
    assert attnzoo._build_info.built_with_torch() == torch.__version__
    assert attnzoo.__file__ == os.path.join(ROOT, "python", "attnzoo", "__init__.py")


@needs_build
def test_build_tree_is_a_cmake_package(tmp_path, outside):  # noqa: F811
    """find_package(AttnZoo) with AttnZoo_DIR the build tree: nothing
    installed, headers from csrc/, the library where the build put it."""
    consumer = tmp_path / "consumer"
    run(["cmake", "-S", os.path.join(ROOT, "tests", "cpp", "consumer"), "-B", str(consumer), f"-DAttnZoo_DIR={BUILD}",
         "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed"], env=outside["env"])
    targets = open(os.path.join(BUILD, "AttnZooTargets.cmake")).read()
    assert os.path.join(ROOT, "csrc") in targets
    run(["cmake", "--build", str(consumer)], env=outside["env"])
    for exe in ("consumer_api", "consumer_dispatcher"):
        assert "max_err=" in run([str(consumer / exe)])


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_damaged_safetensors_are_value_errors_naming_the_file(tmp_path, damage):
    gpt = attnzoo.models.GPT({"vocab_size": 32, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                              "max_position_embeddings": 16})
    gpt.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    good = path.read_bytes()
    header_length = int.from_bytes(good[:8], "little")
    if damage == "truncated":
        path.write_bytes(good[: 8 + header_length + 100])
        expected = r"tensor \"[^\"]+\": data_offsets \[\d+, \d+\] run outside the 100 data bytes"
    else:
        path.write_bytes(good[:8] + b"\x00garbage" * (header_length // 8) + good[8 + header_length // 8 * 8:])
        expected = "malformed JSON header: "
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + expected):
        attnzoo.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ")):  # the C++ reader says the same, by its words
        attnzoo.models.from_pretrained_cpp(tmp_path)
    path.write_bytes(good[:5])
    with pytest.raises(ValueError, match=re.escape(f"{path}: too short to be a safetensors file (5 bytes)")):
        attnzoo.from_pretrained(tmp_path)
    path.write_bytes((len(good)).to_bytes(8, "little") + good[8:])
    with pytest.raises(ValueError, match=re.escape(f"{path}: header length {len(good)} runs past the end of the "
                                                   f"{len(good)}-byte file (truncated?)")):
        attnzoo.from_pretrained(tmp_path)
