#!/usr/bin/env bash
# Idempotent set-up: Debian packages, the .venv with the pinned torch, and the
# CMake build. Fast when everything is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# clang + libclang-rt: the libFuzzer target over the checkpoint and config readers.
# clang-format: tools/test checks the C++ formatting (.clang-format).
# bible-kjv, espeak-ng, sox: the embedded data sets (attnzoo.data, docs/design.md section 7).
# chromium: renders the zoo page (tools/attnzoo report) headless in tests/python/test_report.py.
debian_packages=(cmake ninja-build catch2 nlohmann-json3-dev ccache clang clang-format libclang-rt-14-dev bible-kjv espeak-ng sox chromium)
missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python_bin" -m venv .venv
fi
stamp=.venv/.requirements.sha
want="$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python requirements into .venv (torch is large the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt
  echo "$want" > "$stamp"
fi
