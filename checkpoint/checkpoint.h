// Checkpoints (DESIGN.md, Checkpoints): one directory per step,
//
//   <dir>/step_00000010/rank_00000.safetensors   the tensors' bytes
//   <dir>/step_00000010/manifest.textproto       Manifest: step, data position,
//                                                config, RNG, per-tensor XXH3
//   <dir>/latest                                 "step_00000010"
//
// A save is crash-safe: everything is written into step_<N>.tmp-<pid>/,
// fsynced, renamed to step_<N>/, and `latest` is replaced last, so at every
// instant `latest` names a complete checkpoint. A load trusts nothing: the
// header is checked against the file size and every tensor against its
// checksum. One rank, whole tensors for now (slices are recorded so a later
// loader can reshard).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "checkpoint/manifest.pb.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace loom::checkpoint {

struct NamedTensor {
  std::string name;  // e.g. "layers.0.attn.wq", "optim.m.layers.0.attn.wq"
  Tensor tensor;     // CPU, contiguous
};

struct CheckpointState {
  int64_t step = 0;         // optimizer steps completed
  int64_t data_tokens = 0;  // tokens consumed (the data position)
  std::string config_text;  // resolved config, text proto
  std::map<std::string, uint64_t> rng;  // stream name -> counter reached
  std::vector<NamedTensor> tensors;
};

// "step_00000010".
std::string StepDirName(int64_t step);

// Writes `state` as <dir>/step_<N>/ and points <dir>/latest at it, then
// deletes all but the newest `keep` step directories (keep <= 0 keeps all;
// the one just written is always kept). An existing step_<N>/ is replaced.
// On error, earlier checkpoints and `latest` are untouched, the unfinished
// step directory is removed, and the message is one line: the file and the
// OS error, then what `latest` still names ("[checkpoint] step 10 not saved:
// <dir>/step_00000010.tmp-123/rank_00000.safetensors: write failed: File too
// large; <dir>/latest still names step_00000005").
//
// Tests inject crashes with env LOOM_FAULT = tensor_write (half the tensor
// bytes written) | before_fsync | before_rename | before_latest: the process
// calls std::_Exit(77) at that point.
// With LOOM_FAULT_STEP=N as well, only the save of step N dies.
absl::Status SaveCheckpoint(const std::string& dir, const CheckpointState& state, int keep);

// Creates `dir` if needed and checks that a file can be made in it, so that
// a run learns at its start, not at its first save, that it cannot
// checkpoint: "checkpoint.dir <dir>: cannot create: Not a directory".
absl::Status PrepareCheckpointDir(const std::string& dir);

// Reads <step_dir>/manifest.textproto.
absl::StatusOr<Manifest> ReadManifest(const std::string& step_dir);

// Reads and validates a step directory, each tensor read once from its
// shard straight into the tensor kept; errors name the file and tensor:
// "<step_dir>/rank_00000.safetensors: tensor layers.0.attn.wq: checksum mismatch ...".
absl::StatusOr<CheckpointState> LoadCheckpoint(const std::string& step_dir);

// LoadCheckpoint's checks without keeping anything: tensors are read and
// hashed in pieces of at most 64 MiB.
absl::Status VerifyCheckpoint(const std::string& step_dir);

// A step directory as is, or a checkpoint directory through its `latest`.
absl::StatusOr<std::string> ResolveStepDir(const std::string& path);

// The newest step directory under `dir` that verifies: the one `latest`
// names, else the step_<N>/ directories newest first (unfinished
// *.tmp-* directories are never considered). Each that fails is appended to
// `skipped` (may be null) as "<path>: <error>". NotFound if none verifies.
absl::StatusOr<std::string> FindLatestGoodCheckpoint(const std::string& dir, std::vector<std::string>* skipped);

}  // namespace loom::checkpoint
