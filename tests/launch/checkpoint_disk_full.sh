#!/usr/bin/env bash
# A checkpoint that cannot be written is a clear error and costs nothing
# already saved. A 10-step run checkpoints at step 5 and is killed while
# writing step 10's (LOOM_FAULT), leaving a half-written temporary directory.
# The next run resumes under a file-size limit (ulimit -f: the honest
# stand-in for a full disk, needing no mount privileges and stopping root
# too), so its save at step 10 fails with EFBIG: loom-train must exit 1 (a
# message, not death by SIGXFSZ) with one line naming the file and the OS
# error, step 5 must still verify and stay `latest`, and no step-10
# directory may pass for a checkpoint. A third run must resume from step 5,
# clean the leftovers, and log the same losses as a run never interrupted.
# Last, a checkpoint.dir under a regular file (ENOTDIR) must fail the run
# before its first step, in one line.
set -u
train=$1; ckpt=$2; src=$3
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
small=(--config "$src/configs/default.textproto" --set model.hidden=32 --set model.heads=2 --set model.kv_heads=2
       --set train.global_batch=8 --set train.micro_batch=8 --set optim.warmup_steps=2 --set train.eval_every=0
       --set train.eval_sequences=8 --set train.log_every=10 --set checkpoint.every=5 --set checkpoint.keep=0)
fails=0; passes=0
check() {  # check "what" command...
  local what=$1; shift
  if "$@"; then passes=$((passes + 1)); else echo "FAIL: $what"; fails=$((fails + 1)); fi
}
losses() { grep '"loss"' "$1/metrics.jsonl" | sed 's/.*"step": \([0-9]*\),.*"loss": \([^,]*\),.*/\1 \2/'; }
ckdir=$tmp/run/checkpoints

"$train" "${small[@]}" --set train.steps=10 --set train.run_dir="$tmp/ref" >/dev/null 2>&1 || { echo "reference run failed"; exit 1; }
LOOM_FAULT=tensor_write LOOM_FAULT_STEP=10 "$train" "${small[@]}" --set train.steps=10 --set train.run_dir="$tmp/run" \
  >/dev/null 2>"$tmp/err1"
rc=$?
[ $rc -eq 77 ] && [ -d "$ckdir/step_00000005" ] || { echo "first run: exit $rc, wanted the injected crash (77)"; exit 1; }
check "the crash left no half-written step-10 temporary directory to test with" \
  [ -n "$(ls -d "$ckdir"/step_00000010.tmp-* 2>/dev/null)" ]
shard_kb=$(( $(stat -c %s "$ckdir/step_00000005/rank_00000.safetensors") / 1024 ))

# The disk "fills": no file may grow past half a shard. The limit holds for
# every file the process writes, so MPI is told to keep its own state off
# files (PMIx's shared-memory store and the shared-memory transport; a
# single rank needs neither): only the checkpoint meets the "full disk".
( ulimit -f $((shard_kb / 2))
  PMIX_MCA_gds=hash OMPI_MCA_btl=self exec "$train" "${small[@]}" --set train.steps=10 --set train.run_dir="$tmp/run" ) \
  >"$tmp/out2" 2>"$tmp/err2"
rc=$?
echo "save under ulimit -f $((shard_kb / 2)): exit $rc, stderr: $(cat "$tmp/err2")"
check "exit status $rc, wanted 1 (a message, not a signal)" [ $rc -eq 1 ]
check "stderr is not one line" [ "$(wc -l <"$tmp/err2")" -eq 1 ]
check "message does not name the shard and EFBIG" \
  grep -qE "step 10 not saved: $ckdir/step_00000010\.tmp-[0-9]+/rank_00000\.safetensors: write failed: File too large" "$tmp/err2"
check "message does not say what latest names" grep -qF "$ckdir/latest still names step_00000005" "$tmp/err2"
check "the step-5 checkpoint does not verify" "$ckpt" verify "$ckdir/step_00000005"
check "latest moved" [ "$(cat "$ckdir/latest")" = step_00000005 ]
check "a step-10 directory was published: $(ls "$ckdir")" [ ! -e "$ckdir/step_00000010" ]
check "the failed save did not remove its own temporary directory" [ "$(ls -d "$ckdir"/step_00000010.tmp-* | wc -l)" -eq 1 ]

"$train" "${small[@]}" --set train.steps=10 --set train.run_dir="$tmp/run" >"$tmp/out3" 2>&1
check "resumed run failed: $(tail -2 "$tmp/out3")" [ $? -eq 0 ]
check "did not resume from step 5" grep -qF "resumed from $ckdir/step_00000005 at step 5" "$tmp/out3"
check "temporary directories left after a good save: $(ls "$ckdir")" [ -z "$(ls -d "$ckdir"/*.tmp-* 2>/dev/null)" ]
check "step 10 does not verify after the resumed run" "$ckpt" verify "$ckdir/step_00000010"
if [ "$(losses "$tmp/ref")" == "$(losses "$tmp/run")" ]; then passes=$((passes + 1)); else
  echo "FAIL: losses differ from the uninterrupted run:"; diff <(losses "$tmp/ref") <(losses "$tmp/run") | head -6
  fails=$((fails + 1))
fi

# checkpoint.dir under a regular file: an error before the first step.
echo x >"$tmp/plain"
"$train" "${small[@]}" --set train.steps=10 --set train.run_dir="$tmp/enotdir" --set checkpoint.dir="$tmp/plain/ckpt" \
  >"$tmp/out4" 2>"$tmp/err4"
rc=$?
echo "checkpoint.dir under a file: exit $rc, stderr: $(cat "$tmp/err4")"
check "ENOTDIR: exit $rc" [ $rc -ne 0 ]
check "ENOTDIR: not one line naming the path and the error" \
  [ "$(cat "$tmp/err4")" = "loom-train: checkpoint.dir $tmp/plain/ckpt: cannot create: Not a directory" ]
check "ENOTDIR: the run trained before failing" [ -z "$(grep '"loss"' "$tmp/enotdir/metrics.jsonl" 2>/dev/null)" ]

# A read-only directory stops only non-root users (root ignores the mode bits).
if [ "$(id -u)" -ne 0 ]; then
  mkdir "$tmp/readonly" && chmod 555 "$tmp/readonly"
  "$train" "${small[@]}" --set train.run_dir="$tmp/ro" --set checkpoint.dir="$tmp/readonly" >/dev/null 2>"$tmp/err5"
  check "read-only: $(cat "$tmp/err5")" grep -qF "checkpoint.dir $tmp/readonly: cannot write: Permission denied" "$tmp/err5"
else
  echo "note: read-only directory case skipped as root"
fi
echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
