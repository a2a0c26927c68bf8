#!/usr/bin/env bash
# Progressive length (train.stages, launch/stages.h): a two-stage run, 1K
# tokens at cp=1 (dp=4), then 4K at cp=4 (dp=1), on 4 ranks, on the needle
# task. Run "through" passes the stage boundary in one go; run "restart" is
# stopped at the boundary (a config with the first stage only, checkpointing
# at its end) and restarted with both stages from that checkpoint. Both must
# log the same losses for all steps (within 1e-6 relative; the paths compute
# the same, so in practice bit for bit), the second stage must run at cp=4
# dp=1 with 1 sequence of 4096 tokens per step, continue the data stream at
# token 4 steps x 4096 = 16384, and the boundary checkpoint must record that
# data position.
set -eu
bin=$1
mpi=(mpirun --oversubscribe --allow-run-as-root -np 4 -x OMP_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
stage1='stages { seq_len: 1024 cp: 1 steps: 4 }'
stage2='stages { seq_len: 4096 cp: 4 steps: 4 lr_scale: 0.5 }'
write_config() {  # file, stages
  cat > "$1" <<EOC
model { pattern: "SL" layers: 2 hidden: 32 heads: 2 kv_heads: 2 vocab: 64 }
data { task: "needle" needle { needles: 2 key_vocab: 8 value_vocab: 8 filler_vocab: 16 } }
train { global_batch: 4 micro_batch: 2 seed: 7 log_every: 1 eval_sequences: 4 $2 }
optim { lr: 3e-3 warmup_steps: 2 }
EOC
}
write_config "$work/both.textproto" "$stage1 $stage2"
write_config "$work/first.textproto" "$stage1"

"${mpi[@]}" "$bin" --config "$work/both.textproto" --set train.run_dir="$work/through" > "$work/through.log"
grep -E "^stage|checkpoint|resumed" "$work/through.log"
"${mpi[@]}" "$bin" --config "$work/first.textproto" --set train.run_dir="$work/restart" --set checkpoint.every=4 \
  > "$work/first.log"
"${mpi[@]}" "$bin" --config "$work/both.textproto" --set train.run_dir="$work/restart" > "$work/restart.log"
grep -E "^stage|resumed" "$work/restart.log"

grep -q "stage 2 of 2: steps 5-8, seq_len 4096, cp 4, dp 1, lr 0.0015, data from token 16384" "$work/through.log" ||
  { echo "stage 2 of the run through is not 4K at cp 4, dp 1 from token 16384"; exit 1; }
grep -q "ranks: 4 = tp1 cp4 dp1" "$work/restart.log" || { echo "the restarted stage 2 is not at cp 4"; exit 1; }
grep -q "stage 1 of 2" "$work/restart.log" && { echo "the restart trained stage 1 again"; exit 1; }
grep -q "data_tokens: 16384" "$work/restart/checkpoints/step_00000004/manifest.textproto" ||
  { echo "the boundary checkpoint does not record data position 16384"; exit 1; }

losses() { grep '"loss"' "$1/metrics.jsonl" | sed 's/.*"step": \([0-9]*\).*"loss": \([0-9.e+-]*\).*/\1 \2/'; }
paste <(losses "$work/through") <(losses "$work/restart") | awk '
  { n++; d = $2 - $4; if (d < 0) d = -d
    if ($1 != $3 || d > 1e-6 * ($2 < 0 ? -$2 : $2)) { print "step " $1 " loss " $2 " vs restarted step " $3 " loss " $4 " (tolerance 1e-6 relative)"; bad = 1 } }
  END { if (n != 8) { print n " steps logged, want 8"; bad = 1 }; exit bad }'
echo "8 losses of the restarted two-stage run match the run through the boundary"
