#!/usr/bin/env bash
# The GPU suite: build and bundle on a build machine, then on the GPU machine run every
# GPU test, every GPU test again under compute-sanitizer memcheck, and every kvbench
# subcommand, with logs under $KVMEM_GPU_OUT (docs/gpu.md).
#
#   here:         tools/gpu/run_gpu_suite.sh build [BUILD_DIR]      (default build-gpu)
#   GPU machine:  tools/gpu/run_gpu_suite.sh run [tests] [memcheck] [bench]   (default: all)
#
# What `build` bundles: every tests/gpu/*_test.{cc,cu} binary and kvbench, into
# $KVMEM_GPU_BUNDLE (default .gpu_bundle_cuda, ignored by git; copy it to the GPU machine).
# `run` writes to $KVMEM_GPU_OUT (default ./out): summary.txt (one line per binary / benchmark, the
# part to paste in an issue), tests.log, memcheck.log, bench.log.
# Knobs for `run` (environment):
#   KVMEM_GPU_ONLY="cuda_vmm_test kv_cache_gpu_test"   only these test binaries
#   KVBENCH_ONLY="vmm mapper"                           only these kvbench subcommands
#   KVBENCH_ARGS_<name>="--flag=..."                    arguments of one subcommand
#                                                       (steps, a host benchmark whose full
#                                                       run takes minutes: --quick unless set)
#   KVMEM_MEMCHECK_FILTER                               gtest filter under memcheck (default:
#                                                       skip the tests that make the driver
#                                                       fail on purpose: memcheck reports
#                                                       every failed driver call)
#   KVMEM_TEST_TIMEOUT / KVMEM_MEMCHECK_TIMEOUT / KVMEM_BENCH_TIMEOUT   seconds per binary
set -uo pipefail
cd "$(dirname "$0")/../.."
bundle=${KVMEM_GPU_BUNDLE:-.gpu_bundle_cuda}

gpu_tests() {
  local f
  for f in tests/gpu/*_test.cc tests/gpu/*_test.cu; do
    [ -e "$f" ] || continue
    f=$(basename "$f")
    echo "${f%.*}"
  done
}

selected() {  # selected NAME LIST: true when LIST is empty or names NAME
  [ -z "$2" ] && return 0
  case " $2 " in *" $1 "*) return 0 ;; esac
  return 1
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
build)
  build=${1:-build-gpu}
  # shellcheck disable=SC2046
  exec tools/gpu/bundle.sh "$build" "$bundle" $(gpu_tests) kvbench
  ;;
run) ;;
*)
  sed -n '2,/^set -uo/p' "$0" | grep '^#' >&2
  exit 2
  ;;
esac

[ -x "$bundle/run.sh" ] || { echo "no bundle at $bundle: run '$0 build' first" >&2; exit 2; }
steps=${*:-tests memcheck bench}
logs=${KVMEM_GPU_OUT:-out}
mkdir -p "$logs"
summary=$logs/summary.txt
export LD_LIBRARY_PATH="$PWD/$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
status=0

{
  echo "kvmem GPU suite, $(date -u +%FT%TZ), steps: $steps"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4
} | tee "$summary"

# gtest's verdict of one log: "[  PASSED  ] 12 tests." plus skipped / failed counts.
verdict() {
  grep -E '^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+ tests?' "$1" | sed 's/, listed below://' | tr '\n' ' '
}

for binary in $(gpu_tests); do
  selected "$binary" "${KVMEM_GPU_ONLY:-}" || continue
  [ -x "$bundle/bin/$binary" ] || { echo "$binary: not in the bundle" | tee -a "$summary"; status=1; continue; }
  if [[ " $steps " == *" tests "* ]]; then
    log=$(mktemp)
    echo "== $binary" | tee -a "$logs/tests.log"
    timeout -k 10 "${KVMEM_TEST_TIMEOUT:-300}" "$bundle/bin/$binary" --gtest_color=no 2>&1 |
      tee "$log" >>"$logs/tests.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || status=1
    echo "test     $binary rc=$rc $(verdict "$log")" | tee -a "$summary"
    rm -f "$log"
  fi
  if [[ " $steps " == *" memcheck "* ]]; then
    log=$(mktemp)
    echo "== memcheck $binary" | tee -a "$logs/memcheck.log"
    timeout -k 10 "${KVMEM_MEMCHECK_TIMEOUT:-400}" "$sanitizer" --tool memcheck \
      --error-exitcode 86 "$bundle/bin/$binary" --gtest_color=no \
      "--gtest_filter=${KVMEM_MEMCHECK_FILTER:--*OutOfMemory*:*DriverError*}" 2>&1 |
      tee "$log" >>"$logs/memcheck.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || status=1
    echo "memcheck $binary rc=$rc $(grep -m1 'ERROR SUMMARY' "$log" | sed 's/=* *//') $(verdict "$log")" |
      tee -a "$summary"
    rm -f "$log"
  fi
done

if [[ " $steps " == *" bench "* ]]; then
  if [ -x "$bundle/bin/kvbench" ]; then
    : "${KVBENCH_ARGS_steps=--quick}"
    for name in $("$bundle/bin/kvbench" --help | awk '/^  [a-z0-9_]+ /{print $1}'); do
      selected "$name" "${KVBENCH_ONLY:-}" || continue
      var="KVBENCH_ARGS_$name"
      echo "== kvbench $name ${!var:-}" | tee -a "$logs/bench.log"
      # shellcheck disable=SC2086
      timeout -k 10 "${KVMEM_BENCH_TIMEOUT:-300}" "$bundle/bin/kvbench" "$name" ${!var:-} 2>&1 |
        tee -a "$logs/bench.log"
      rc=${PIPESTATUS[0]}
      [ "$rc" -eq 0 ] || status=1
      echo "bench    kvbench $name rc=$rc" >>"$summary"
    done
  else
    echo "kvbench: not in the bundle" | tee -a "$summary"
    status=1
  fi
fi

echo "== summary ($logs/summary.txt)"
cat "$summary"
exit $status
