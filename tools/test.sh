#!/usr/bin/env bash
# The test command of the README: installs what is missing, builds kvmem (with its CUDA
# parts where nvcc is found) and runs every test with CTest. GPU tests skip, saying why,
# where no GPU is present.
#   tools/test.sh            normal build in build/
#   tools/test.sh --sanitize host-only build under AddressSanitizer + UBSan in build-asan/
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/scripts/deps.sh
jobs=$(nproc)
if [ "${1:-}" = "--sanitize" ]; then
  dir=build-asan
  cmake -S . -B "$dir" -G Ninja -DKVMEM_SANITIZE=ON -DKVMEM_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug \
    -DKVMEM_WERROR="${KVMEM_WERROR:-OFF}" >/dev/null
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  export KVMEM_TEST_SCALE=${KVMEM_TEST_SCALE:-0.25}
else
  dir=build
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DKVMEM_WERROR="${KVMEM_WERROR:-OFF}" >/dev/null
fi
cmake --build "$dir" -j "$jobs"
ctest --test-dir "$dir" --output-on-failure -j "$jobs" --timeout 900
# ctest lists skipped tests without their reason; GoogleTest wrote it under "Skipped".
log="$dir/Testing/Temporary/LastTest.log"
if [ -f "$log" ] && grep -q ': Skipped$' "$log"; then
  echo "Skipped tests, by reason:"
  grep -A1 ': Skipped$' "$log" | grep -vE ': Skipped$|^--$' | sort | uniq -c | sort -rn
fi
