"""The libFuzzer target over the untrusted-file readers (safetensors headers
and config.json, tests/fuzz/fuzz_readers.cpp), built with clang under
AddressSanitizer + UBSan and run for a bounded time from the committed seed
corpus. ATTNZOO_FUZZ_SECONDS sets the time (default 30)."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ = os.path.join(ROOT, "tests", "fuzz")
SOURCES = [os.path.join(FUZZ, "fuzz_readers.cpp"), os.path.join(ROOT, "csrc", "attnzoo", "models", "config.cpp"),
           os.path.join(ROOT, "csrc", "attnzoo", "io", "safetensors_index.cpp")]


def build_fuzzer(out_dir):
    clang = shutil.which("clang++")
    if clang is None:
        pytest.fail("clang++ is missing: tools/setup.sh installs it (the fuzz target needs libFuzzer)")
    exe = os.path.join(out_dir, "fuzz_readers")
    cmd = [clang, "-std=c++17", "-O1", "-g", "-fsanitize=fuzzer,address,undefined",
           "-fno-sanitize-recover=undefined", "-I", os.path.join(ROOT, "csrc"), *SOURCES, "-o", exe]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


def test_fuzz_the_file_readers(tmp_path):
    exe = build_fuzzer(str(tmp_path))
    seconds = int(os.environ.get("ATTNZOO_FUZZ_SECONDS", "30"))
    corpus = tmp_path / "corpus"  # new inputs go here; the committed seeds stay as they are
    corpus.mkdir()
    r = subprocess.run([exe, str(corpus), os.path.join(FUZZ, "corpus"), f"-dict={os.path.join(FUZZ, 'readers.dict')}",
                        f"-max_total_time={seconds}", "-seed=1", "-timeout=10", "-rss_limit_mb=2048",
                        "-malloc_limit_mb=512", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, timeout=seconds + 120)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    runs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", log).group(1))
    coverage = re.findall(r"cov: (\d+)", log)
    assert runs > 1000, log[-2000:]
    # For the README's Reliability figures.
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with open(os.path.join(ROOT, "build", "fuzz-last-run.txt"), "w") as f:
        f.write(f"{runs} executions in {seconds} s, coverage {coverage[-1] if coverage else '?'} edges, no finding\n")
