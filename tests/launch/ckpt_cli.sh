#!/usr/bin/env bash
# loom-ckpt on bad input: usage errors exit 2, bad checkpoints exit 1, each
# with one line on stderr naming the problem and no crash (no exit > 128).
set -u
bin=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fails=0; passes=0
expect_error() {  # expect_error RC "substring" args...
  local want_rc=$1 want=$2; shift 2
  "$bin" "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  local lines; lines=$(wc -l <"$tmp/err")
  if [ $rc -ne "$want_rc" ] || [ "$lines" -ne 1 ] || ! grep -qF -- "$want" "$tmp/err"; then
    echo "FAIL: loom-ckpt $* -> rc $rc (wanted $want_rc), stderr:"; cat "$tmp/err"; echo "(wanted one line containing: $want)"
    fails=$((fails + 1))
  else
    passes=$((passes + 1))
  fi
}
mkdir -p "$tmp/empty" "$tmp/run/step_00000005"
echo step_00000005 >"$tmp/run/latest"
printf 'step: "five"\n' >"$tmp/run/step_00000005/manifest.textproto"
mkdir -p "$tmp/noshard/step_00000001"
printf 'step: 1\ntensors { name: "w" shape: 2 dtype: "f32" file: "rank_00000.safetensors" slice_start: 0 slice_length: 2 xxh3: 1 }\n' \
  >"$tmp/noshard/step_00000001/manifest.textproto"
printf 'garbage!garbage!' >"$tmp/noshard/step_00000001/rank_00000.safetensors"
expect_error 2 "usage: loom-ckpt inspect|verify"
expect_error 2 "usage: loom-ckpt inspect|verify" verify
expect_error 2 "unknown command 'frobnicate'" frobnicate "$tmp/empty"
expect_error 1 "missing: no such checkpoint directory" verify "$tmp/missing"
expect_error 1 "empty: not a checkpoint" verify "$tmp/empty"
expect_error 1 "empty: not a checkpoint" inspect "$tmp/empty"
expect_error 1 "step_00000005/manifest.textproto:1" verify "$tmp/run"
expect_error 1 "rank_00000.safetensors: header length" verify "$tmp/noshard/step_00000001"
# inspect reads only the manifest: it lists the tensor of a corrupt shard.
if "$bin" inspect "$tmp/noshard/step_00000001" | grep -q "^w .*\[2\] .*f32 .* 8 .* 1$"; then
  passes=$((passes + 1))
else
  echo "FAIL: inspect table:"; "$bin" inspect "$tmp/noshard/step_00000001"; fails=$((fails + 1))
fi
echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
