// What an attention layer needs to know of its context-parallel group: the
// group and the schemes for softmax and linear layers (parallel/
// cp_attention.h, parallel/cp_lightning.h). The micro-batch carries the
// zig-zag layout of its tokens (Batch::cp_chunks). Size 1: no CP.
#pragma once

#include "parallel/cp_attention.h"
#include "parallel/cp_lightning.h"

namespace loom {

struct ContextParallel {
  Communicator* comm = nullptr;  // null when size == 1
  int rank = 0;
  int size = 1;
  CpAttentionOptions softmax;
  CpLightningOptions linear;
};

}  // namespace loom
