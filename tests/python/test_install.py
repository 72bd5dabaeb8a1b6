"""The installed CMake package, used the way examples/cpp/README.md says:
`cmake --install`, then outside projects configured with nothing but
-DCMAKE_PREFIX_PATH find it with find_package(AttnZoo) (and the torch it was
built against, with no Python: a python3 without torch comes first on PATH
here), link with -Wl,--as-needed and run the op from C++ (docs/design.md
section 8: dropped static registrations). The README's C++ quick start
(examples/cpp/quickstart.cpp) prints the committed gpt-kjv's eval-mode
logits, and gpt_generate runs a checkpoint written by Python."""
import os
import re
import shlex
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, "build")
EXAMPLES = os.path.join(ROOT, "examples", "cpp")
README_PREFIX, README_BUILD = "$HOME/.local/attnzoo", "build-examples"

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(BUILD, "build.ninja")),
                                reason="needs the CMake build tree (tools/build.sh makes it)")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    shown = cmd if isinstance(cmd, str) else " ".join(cmd)
    assert r.returncode == 0, f"{shown}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def readme_commands():
    """The shell block of examples/cpp/README.md, one command a line."""
    with open(os.path.join(EXAMPLES, "README.md")) as f:
        block = re.search(r"```sh\n(.*?)```", f.read(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """An environment like a user's: the install prefix and the examples' build
    directory in a temporary place, and a `python3` on PATH that has no torch
    (the package must not need one)."""
    tmp = tmp_path_factory.mktemp("outside")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name in ("python3", "python"):
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ("Torch_DIR", "CMAKE_PREFIX_PATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    if shutil.which("ccache"):
        env["CMAKE_CXX_COMPILER_LAUNCHER"] = "ccache"  # CMake's default launcher; not part of the command
    return {"prefix": tmp / "prefix", "build": tmp / README_BUILD, "env": env}


def localised(command, outside):
    """A README command with only its install prefix and build directory moved."""
    places = {README_PREFIX: str(outside["prefix"]), "./" + README_BUILD: str(outside["build"]),
              README_BUILD: str(outside["build"])}
    return re.sub("|".join(map(re.escape, places)), lambda m: places[m.group(0)], command)


@pytest.fixture(scope="module")
def examples(outside):
    """examples/cpp installed and built with exactly the README's cmake commands."""
    commands = [c for c in readme_commands() if c.startswith("cmake ")]
    assert len(commands) == 3, commands
    for command in commands:
        run(["bash", "-c", localised(command, outside)], cwd=ROOT, env=outside["env"])
    return outside


def test_find_package_consumer(tmp_path, examples):
    prefix = examples["prefix"]
    assert (prefix / "include" / "attnzoo" / "attnzoo.h").exists()
    assert (prefix / "lib" / "cmake" / "AttnZoo" / "AttnZooConfig.cmake").exists()
    assert (prefix / "include" / "attnzoo" / "models" / "models.h").exists()
    consumer = tmp_path / "consumer"
    run(["cmake", "-S", os.path.join(ROOT, "tests", "cpp", "consumer"), "-B", str(consumer),
         f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed"], env=examples["env"])
    run(["cmake", "--build", str(consumer)], env=examples["env"])
    for exe in ("consumer_api", "consumer_dispatcher"):
        out = run([str(consumer / exe)])
        assert "max_err=" in out


def test_a_wrong_torch_dir_is_a_clear_configure_error(tmp_path, examples):
    r = subprocess.run(["cmake", "-S", EXAMPLES, "-B", str(tmp_path / "b"), f"-DCMAKE_PREFIX_PATH={examples['prefix']}",
                        f"-DTorch_DIR={tmp_path}"], capture_output=True, text=True, env=examples["env"])
    assert r.returncode != 0
    assert "AttnZoo was built against the torch in" in r.stdout + r.stderr


def test_readme_cpp_quick_start_prints_eval_mode_logits(examples):
    import torch

    import attnzoo

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(EXAMPLES, "quickstart.cpp")) as f:
        program = f.read()
    assert f"```cpp\n{program}```" in readme, "the README's C++ quick start is not examples/cpp/quickstart.cpp"
    [command] = [c for c in readme_commands() if "quickstart" in c]
    out = run(shlex.split(localised(command, examples)), cwd=ROOT).splitlines()
    # The committed gpt-kjv has dropout 0.1: only an eval-mode model gives these.
    model = attnzoo.from_pretrained(os.path.join(ROOT, "models", "gpt-kjv", "checkpoint"))
    with torch.no_grad():
        logits = model(torch.tensor([list(b"And God")]))[0, -1]
    for line, vowel in zip(out[:5], "aeiou"):
        letter, value = line.split()
        assert letter == vowel and abs(float(value) - logits[ord(vowel)].item()) <= 1e-4, line
    assert out[5] == "And God" + "".join(map(chr, model.generate(torch.tensor([list(b"And God")]), 40)[0, 7:]))


def test_cpp_example_runs_a_python_checkpoint(tmp_path, examples):
    import torch
    from safetensors.torch import load_file

    import attnzoo

    torch.manual_seed(0)
    gpt = attnzoo.models.GPT({"vocab_size": 97, "hidden_size": 48, "num_layers": 2, "num_heads": 4,
                              "max_position_embeddings": 64, "attention": {"kind": "rotary"}}).eval()
    gpt.save_pretrained(tmp_path / "ckpt")
    prompt = [5, 17, 3, 88, 41]
    exe = str(examples["build"] / "gpt_generate")
    out = run([exe, str(tmp_path / "ckpt"), "--ids", ",".join(map(str, prompt)),
               "--max-new-tokens", "15", "--logits-out", str(tmp_path / "logits.safetensors")])
    cpp_tokens = [int(t) for t in out.split("tokens:")[1].split()]
    ids = torch.tensor([prompt])
    assert cpp_tokens == gpt.generate(ids, 15)[0].tolist()
    cpp_logits = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert (cpp_logits - gpt(ids)).abs().max() <= 1e-6
    bad = subprocess.run([exe, str(tmp_path / "missing"), "--ids", "1"], capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot open" in bad.stderr
    # The README's gpt_generate line runs as given.
    [command] = [c for c in readme_commands() if "gpt_generate" in c]
    assert "tokens:" in run(shlex.split(localised(command, examples)), cwd=ROOT)
