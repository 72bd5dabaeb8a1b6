"""The installed CMake package: `cmake --install`, then outside projects find
it with find_package(AttnZoo), link with -Wl,--as-needed and run the op from
C++ (DESIGN.md section 7: dropped static registrations), and the example
program examples/cpp/gpt_generate runs a checkpoint written by Python."""
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


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("install") / "prefix"
    run(["cmake", "--install", BUILD, "--prefix", str(prefix)])
    return prefix


def build_outside_project(source, binary, prefix):
    launcher = ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"] if shutil.which("ccache") else []
    run(["cmake", "-S", source, "-B", str(binary), "-G", "Ninja",
         f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPython3_EXECUTABLE={sys.executable}",
         "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed", *launcher])
    run(["cmake", "--build", str(binary)])


@pytest.mark.skipif(not os.path.exists(os.path.join(BUILD, "build.ninja")),
                    reason="needs the CMake build tree (tools/build.sh makes it)")
def test_find_package_consumer(tmp_path, prefix):
    assert (prefix / "include" / "attnzoo" / "attnzoo.h").exists()
    assert (prefix / "lib" / "cmake" / "AttnZoo" / "AttnZooConfig.cmake").exists()
    assert (prefix / "include" / "attnzoo" / "models" / "models.h").exists()
    consumer = tmp_path / "consumer"
    build_outside_project(os.path.join(ROOT, "tests", "cpp", "consumer"), consumer, prefix)
    for exe in ("consumer_api", "consumer_dispatcher"):
        out = run([str(consumer / exe)])
        assert "max_err=" in out


@pytest.mark.skipif(not os.path.exists(os.path.join(BUILD, "build.ninja")),
                    reason="needs the CMake build tree (tools/build.sh makes it)")
def test_cpp_example_runs_a_python_checkpoint(tmp_path, prefix):
    import torch
    from safetensors.torch import load_file

    import attnzoo

    torch.manual_seed(0)
    gpt = attnzoo.models.GPT({"vocab_size": 97, "hidden_size": 48, "num_layers": 2, "num_heads": 4,
                              "max_position_embeddings": 64, "attention": {"kind": "rotary"}}).eval()
    gpt.save_pretrained(tmp_path / "ckpt")
    prompt = [5, 17, 3, 88, 41]
    examples = tmp_path / "examples"
    build_outside_project(os.path.join(ROOT, "examples", "cpp"), examples, prefix)
    out = run([str(examples / "gpt_generate"), str(tmp_path / "ckpt"), "--ids", ",".join(map(str, prompt)),
               "--max-new-tokens", "15", "--logits-out", str(tmp_path / "logits.safetensors")])
    cpp_tokens = [int(t) for t in out.split("tokens:")[1].split()]
    ids = torch.tensor([prompt])
    assert cpp_tokens == gpt.generate(ids, 15)[0].tolist()
    cpp_logits = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert (cpp_logits - gpt(ids)).abs().max() <= 1e-6
    bad = subprocess.run([str(examples / "gpt_generate"), str(tmp_path / "missing"), "--ids", "1"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot open" in bad.stderr
