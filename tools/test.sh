#!/usr/bin/env bash
# The test command of the README: installs what is missing, builds kvmem (with its CUDA
# parts where nvcc is found) and runs every test with CTest. GPU tests skip, saying why,
# where no GPU is present.
#   tools/test.sh            normal build in build/
#   tools/test.sh --sanitize host-only build under AddressSanitizer + UBSan in build-asan/
#   tools/test.sh --tsan     host-only build under ThreadSanitizer in build-tsan/, abseil
#                            built from Debian's source with it (tools/scripts/absl_source.sh
#                            says why); runs the tests with threads (TSAN_TESTS below)
set -euo pipefail
cd "$(dirname "$0")/.."
kvmem_extra_deps=()
[ "${1:-}" = "--tsan" ] && kvmem_extra_deps=(dpkg-dev)
source tools/scripts/deps.sh
jobs=$(nproc)
if [ "${1:-}" = "--tsan" ]; then
  dir=build-tsan
  # The tests whose threads share a cache or a backend: concurrent callers, the
  # background mapper, and the randomized model and fault runs (the mapper runs there).
  tsan_tests=(${TSAN_TESTS:-kv_cache_threads_test background_mapper_test host_vmm_test
    kv_cache_model_test kv_cache_fault_test virtual_layout_test virtual_persistent_fault_test})
  absl_src=$(tools/scripts/absl_source.sh "$dir/deps")
  cmake -S . -B "$dir" -G Ninja -DKVMEM_TSAN=ON -DKVMEM_ABSL_SOURCE_DIR="$absl_src" \
    -DKVMEM_CUDA=OFF -DKVMEM_BUILD_TOOLS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DKVMEM_WERROR="${KVMEM_WERROR:-OFF}" >/dev/null
  cmake --build "$dir" -j "$jobs" --target "${tsan_tests[@]}"
  # halt_on_error: the first report fails the binary (exit 66), with both stacks printed.
  # The suppressions are false positives inside abseil, each explained in the file.
  export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tools/tsan_suppressions.txt ${TSAN_OPTIONS:-}"
  export KVMEM_TEST_SCALE=${KVMEM_TEST_SCALE:-0.25}
  failed=()
  for t in "${tsan_tests[@]}"; do
    start=$SECONDS
    if "$dir/$t" --gtest_brief=1 >"$dir/$t.log" 2>&1; then
      echo "tsan: $t passed ($((SECONDS - start)) s)"
    else
      echo "tsan: $t FAILED ($((SECONDS - start)) s); the end of $dir/$t.log:"
      tail -n 60 "$dir/$t.log"
      failed+=("$t")
    fi
  done
  echo "tsan: $((${#tsan_tests[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
  [ ${#failed[@]} -eq 0 ]
  exit
fi
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
