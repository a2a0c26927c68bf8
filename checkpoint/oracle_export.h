// What an outside replay of a Loom run needs (`loom-train --export_oracle`;
// bench/torch_oracle.py reads it, docs/oracle.md): the resolved model and
// optimizer, the initial weights, and every micro-batch trained on.
//
//   <dir>/config.json          resolved ModelDims, train and optim fields (the
//                              config's float fields printed as the doubles
//                              Loom computes with), the RoPE inv_freq table,
//                              each lightning layer's decays, the parameter
//                              list in Loom's order with shape and
//                              weight_decay
//   <dir>/init/step_00000000/  a checkpoint (checkpoint/checkpoint.h) of the
//                              global parameter values before step 1:
//                              rank_00000.safetensors, one tensor per Param
//                              by name, in the master dtype
//   <dir>/batches.bin          the micro-batches, in training order:
//
// batches.bin, little-endian:
//   header  8 bytes "LOOMBTCH", u32 version (1), u32 header bytes (16)
//   then one record per micro-batch:
//     i64 step         0-based optimizer step the micro-batch belongs to
//     i64 micro        its index in the step, 0 .. micros−1
//     i64 micros       micro-batches in the step
//     i64 rows         sequences in the micro-batch
//     i64 seq_len      tokens per row
//     i64 has_docs     1: doc_ids follow
//     i64 step_targets non-ignored targets of the whole step (the loss
//                      normaliser: the step's loss is Σ CE / step_targets)
//     f64 lr           learning rate Loom applies after this step
//     i32 tokens[rows·seq_len], i32 targets[rows·seq_len] (−100: no loss),
//     i32 positions[rows·seq_len] (RoPE), i32 cu_seqlens[rows+1],
//     i32 doc_ids[rows·seq_len] if has_docs (non-decreasing within a row;
//     tokens of different documents never interact)
//
// One process only (the weights are the process's Params, which are global
// tensors only without tp/pp), and only a run that starts at step 0.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "configs/loom.pb.h"
#include "model/batch.h"
#include "model/dims.h"
#include "model/param.h"
#include "runtime/status.h"

namespace loom::checkpoint {

class OracleExport {
 public:
  // Writes config.json and init/ into `dir` (created) and opens
  // batches.bin. `world` ranks and a `start_step` other than 0 are refused.
  static absl::StatusOr<std::unique_ptr<OracleExport>> Start(const std::string& dir, const config::Config& config,
                                                             const ModelDims& dims, const ParamList& params,
                                                             int world, int64_t start_step);
  ~OracleExport();

  // Appends step `step`'s micro-batches and flushes.
  absl::Status WriteStep(int64_t step, const std::vector<Batch>& micro_batches);

 private:
  OracleExport() = default;
  config::Config config_;
  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace loom::checkpoint
