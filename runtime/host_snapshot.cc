#include "runtime/host_snapshot.h"

namespace loom {

Tensor HostSnapshot::Copy(size_t slot, const Tensor& t) {
  if (slot >= slots_.size()) slots_.resize(slot + 1);
  Tensor& host = slots_[slot];
  if (!host.defined() || host.shape() != t.shape() || host.dtype() != t.dtype())
    host = t.device().is_cpu() ? Tensor::Empty(t.shape(), t.dtype()) : Tensor::PinnedEmpty(t.shape(), t.dtype());
  host.CopyFrom(t);
  return host;
}

int64_t HostSnapshot::bytes() const {
  int64_t n = 0;
  for (const Tensor& t : slots_) n += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
  return n;
}

}  // namespace loom
