#!/bin/bash
# loom-train --dry-run: prints parameters, FLOPs and memory per rank for the
# issue-9 GPU configs on a CPU machine, allocates nothing, writes no run dir,
# exits 0; a layout that does not fit the world is one line and exit 2.
set -u
bin=$1 src=$2
out=$(mktemp) && trap 'rm -f $out' EXIT
fail() { echo "FAIL: $*"; cat "$out"; exit 1; }

"$bin" --config "$src/configs/gpu_1b_softmax.textproto" --dry-run --set train.run_dir=/nonexistent/dry >"$out" 2>&1 \
  || fail "softmax dry run exited $?"
grep -q "parameters: 1.10B total, 968.98M without embeddings (1100048384, 968976384)" "$out" || fail "softmax parameters"
grep -q "FLOPs: 8.422e+09 per token" "$out" || fail "softmax FLOPs per token"
# bf16 on the GPU: f32 masters + bf16 matrix copies, f32 gradients and
# moments. The H100 measured a pool peak of 29,994 MiB (29.29 GiB) for this
# config (docs/gpu.md; the cross-entropy's bf16 gradients of 4 chunks
# included).
grep -Eq "^  0 +1100048384 +6.15 GiB +4.10 GiB +8.20 GiB +10.85 GiB .* 29.29 GiB" "$out" || fail "softmax memory row"
[ -e /nonexistent/dry ] && fail "dry run created the run dir"

"$bin" --config "$src/configs/gpu_1b_hybrid.textproto" --dry-run >"$out" 2>&1 || fail "hybrid dry run exited $?"
grep -q "model: LLLSLLLSLLLSLLLSLLLSLL" "$out" || fail "hybrid pattern"
grep -q "micro-batch 1 x 32768 tokens" "$out" || fail "hybrid context"
# Six recomputed lightning layers: 63.73 GiB (the H100 measured 65,262 MiB).
grep -Eq "^  0 +1296133184 .* 63.73 GiB" "$out" || fail "hybrid memory row"

# Eight ranks planned from one process: tp2 x pp2 x dp2 with ZeRO; two stage
# rows, each holding about half the layers' parameters over tp 2.
"$bin" --config "$src/configs/gpu_1b_softmax.textproto" --dry-run --world-size=8 --set parallel.tp=2 \
  --set parallel.pp=2 --set parallel.zero=1 --set model.layers=22 >"$out" 2>&1 || fail "8-rank dry run exited $?"
grep -q "layout: 8 ranks = tp2 cp1 dp2 pp2" "$out" || fail "8-rank layout"
[ "$(grep -Ec '^  [01] +[0-9]+ ' "$out")" = 2 ] || fail "two stage rows expected"

"$bin" --config "$src/configs/gpu_1b_softmax.textproto" --dry-run --world-size=3 --set parallel.tp=2 >"$out" 2>&1
rc=$?
[ $rc = 2 ] || fail "a layout that does not fit should exit 2, got $rc"
[ "$(wc -l <"$out")" = 1 ] || fail "one line of error expected"
# MoE + MoH on the CPU: the whole row. Weights, gradients and AdamW are what
# Model + ExpertDataParallel allocate, and 10.8 MiB of activations the peak
# the Tensor byte counter measures over a step of this config
# (tests/model/memory_estimate_test.cc checks both to the byte).
"$bin" --config "$src/configs/tiny_moe.textproto" --dry-run >"$out" 2>&1 || fail "MoE dry run exited $?"
grep -q "parameters: 251.9k total" "$out" || fail "MoE parameters"
grep -q "not planned" "$out" && fail "MoE models get a memory plan"
grep -Eq "^  0 +251872 +983.9 KiB +983.9 KiB +1.9 MiB +10.8 MiB +6.0 KiB +14.7 MiB$" "$out" || fail "MoE memory row"
grep -q "(MoE layers: 1024 expert rows per layer and micro-batch, T·top_k, dropless)" "$out" || fail "MoE rows line"
# The MoE + MoH GPU config (bf16, 16K tokens): the H100 measured a pool
# peak of 50,692 MiB (49.50 GiB) once the experts scale their rows by the
# gates and keep no [S, C] outputs (52,740 MiB before).
"$bin" --config "$src/configs/gpu_moe.textproto" --dry-run >"$out" 2>&1 || fail "GPU MoE dry run exited $?"
grep -Eq "^  0 +1666796288 .* 49.50 GiB$" "$out" || fail "GPU MoE memory row"
echo "dry run: ok"
