"""The shared library must run on any x86-64 CPU: AVX2 / AVX-512 instructions
may appear only inside the per-ISA engine builds (namespaces ...::AVX2 and
...::AVX512), never in code a baseline caller can reach. The linker merges
inline code the builds share and keeps the first copy; this checks that the
first copy is the baseline one (see CMakeLists.txt)."""
import os
import platform
import re
import shutil
import subprocess

import pytest

import attnzoo

LIB = os.path.join(os.path.dirname(attnzoo.__file__), "lib", "libattnzoo.so")


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
