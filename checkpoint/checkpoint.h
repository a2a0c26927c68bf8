// Checkpoints (DESIGN.md, Checkpoints): one directory per step,
//
//   <dir>/step_00000010/rank_00000.safetensors   the tensors' bytes: one file
//   <dir>/step_00000010/rank_00003.safetensors   per rank that holds a piece
//   <dir>/step_00000010/manifest.textproto       Manifest: step, data position,
//                                                config, RNG, per piece its
//                                                slice, file and XXH3
//   <dir>/latest                                 "step_00000010"
//
// A save is crash-safe: everything is written into step_<N>.tmp-<pid>/,
// fsynced, renamed to step_<N>/, and `latest` is replaced last, so at every
// instant `latest` names a complete checkpoint. A load trusts nothing: the
// header is checked against the file size, every piece against its
// checksum, and the pieces of a tensor must cover it exactly once. Loading
// hands back whole (global) tensors, whatever layout wrote them.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/manifest.pb.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace loom::checkpoint {

// The part of a global tensor that a rank writes, when not all of it: the
// rectangular slice [start, start + length) of a [global] tensor (a TP
// shard), and of that slice, in row-major order, the numel() elements of the
// piece's tensor from flat_start on (a ZeRO moment shard; 0 and all of
// them for a plain slice).
struct Piece {
  Shape global;
  std::vector<int64_t> start;
  Shape length;
  int64_t flat_start = 0;
};

struct NamedTensor {
  std::string name;  // e.g. "layers.0.attn.wq", "optim.m.layers.0.attn.wq"
  Tensor tensor;     // CPU, contiguous
  std::optional<Piece> piece = std::nullopt;  // none: the whole tensor
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

// A checkpoint written by several ranks (loom-train): world rank 0 calls
// BeginSave; every rank holding pieces calls WriteShard into the directory
// it made (SaveTempDir with rank 0's tag); rank 0 gathers the entries and
// calls EndSave. SaveCheckpoint is the three on one process.
//
// BeginSave: creates <dir>/step_<N>.tmp-<tag>/ (an old one is removed);
// `tag` is this process's id, which Prune spares.
absl::StatusOr<std::string> BeginSave(const std::string& dir, int64_t step, int64_t* tag);
std::string SaveTempDir(const std::string& dir, int64_t step, int64_t tag);
// Writes and fsyncs <tmp>/rank_<rank>.safetensors and returns the pieces'
// manifest entries (none and no file for no tensors). LOOM_FAULT
// tensor_write and before_fsync die here, on whichever rank writes.
absl::StatusOr<std::vector<TensorEntry>> WriteShard(const std::string& tmp, int rank,
                                                    const std::vector<NamedTensor>& tensors, int64_t step);
// With `shards` ok: writes the manifest (state's fields, `entries`, world
// size `world`), publishes the step as SaveCheckpoint does and prunes to
// `keep`. Otherwise, or on any error, removes `tmp` and returns the one-line
// message SaveCheckpoint describes.
absl::Status EndSave(const std::string& dir, const std::string& tmp, const CheckpointState& state,
                     const std::vector<TensorEntry>& entries, int world, int keep, const absl::Status& shards);

// Creates `dir` if needed and checks that a file can be made in it, so that
// a run learns at its start, not at its first save, that it cannot
// checkpoint: "checkpoint.dir <dir>: cannot create: Not a directory".
absl::Status PrepareCheckpointDir(const std::string& dir);

// Reads <step_dir>/manifest.textproto.
absl::StatusOr<Manifest> ReadManifest(const std::string& step_dir);

// Reads and validates a step directory into whole tensors (pieces put
// together, each read once from its shard); errors name the file and tensor:
// "<step_dir>/rank_00000.safetensors: tensor layers.0.attn.wq: checksum mismatch ...".
//
// A reader may want less (a rank resuming reads what it holds): `want`
// says per tensor name whether to read it and, with a region, only the
// pieces that meet the rectangle [start, start + length); the tensor handed
// back then holds the checkpoint's values there and unspecified ones
// elsewhere (every piece is still checked against the manifest, and the
// pieces read against their checksums).
struct Interest {
  bool read = true;
  std::vector<int64_t> start;  // empty: all of the tensor
  Shape length;
};
absl::StatusOr<CheckpointState> LoadCheckpoint(const std::string& step_dir,
                                               const std::function<Interest(const std::string&)>& want = nullptr);

// LoadCheckpoint's checks without keeping anything: tensors are read and
// hashed in pieces of at most 64 MiB.
absl::Status VerifyCheckpoint(const std::string& step_dir);

// A step directory as is, or a checkpoint directory through its `latest`.
absl::StatusOr<std::string> ResolveStepDir(const std::string& path);

// The newest step directory under `dir` that verifies: the one `latest`
// names, else the step_<N>/ directories newest first (unfinished
// *.tmp-* directories are never considered). Each that fails is appended to
// `skipped` (may be null) as "<path>: <error>". NotFound if there is no
// step directory, DataLoss if none of them verifies.
absl::StatusOr<std::string> FindLatestGoodCheckpoint(const std::string& dir, std::vector<std::string>* skipped);

}  // namespace loom::checkpoint
