#!/usr/bin/env bash
# Fails (exit 1) when a tracked file holds lab-notebook vocabulary or points outside the
# repository, printing file:line:text for each hit:
#   numbered work periods and numbered runs (the patterns below spell them),
#   the vocabulary of a private remote-execution setup (its output variable, leases,
#   carried paths),
#   links to design notes that are not in the repository ("../shared", "shared/design.md").
# Also fails when docs/ tracks experiment leftovers (.patch, .diff or .log files).
# Every file `git ls-files` lists is checked, except this script. Run from anywhere.
# Every pattern ignores case.
set -euo pipefail
cd "$(dirname "$0")/../.."
self=tools/scripts/check_words.sh

if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "check_words: not a git work tree" >&2
  exit 2
fi

# Matched ignoring case.
patterns=(
  # Each word is written in two pieces so that this file does not match itself.
  '\bses''sion [0-9]'
  '\bses''sions? [0-9]+-[0-9]+'
  '\bca''ll [0-9]+\b'
  '\bca''lls [0-9]'
  '\ble''ase\b'
  '\.\./shared'
  'shared/(design|benchmarks|gpu)\.md'
  '\bcarry='
  '\$O''UT\b'
)
args=()
for p in "${patterns[@]}"; do args+=(-e "$p"); done

status=0
# Tracked files that exist in the work tree (a file deleted but not yet staged is skipped).
# grep: -I skips binary files, -i ignores case, -E extended regexes (GNU \b), -n -H file:line.
files() { git ls-files -z | grep -zv "^${self}\$"; }
hits=$( {
  files | xargs -0 -r grep -s -n -H -I -i -E "${args[@]}" -- || true
} | sort -t: -k1,1 -k2,2n -u)
if [ -n "$hits" ]; then
  echo "check_words: lab-notebook words or links outside the repository:"
  echo "$hits"
  status=1
fi

leftovers=$(git ls-files -- docs | grep -E '\.(patch|diff|log)$' || true)
if [ -n "$leftovers" ]; then
  echo "check_words: experiment leftovers under docs/ (keep them in git history, not the tree):"
  echo "$leftovers"
  status=1
fi

[ "$status" -eq 0 ] && echo "check_words: clean ($(git ls-files | wc -l) tracked files)"
exit "$status"
