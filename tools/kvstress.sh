#!/usr/bin/env bash
# The main job of the README: installs what is missing, builds kvstress and runs the
# default serving simulation on the host backend (table on stdout, JSON and SVG plot in
# out/). Extra arguments go to kvstress (see docs/kvstress.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/scripts/deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target kvstress
mkdir -p out
exec build/kvstress --json=out/kvstress.json --plot=out/kvstress.svg "$@"
