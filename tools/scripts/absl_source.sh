#!/usr/bin/env bash
# Fetches abseil's source into DIR (once) and prints the path of the unpacked tree.
#   tools/scripts/absl_source.sh DIR
# ThreadSanitizer needs every library that synchronises kvmem's threads compiled with it:
# Debian's libabsl is not, and its absl::Mutex (atomics and futexes in uninstrumented
# code, no annotations) then looks like no synchronisation at all, so every access it
# guards is reported as a data race. tools/test.sh --tsan therefore builds abseil from
# source with -fsanitize=thread, inside the kvmem build (KVMEM_ABSL_SOURCE_DIR).
# The source is Debian's own package of the installed version (its patches applied),
# fetched with `apt-get source` from the deb-src twins of the system's Debian entries,
# under DIR only: the system's apt configuration and lists are not touched.
set -euo pipefail
dest=${1:?usage: absl_source.sh DIR}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
version=$(dpkg-query -W -f='${Version}' libabsl-dev 2>/dev/null || true)
stamp="$dest/fetched-${version:-newest}"
find_tree() { find "$dest" -mindepth 2 -maxdepth 2 -name CMakeLists.txt -path '*/abseil-*' -printf '%h\n' | head -1; }
if [ -f "$stamp" ] && [ -n "$(find_tree)" ]; then
  find_tree
  exit 0
fi

command -v dpkg-source >/dev/null || {
  echo "absl_source: dpkg-source is missing (apt-get install dpkg-dev)" >&2
  exit 1
}
apt="$dest/apt"
rm -rf "$apt" "$dest"/abseil-* "$dest"/abseil_* "$dest"/fetched-*
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/sources.list.d"
: >"$apt/sources.list"
# deb-src entries for the Debian archives the system installs from (deb822 and one-line).
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && sed -E 's/^Types:[[:space:]]*deb$/Types: deb-src/' "$f" >"$apt/sources.list.d/$(basename "$f")"
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] && sed -nE 's/^deb[[:space:]]/deb-src /p' "$f" >>"$apt/sources.list"
done
opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/sources.list.d"
  -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o "Debug::NoLocking=1")
[ "$(id -u)" -eq 0 ] && opts+=(-o APT::Sandbox::User=root)
echo "absl_source: fetching Debian's abseil source ${version:-(newest)} into $dest" >&2
apt-get "${opts[@]}" -q update >/dev/null
(
  cd "$dest"
  if [ -z "$version" ] || ! apt-get "${opts[@]}" -q source "abseil=$version" >/dev/null 2>&1; then
    apt-get "${opts[@]}" -q source abseil >/dev/null
  fi
)
tree=$(find_tree)
[ -n "$tree" ] || {
  echo "absl_source: no abseil tree under $dest after apt-get source" >&2
  exit 1
}
touch "$stamp"
echo "$tree"
