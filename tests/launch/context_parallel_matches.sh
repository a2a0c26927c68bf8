#!/usr/bin/env bash
# The README's context-parallel run: `mpirun -np 4 loom-train --set
# parallel.cp=4 --set parallel.cp_softmax=ring --set parallel.cp_linear=lasp2`
# on configs/default.textproto (pattern SLLS: ring on S layers, LASP-2 on L
# layers) trains to the losses of one process, and so does allgather + lasp1
# at cp=2 with dp=2: in f64 all 8 losses within 1e-10 relative; in f32 the
# first 5 within 1e-5 (after that AdamW amplifies the f32 rounding of the
# different summation orders: about 3e-5 at step 7, while f64 stays at 1e-14).
# Then the same layouts in f64 on packed text whose documents (paragraphs of
# Debian's license texts, through loom-prepare) start inside rows and inside
# the CP chunks: attention and lightning states reset at each document.
set -eu
bin=$1; src=$2
mpi=(mpirun --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
losses() { grep '"loss"' "$1/metrics.jsonl" | sed 's/.*"step": \([0-9]*\).*"loss": \([0-9.e+-]*\).*/\1 \2/'; }
python3 - "$work/paragraphs.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as out:
    for name in ["GPL-3", "Apache-2.0"]:
        for p in open("/usr/share/common-licenses/" + name).read().split("\n\n"):
            if p.strip():
                out.write(json.dumps({"text": p.strip()}) + "\n")
EOF
"$(dirname "$bin")/loom-prepare" --input "$work/paragraphs.jsonl" --input-format jsonl \
  --output-prefix "$work/paragraphs" >/dev/null
for data in recall text; do
for dtype in f64 f32; do
  [ "$data" = text ] && [ "$dtype" = f32 ] && continue
  steps=8; tol=1e-10
  [ "$dtype" = f32 ] && { steps=5; tol=1e-5; }
  config="$src/configs/default.textproto" extra=()
  [ "$data" = text ] && { config="$src/configs/tiny_text.textproto"; extra=(--set "data.paths[0].prefix=$work/paragraphs"
    --set train.seq_len=256 --set train.global_batch=8 --set train.micro_batch=4 --set train.eval_sequences=8
    --set checkpoint.every=0); }
  common=(--config "$config" --set train.steps=$steps --set optim.warmup_steps=2 --set train.micro_batch=32
          --set train.eval_sequences=64 --set train.log_every=4 --set train.dtype=$dtype "${extra[@]}")
  "$bin" "${common[@]}" --set train.run_dir="$work/one$data$dtype" | grep -E "step +$steps"
  "${mpi[@]}" -np 4 "$bin" "${common[@]}" --set train.run_dir="$work/cp4$data$dtype" --set parallel.cp=4 \
    --set parallel.cp_softmax=ring --set parallel.cp_linear=lasp2 | grep -E "ranks|step +$steps"
  "${mpi[@]}" -np 4 "$bin" "${common[@]}" --set train.run_dir="$work/cp2dp2$data$dtype" --set parallel.cp=2 \
    --set parallel.cp_softmax=allgather --set parallel.cp_linear=lasp1 | grep -E "ranks|step +$steps"
  for run in cp4 cp2dp2; do
    paste <(losses "$work/one$data$dtype") <(losses "$work/$run$data$dtype") | awk -v run="$run $dtype" -v tol=$tol -v want=$steps '
      { n++; d = $2 - $4; if (d < 0) d = -d; if ($1 != $3 || d > tol * $2) { print run ": step " $1 " loss " $2 " vs " $4; bad = 1 } }
      END { if (n != want) { print run ": " n " steps, want " want; bad = 1 }; exit bad }'
    echo "$run $dtype $data: $steps losses match one process within $tol"
  done
done
done
