#!/usr/bin/env bash
# Set up (when needed) and build everything with the one CMake build:
# the ops library, attnzoo._C (placed into python/attnzoo for in-place use),
# and the C++ tests. Incremental and quick when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup.sh
build_dir="${ATTNZOO_BUILD_DIR:-build}"
if [ ! -f "$build_dir/build.ninja" ]; then
  cmake -S . -B "$build_dir" -G Ninja -DPython3_EXECUTABLE="$root/.venv/bin/python" \
    -DCMAKE_BUILD_TYPE=Release > "$build_dir.configure.log" 2>&1 \
    || { cat "$build_dir.configure.log"; exit 1; }
fi
cmake --build "$build_dir"
