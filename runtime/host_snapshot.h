// Host copies of the same tensors taken again and again (a checkpoint's
// snapshot, every save). Slot i keeps its host tensor from one copy to the
// next while the shape and dtype stay, so a copy touches no fresh pages;
// copies of GPU tensors land in page-locked memory, which the copy engine
// fills at the link's speed. (gpu_1b_softmax's 13 GB snapshot into fresh
// pageable tensors ran at 0.76 GB/s on an H100: 17 s a save.)
//
// A slot's tensor is handed out, not copied: the caller must be done with
// the previous copy (a checkpoint written) before taking the next.
#pragma once

#include <vector>

#include "runtime/tensor.h"

namespace loom {

class HostSnapshot {
 public:
  // A host copy of `t` (any device) in slot `slot`, complete on return.
  Tensor Copy(size_t slot, const Tensor& t);
  // Bytes held in the slots.
  int64_t bytes() const;

 private:
  std::vector<Tensor> slots_;
};

}  // namespace loom
