#!/usr/bin/env bash
# Fails (exit 1) when a tracked file holds lab-notebook vocabulary or points outside the
# repository, printing file:line:text for each hit:
#   numbered work periods and runs ("session 12", "sessions 3-11", "call 7", "calls 4"),
#   the vocabulary of a private remote-execution setup ("lease", "$OUT", "carry="),
#   links to design notes that are not in the repository ("../shared", "shared/design.md").
# Also fails when docs/ tracks experiment leftovers (.patch, .diff or .log files).
# Every file `git ls-files` lists is checked, except this script. Run from anywhere.
# The word patterns ignore case, except $OUT (a script's own $out is not the word).
set -euo pipefail
cd "$(dirname "$0")/../.."
self=tools/scripts/check_words.sh

if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "check_words: not a git work tree" >&2
  exit 2
fi

# Matched ignoring case.
patterns=(
  '\bsession [0-9]'
  '\bsessions? [0-9]+-[0-9]+'
  '\bcall [0-9]+\b'
  '\bcalls [0-9]'
  '\blease\b'
  '\.\./shared'
  'shared/(design|benchmarks|gpu)\.md'
  '\bcarry='
)
# Matched as written: a shell script's own lower-case $out is fine.
exact_patterns=(
  '\$OUT\b'
)
args=()
for p in "${patterns[@]}"; do args+=(-e "$p"); done
exact_args=()
for p in "${exact_patterns[@]}"; do exact_args+=(-e "$p"); done

status=0
# Tracked files that exist in the work tree (a file deleted but not yet staged is skipped).
# grep: -I skips binary files, -i ignores case, -E extended regexes (GNU \b), -n -H file:line.
files() { git ls-files -z | grep -zv "^${self}\$"; }
hits=$( {
  files | xargs -0 -r grep -s -n -H -I -i -E "${args[@]}" -- || true
  files | xargs -0 -r grep -s -n -H -I -E "${exact_args[@]}" -- || true
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
