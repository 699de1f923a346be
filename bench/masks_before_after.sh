#!/bin/bash
# `rayseg masks` end to end, an earlier commit against the working tree: best of N, interleaved,
# the same venv for both (python -m rayseg in each checkout imports that checkout's rayseg).
#   bench/masks_before_after.sh REV ANNOTATIONS.json [ROUNDS]
# Prints one line per run; compare the best of each side. Outputs go to a temp folder.
set -u
rev=$1 annotations=$(realpath "$2") rounds=${3:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
work=$(mktemp -d)
git -C "$here" worktree add -q "$work/before" "$rev"
trap 'git -C "$here" worktree remove --force "$work/before"; rm -rf "$work"' EXIT
for round in $(seq "$rounds"); do
  for side in before after; do
    dir=$([ "$side" = before ] && echo "$work/before" || echo "$here")
    start=$(date +%s.%N)
    (cd "$dir" && "$py" -m rayseg masks --annotations "$annotations" --out "$work/$side-$round" \
      --num-cpus 2 > "$work/$side-$round.log" 2>&1)
    rc=$?
    echo "$side round $round rc=$rc $(echo "$(date +%s.%N) - $start" | bc) s" \
      "load=$(cut -d' ' -f1 /proc/loadavg)"
  done
done
