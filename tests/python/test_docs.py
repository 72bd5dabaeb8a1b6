"""Every Python snippet in the README and in docs/ runs as written: each
```python block on its own, in a fresh namespace (so a snippet cannot lean
on names an earlier one defined), from the repository root, in one
subprocess per page."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

RUNNER = r"""
import sys, traceback
blocks = eval(sys.stdin.read())
for page, line, code in blocks:
    try:
        exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__snippet__"})
    except Exception:
        print(f"the snippet at {page}:{line} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
print(len(blocks), "snippets ran")
"""


def python_snippets(page):
    text = open(os.path.join(ROOT, page)).read()
    return [(page, text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def test_the_docs_have_python_snippets():
    assert python_snippets("README.md"), "the README's quick tour has no ```python block"


@pytest.mark.parametrize("page", [p for p in PAGES if python_snippets(p)])
def test_python_snippets_run(page, tmp_path):
    blocks = python_snippets(page)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(ROOT, "python"),
                                                                     os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", RUNNER], input=repr(blocks), capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip() == f"{len(blocks)} snippets ran"
