#!/usr/bin/env bash
# Builds GPU binaries on this (Debian) machine and bundles them, with the non-system
# shared libraries they link (absl, spdlog, fmt, benchmark), into a folder to copy to
# the GPU machine, which need not have those libraries.
#
# usage: tools/gpu/bundle.sh BUILD_DIR BUNDLE_DIR TARGET...
#   then on the GPU machine: BUNDLE_DIR/run.sh BINARY [ARGS...]
set -euo pipefail
build=$1
bundle=$2
shift 2
cmake -S . -B "$build" -G Ninja -DKVMEM_CUDA=ON -DKVMEM_PORTABLE=ON \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target "$@"
rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib"
for t in "$@"; do
  f=$(find "$build" -type f -name "$t" -perm -u+x | head -n 1)
  [ -n "$f" ] || { echo "bundle: no binary for target $t" >&2; exit 1; }
  cp "$f" "$bundle/bin/"
  # A binary may link none of them (grep then finds nothing, which is fine).
  { ldd "$f" | awk '/=> \// {print $3}' |
    grep -E 'libabsl|libspdlog|libfmt|libcrypto|libgtest|libgmock|libbenchmark' || true; } |
    xargs -r cp -L -t "$bundle/lib/"
done
cat >"$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs one bundled binary with the bundled libraries.
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin=$1
shift
exec "$here/bin/$bin" "$@"
RUN
chmod +x "$bundle/run.sh"
du -sh "$bundle"
