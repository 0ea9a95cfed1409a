#!/usr/bin/env bash
# Installs kvmem from a build directory into a temporary prefix, then configures, builds
# and runs tests/install_consumer against it (find_package(kvmem 0.2), kvmem::kvmem and
# kvmem::kvmem_shared), and loads the Python package installed with --component python.
#   tools/scripts/check_install.sh [build-dir]     (default: build, as tools/test.sh makes)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
[ -f "$build/CMakeCache.txt" ] || { echo "check_install: no CMake build in $build" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --build "$build" -j "$(nproc)" --target kvmem_shared kvmem_core kvmem_vmm kvmem_layouts kvmem_cache kvmem_attention kvmem_c_api >/dev/null
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
cmake -S tests/install_consumer -B "$tmp/consumer" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/consumer" >/dev/null
"$tmp/consumer/consumer_static"
"$tmp/consumer/consumer_shared"
"$tmp/consumer/consumer_c"
# The shared library resolves from the prefix, not from the build tree.
if ldd "$tmp/consumer/consumer_shared" | grep -q "$(cd "$build" && pwd)"; then
  echo "check_install: consumer_shared loads libkvmem.so from the build tree" >&2
  exit 1
fi
# The Python package (docs/python.md), where Debian's python3 with numpy is present.
if /usr/bin/python3 -c "import numpy" 2>/dev/null; then
  cmake --install "$build" --component python --prefix "$tmp/site" >/dev/null
  PYTHONPATH="$tmp/site" /usr/bin/python3 -c "
import kvmem
with kvmem.KvCache(num_layers=2, num_kv_heads=2, head_dim=64, max_requests=4, max_context=128,
                   memory_budget_bytes=16 << 20) as c:
    c.add_request(1)
    assert len(c.extend_batch([1], [5])) == 5
print('kvmem', kvmem.__version__, 'from Python: ok (', kvmem.library_path(), ')')
"
fi
echo "check_install: ok"
