#!/usr/bin/env bash
# Installs the Debian 12 packages kvmem builds and tests with (the Python package's tests
# use Debian's /usr/bin/python3 with numpy and pytest), skipping what is already there.
# Sourced by the Quick start scripts; needs root or sudo only when something is missing.
set -euo pipefail
kvmem_deps=(cmake ninja-build g++ libabsl-dev libspdlog-dev libfmt-dev libssl-dev libgtest-dev
            libgmock-dev python3-numpy python3-pytest)
# What one build needs besides (tools/test.sh --tsan: dpkg-dev, to unpack abseil's source).
kvmem_deps+=(${kvmem_extra_deps[@]+"${kvmem_extra_deps[@]}"})
missing=()
for p in "${kvmem_deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "kvmem: installing ${missing[*]}" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}" >/dev/null ||
    { "${sudo_cmd[@]}" apt-get update -q >/dev/null && "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
