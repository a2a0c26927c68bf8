// A trainable tensor and its gradient. Parameter gradients accumulate (+=)
// over micro-batches; the optimizer zeroes them after each step.
//
// Under tensor parallelism a parameter may hold a slice of its global
// tensor: split_dim is cut into `parts` equal pieces and this rank holds
// piece `part`. Initialisation draws every element from its global index,
// so the slices of all ranks together are the single-process tensor.
#pragma once

#include <string>
#include <vector>

#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace loom {

struct Param {
  std::string name;          // "layers.3.attn.wq": also the init RNG stream
  Tensor value;              // the master (f32 in training; f64 in checks)
  Tensor grad;               // same dtype as value, accumulated
  // bf16 runs on the GPU (docs/gpu.md): a bf16 copy of value that matmuls
  // and the embedding read, rewritten by each optimizer step; else undefined.
  Tensor compute;
  bool weight_decay = true;  // false for norms and biases
  Shape global_shape;        // the unsharded shape
  int split_dim = -1;        // dimension split over TP ranks; -1: replicated
  int64_t split_start = 0;   // first global index along split_dim held here

  bool sharded() const { return split_dim >= 0; }
  // What matmuls read: the compute copy if there is one, else the master.
  const Tensor& weight() const { return compute.defined() ? compute : value; }

  // Allocates value and grad ([shape], dtype), normal(0, std) from the
  // (seed, name) stream, or `fill` when std == 0.
  void Init(std::string param_name, const Shape& shape, DType dtype, uint64_t seed, double std, double fill = 0,
            bool decay = true) {
    InitSharded(std::move(param_name), shape, -1, 1, 0, dtype, seed, std, fill, decay);
  }

  // Piece `part` of `parts` along split_dim of a [global_shape] tensor (2-D
  // when split; split_dim -1 holds the whole tensor).
  void InitSharded(std::string param_name, const Shape& global, int dim, int parts, int part, DType dtype,
                   uint64_t seed, double std, double fill = 0, bool decay = true) {
    name = std::move(param_name);
    global_shape = global;
    split_dim = parts > 1 ? dim : -1;
    Shape local = global;
    if (split_dim >= 0) {
      LOOM_CHECK(global.size() == 2 && global[dim] % parts == 0, "[param] ", name, ": cannot split ",
                 ShapeString(global), " dim ", dim, " in ", parts);
      local[dim] = global[dim] / parts;
      split_start = local[dim] * part;
    }
    value = Tensor::Empty(local, dtype);
    if (std > 0) {
      const uint64_t key = RngKey(seed, name);
      if (split_dim == 1) {  // each local row is a piece of a global row
        for (int64_t r = 0; r < local[0]; ++r) {
          Tensor row = value.Slice(r, 1);
          FillNormal(row, key, std, static_cast<uint64_t>(r * global[1] + split_start));
        }
      } else {
        const int64_t row_elems = split_dim == 0 ? global[1] : 0;
        FillNormal(value, key, std, static_cast<uint64_t>(split_start * row_elems));
      }
    } else {
      value.Fill(fill);
    }
    grad = Tensor::Zeros(local, dtype);
    weight_decay = decay;
  }
};

using ParamList = std::vector<Param*>;

// Gives the matrices (2-D) of `params` that have no compute copy one, all in
// one `dtype` buffer on their device, in list order, each starting on a
// 256-byte boundary. So a layer's consecutive matrices whose sizes are
// multiples of 256 bytes sit back to back (an expert's w_gate then w_up:
// one GEMM reads the pair as one [2F, C] matrix, ops/grouped_linear.h).
// The values are not converted here.
inline void AllocateComputeCopies(const ParamList& params, DType dtype) {
  const int64_t align = 256 / static_cast<int64_t>(DTypeSize(dtype));
  auto wants = [](const Param* p) { return p->value.ndim() == 2 && !p->compute.defined(); };
  auto padded = [&](const Param* p) { return (p->value.numel() + align - 1) / align * align; };
  int64_t total = 0;
  for (const Param* p : params)
    if (wants(p)) total += padded(p);
  if (total == 0) return;
  Tensor buffer = Tensor::Empty({total}, dtype, params.front()->value.device());
  int64_t at = 0;
  for (Param* p : params) {
    if (!wants(p)) continue;
    p->compute = buffer.Slice(at, p->value.numel()).Reshape(p->value.shape());
    at += padded(p);
  }
}

}  // namespace loom
