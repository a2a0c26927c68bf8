#!/usr/bin/env bash
# loom-train on bad input: non-zero exit, one line naming the file or field,
# no crash (exit codes above 128 are signals), no stack trace.
set -u
bin=$1; src=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fails=0; passes=0
expect_error() {  # expect_error "substring" args...
  local want=$1; shift
  "$bin" "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  local lines; lines=$(wc -l <"$tmp/err")
  if [ $rc -eq 0 ] || [ $rc -gt 128 ] || [ "$lines" -ne 1 ] || ! grep -qF -- "$want" "$tmp/err"; then
    echo "FAIL: loom-train $* -> rc $rc, stderr:"; cat "$tmp/err"; echo "(wanted one line containing: $want)"
    fails=$((fails + 1))
  else
    passes=$((passes + 1))
  fi
}
printf 'model { hidden: 64 heads: 4 }\nbogus_section { }\n' >"$tmp/unknown.textproto"
printf 'model { layers: "four" }\n' >"$tmp/type.textproto"
expect_error "missing.textproto: cannot open config file" --config "$tmp/missing.textproto"
expect_error "unknown.textproto:2:1" --config "$tmp/unknown.textproto"
expect_error "type.textproto:1" --config "$tmp/type.textproto"
expect_error "model.heads: 5 does not divide model.hidden = 128" --config "$src/configs/default.textproto" --set model.heads=5
expect_error "model.kv_heads: 3 does not divide model.heads = 4" --config "$src/configs/default.textproto" --set model.kv_heads=3
expect_error "model.pattern: 'Q' is not a layer kind" --config "$src/configs/default.textproto" --set model.pattern=LQS
expect_error "train.seq_len" --config "$src/configs/default.textproto" --set train.seq_len=1
expect_error "need parallel.cp = 1; dropless routing" --config "$src/configs/tiny_moe.textproto" \
  --set model.moe.capacity_factor=1.25 --set parallel.cp=2
expect_error "train.deterministic: needs model.attention_backend = loom" --config "$src/configs/default.textproto" \
  --set train.deterministic=true --set model.attention_backend=cudnn
expect_error "--config FILE is required"
# --help lists loom-train's own flags (runtime/tool_flags.h), not "No flags matched".
"$bin" --help >"$tmp/help" 2>&1
for want in "launch/loom_train.cc" "--dry_run" "--export_oracle" "--peak_tflops"; do
  if grep -qF -- "$want" "$tmp/help"; then passes=$((passes + 1)); else
    echo "FAIL: loom-train --help lacks $want:"; head -5 "$tmp/help"; fails=$((fails + 1)); fi
done
echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
