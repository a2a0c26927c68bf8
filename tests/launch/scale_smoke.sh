#!/usr/bin/env bash
# launch/scale.sh's CPU smoke mode (LOOM_SCALE_SMOKE=1: configs/default
# at toy sizes, 2 ranks): every measurement's table is written, no run
# failed, and the longest-sequence search reaches its 256-token cap for each
# of the six context-parallel schemes. It measures nothing about scaling.
set -eu
bindir=$1; src=$2
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
cd "$src"
LOOM_SCALE_SMOKE=1 LOOM_BUILD="$(dirname "$bindir")" bash launch/scale.sh all "$out" >"$out/log" 2>&1 || {
  tail -20 "$out/log"; echo "FAIL: scale.sh exited non-zero"; exit 1; }
for t in cp dp tp longest; do
  [ -s "$out/${t}_smoke.md" ] || { tail -20 "$out/log"; echo "FAIL: no ${t}_smoke.md"; exit 1; }
done
if grep -q "failed" "$out"/cp_smoke.md "$out"/dp_smoke.md "$out"/tp_smoke.md; then
  grep "failed" "$out"/*_smoke.md; echo "FAIL: a run failed"; exit 1
fi
rows=$(grep -c '^| .* | 2 | 256 | ' "$out/longest_smoke.md" || true)
[ "$rows" = 6 ] || { cat "$out/longest_smoke.md"; echo "FAIL: $rows of 6 schemes reached 256 tokens"; exit 1; }
# Two counts (1 and 2 ranks) of each of the six cp schemes, efficiencies printed.
cp_rows=$(grep -cE '^\| .* \| [12] \| [0-9]+ \| [0-9.]+ \| [0-9.]+ \| ' "$out/cp_smoke.md" || true)
[ "$cp_rows" = 12 ] || { cat "$out/cp_smoke.md"; echo "FAIL: $cp_rows of 12 cp rows"; exit 1; }
echo "scale.sh smoke: cp, dp, tp and longest tables written; 6 schemes to 256 tokens"
