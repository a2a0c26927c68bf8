#!/usr/bin/env bash
# configs/tiny_moe.textproto (MoE MLPs, MoH attention in its R and H layers)
# trains: its loss falls, and the expert-load coefficient of variation after
# training (the mean over MoE layers of the last step's routing, as
# loom-train logs it) is lower with the load-balancing loss, and with bias
# balancing, than with neither. The MoH head loads reach the log and
# metrics.jsonl too.
set -eu
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1  # tiny matrices: threads only spin
bin=$1; src=$2
run_dir=$(mktemp -d); trap 'rm -rf "$run_dir"' EXIT

# train NAME --set ... : runs, keeps the log in $run_dir/NAME.log
train() {
  local name=$1; shift
  "$bin" --config "$src/configs/tiny_moe.textproto" --set train.run_dir="$run_dir/$name" "$@" \
    > "$run_dir/$name.log" 2>&1 || { cat "$run_dir/$name.log"; exit 1; }
}
first_loss() { grep -m1 -o 'loss [0-9.]*' "$run_dir/$1.log" | awk '{print $2}'; }
last_loss() { grep -o '| loss [0-9.]*' "$run_dir/$1.log" | tail -1 | awk '{print $3}'; }
# The last log step's CV of every MoE layer (3 layers), averaged.
final_cv() { grep 'moe layer' "$run_dir/$1.log" | tail -3 | sed 's/.* cv \([0-9.]*\).*/\1/' |
             awk '{ s += $1; n++ } END { printf "%.4f", s / n }'; }

train aux  # the config: aux_loss_coef 0.01
train none --set model.moe.aux_loss_coef=0
# γ = 0.005: with the MoH layers 0.01 overshoots (sign updates; CV 0.24 vs 0.13).
train bias --set model.moe.aux_loss_coef=0 --set model.moe.bias_balancing=true --set model.moe.bias_update_rate=0.005

for name in aux none bias; do
  echo "$name: loss $(first_loss $name) -> $(last_loss $name), final expert-load CV $(final_cv $name)"
done
grep 'moe layer' "$run_dir/aux.log" | tail -3
grep 'moh layer' "$run_dir/aux.log" | tail -2
[ "$(grep -c 'moh layer [02] ' "$run_dir/aux.log")" -ge 2 ] || { echo "no MoH head-load lines for layers 0 and 2"; exit 1; }
awk -v a="$(first_loss aux)" -v b="$(last_loss aux)" 'BEGIN { if (!(b < 0.7 * a)) { print "loss did not fall by 30%"; exit 1 } }'
awk -v a="$(final_cv aux)" -v b="$(final_cv none)" 'BEGIN { if (!(a < b)) { print "aux loss: CV " a " not below " b; exit 1 } }'
awk -v a="$(final_cv bias)" -v b="$(final_cv none)" 'BEGIN { if (!(a < b)) { print "bias balancing: CV " a " not below " b; exit 1 } }'
# The same statistics reach metrics.jsonl (and TensorBoard, with the same
# keys as tags): the last step's layer-0 CV equals the step log's.
cv_log=$(grep 'moe layer 0 ' "$run_dir/aux.log" | tail -1 | sed 's/.* cv \([0-9.]*\).*/\1/')
cv_json=$(tail -2 "$run_dir/aux/metrics.jsonl" | grep -o '"moe/layer0/load_cv": [0-9.e-]*' | awk '{print $2}')
[ -n "$cv_json" ] || { echo "metrics.jsonl has no moe/layer0/load_cv"; exit 1; }
awk -v a="$cv_log" -v b="$cv_json" 'BEGIN { if ((a - b) > 5e-5 || (b - a) > 5e-5) { print "CV log " a " vs jsonl " b; exit 1 } }'
cv_log=$(grep 'moh layer 2 ' "$run_dir/aux.log" | tail -1 | sed 's/.* cv \([0-9.]*\).*/\1/')
cv_json=$(tail -2 "$run_dir/aux/metrics.jsonl" | grep -o '"moh/layer2/load_cv": [0-9.e-]*' | awk '{print $2}')
[ -n "$cv_json" ] || { echo "metrics.jsonl has no moh/layer2/load_cv"; exit 1; }
awk -v a="$cv_log" -v b="$cv_json" 'BEGIN { if ((a - b) > 5e-5 || (b - a) > 5e-5) { print "MoH CV log " a " vs jsonl " b; exit 1 } }'
