// cuDNN's fused SDPA as Loom's second attention backend, through the cuDNN 9
// backend (descriptor) API: there is no cudnn-frontend here, so this file
// spells out the operation graph that cuDNN's flash-attention engines
// recognise, node by node (the same graph cudnn-frontend's SDPA node
// lowers to):
//   forward   S = Q Kᵀ (f32) · scale; causal: S = select(row − shift ≥ col, S, −∞)
//             M = rowmax S, E = exp(S − M), Z = rowsum E, stats = M + log Z,
//             O = (E / Z) V
//   backward  Δ = rowsum(dO ⊙ O), P = exp(scale·Q Kᵀ (masked) − stats),
//             dV = Pᵀ dO, dP = dO Vᵀ, dS = scale · (dP − Δ) ⊙ P,
//             dQ = dS K (f32 accumulator), dK = dSᵀ Q (GQA: dK, dV summed
//             over the query heads of a group)
// Layout: Loom's token-major [T, H, D] rows of uniform length S are the
// strided 4-D tensors [B, H, S, D] with strides (S·H·D, D, H·D, 1); stats are
// cuDNN's packed [B, H, S, 1] f32, transposed to and from Loom's lse [T, H].
// Documents inside rows (and varlen rows) are ragged: each document is one
// of B sequences of at most S tokens, its tensors located by per-sequence
// element offsets (CUDNN_ATTR_TENSOR_RAGGED_OFFSET_DESC) and bounded by
// per-sequence lengths, which mask the scores (row < len_q and col < len_kv,
// before the causal mask) and limit every matmul (its M/N/K overrides), as
// cudnn-frontend's padding mask with ragged offsets lowers. The stats are
// then Loom's lse itself: [B, H, S, 1] with strides (H·S, 1, H, 1) and
// offsets start·H. B and S are rounded up to powers of two, the extra
// sequences of length 0, so that a run builds few plans.
// Plans are built once per shape and cached (building one takes tens of ms).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <cmath>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "ops/softmax_attention.h"
#include "runtime/cuda_check.h"

#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace loom::ops::cuda {
namespace {

// Graph building reports failure (the engines may not support a shape);
// execution failures are broken invariants.
struct CudnnError {
  std::string message;
};

void Ok(cudnnStatus_t status, const char* what) {
  if (status == CUDNN_STATUS_SUCCESS) return;
  char detail[1024] = {0};
  cudnnGetLastErrorString(detail, sizeof(detail));
  throw CudnnError{internal::StreamCat("[cudnn_attention] ", what, ": ", cudnnGetErrorString(status), " ", detail)};
}

// One backend descriptor, destroyed with its owner.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) { Ok(cudnnBackendCreateDescriptor(type, &d_), "create descriptor"); }
  ~Desc() { cudnnBackendDestroyDescriptor(d_); }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  cudnnBackendDescriptor_t get() const { return d_; }
  template <typename T>
  Desc& Set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, const T& value, const char* what) {
    Ok(cudnnBackendSetAttribute(d_, name, type, 1, &value), what);
    return *this;
  }
  Desc& SetDesc(cudnnBackendAttributeName_t name, const Desc& other, const char* what) {
    cudnnBackendDescriptor_t o = other.get();
    Ok(cudnnBackendSetAttribute(d_, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &o), what);
    return *this;
  }
  void Finalize(const char* what) { Ok(cudnnBackendFinalize(d_), what); }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};
using DescPtr = std::shared_ptr<Desc>;

// Unique ids of the tensors a caller binds.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kNegInf, kShift, kDO, kDQ, kDK, kDV, kOne, kDelta, kDQAccum,
  kSeqQ, kSeqKV, kQOffsets, kKOffsets, kStatsOffsets, kDKHeads, kDVHeads, kLengthNegInf,
  kVirtual = 100,
};

// A graph under construction: its tensors and operations stay alive with it.
class Graph {
 public:
  explicit Graph(cudnnHandle_t handle) : handle_(handle) {}

  // `ragged`: the tensor of its sequences' element offsets (ragged graphs).
  DescPtr Tensor(std::vector<int64_t> dims, std::vector<int64_t> strides, cudnnDataType_t type, int64_t uid,
                 bool is_virtual, bool by_value = false, const DescPtr& ragged = nullptr) {
    auto t = Keep(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    Ok(cudnnBackendSetAttribute(t->get(), CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type), "tensor type");
    Ok(cudnnBackendSetAttribute(t->get(), CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, dims.size(), dims.data()),
       "tensor dims");
    Ok(cudnnBackendSetAttribute(t->get(), CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, strides.size(),
                                strides.data()),
       "tensor strides");
    if (uid == kVirtual) uid = next_virtual_++;
    t->Set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, uid, "tensor uid");
    t->Set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, int64_t{16}, "tensor alignment");
    t->Set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, is_virtual, "tensor virtual");
    if (by_value) t->Set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, true, "tensor by value");
    if (ragged) t->SetDesc(CUDNN_ATTR_TENSOR_RAGGED_OFFSET_DESC, *ragged, "tensor ragged offsets");
    t->Finalize("tensor");
    return t;
  }
  // A virtual f32 tensor, packed.
  DescPtr Virtual(std::vector<int64_t> dims, cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    return Tensor(dims, Packed(dims), type, kVirtual, true);
  }
  static std::vector<int64_t> Packed(const std::vector<int64_t>& dims) {
    std::vector<int64_t> s(dims.size(), 1);
    for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i) s[i] = s[i + 1] * dims[i + 1];
    return s;
  }

  // C = A B; in ragged graphs the sequence lengths that bound M, N or K
  // (per batch entry) and a padding value of 0.
  struct Bounds {
    DescPtr m, n, k;
  };
  void Matmul(const DescPtr& a, const DescPtr& b, const DescPtr& c, const Bounds& bounds = {}) {
    auto m = Keep(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    m->Set(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT, "matmul comp type");
    const bool bounded = bounds.m || bounds.n || bounds.k;
    if (bounded) m->Set(CUDNN_ATTR_MATMUL_PADDING_VALUE, CUDNN_TYPE_DOUBLE, 0.0, "matmul padding value");
    m->Finalize("matmul");
    auto op = Keep(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op->SetDesc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, *a, "matmul a")
        .SetDesc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, *b, "matmul b")
        .SetDesc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, *c, "matmul c")
        .SetDesc(CUDNN_ATTR_OPERATION_MATMUL_DESC, *m, "matmul desc");
    if (bounds.m) op->SetDesc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, *bounds.m, "matmul m override");
    if (bounds.n) op->SetDesc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, *bounds.n, "matmul n override");
    if (bounds.k) op->SetDesc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, *bounds.k, "matmul k override");
    op->Finalize("matmul op");
    ops_.push_back(op);
  }
  // y = mode(x[, b[, t]]); axis for GEN_INDEX.
  void Pointwise(cudnnPointwiseMode_t mode, const DescPtr& x, const DescPtr& b, const DescPtr& t, const DescPtr& y,
                 int64_t axis = -1, cudnnDataType_t precision = CUDNN_DATA_FLOAT) {
    auto pw = Keep(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw->Set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, mode, "pointwise mode");
    pw->Set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, precision, "pointwise precision");
    if (axis >= 0) pw->Set(CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, axis, "pointwise axis");
    pw->Finalize("pointwise");
    auto op = Keep(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op->SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, *pw, "pointwise desc");
    op->SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, *x, "pointwise x");
    if (b) op->SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b, "pointwise b");
    if (t) op->SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t, "pointwise t");
    op->SetDesc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, *y, "pointwise y");
    op->Finalize("pointwise op");
    ops_.push_back(op);
  }
  void Reduction(cudnnReduceTensorOp_t mode, const DescPtr& x, const DescPtr& y) {
    auto r = Keep(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    r->Set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, mode, "reduction mode");
    r->Set(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT, "reduction type");
    r->Finalize("reduction");
    auto op = Keep(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op->SetDesc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, *x, "reduction x")
        .SetDesc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, *y, "reduction y")
        .SetDesc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, *r, "reduction desc");
    op->Finalize("reduction op");
    ops_.push_back(op);
  }
  // y = x viewed with other strides (a transpose), as cudnn-frontend's
  // reshape node does for Pᵀ and dSᵀ.
  void Reshape(const DescPtr& x, const DescPtr& y) {
    auto op = Keep(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op->SetDesc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, *x, "reshape x").SetDesc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, *y,
                                                                               "reshape y");
    op->Finalize("reshape op");
    ops_.push_back(op);
  }

  // The operation graph, then the first engine configuration (heuristics
  // mode A, then the fallback list) that finalises into a plan.
  void Build() {
    graph_ = Keep(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    std::vector<cudnnBackendDescriptor_t> ops;
    for (auto& op : ops_) ops.push_back(op->get());
    Ok(cudnnBackendSetAttribute(graph_->get(), CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                ops.size(), ops.data()),
       "graph ops");
    graph_->Set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, handle_, "graph handle");
    graph_->Finalize("operation graph");
    std::string errors;
    for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
      try {
        Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
        heur.SetDesc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, *graph_, "heuristics graph");
        heur.Set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, mode, "heuristics mode");
        heur.Finalize("heuristics");
        int64_t count = 0;
        Ok(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count,
                                    nullptr),
           "heuristics count");
        std::vector<DescPtr> configs;
        std::vector<cudnnBackendDescriptor_t> raw;
        for (int64_t i = 0; i < count; ++i) {
          configs.push_back(std::make_shared<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
          raw.push_back(configs.back()->get());
        }
        int64_t got = 0;
        Ok(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count,
                                    &got, raw.data()),
           "heuristics results");
        for (int64_t i = 0; i < got; ++i) {
          try {
            auto plan = std::make_shared<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
            plan->Set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, handle_, "plan handle");
            plan->SetDesc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *configs[i], "plan config");
            plan->Finalize("execution plan");
            Ok(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
                                        nullptr, &workspace_),
               "plan workspace");
            plan_ = plan;
            keep_.insert(keep_.end(), configs.begin(), configs.end());
            return;
          } catch (const CudnnError& e) {
            errors += e.message + "; ";
          }
        }
        if (got == 0) errors += "no engine for heuristics mode " + std::to_string(mode) + "; ";
      } catch (const CudnnError& e) {
        errors += e.message + "; ";
      }
    }
    throw CudnnError{"[cudnn_attention] no engine runs this graph: " + errors};
  }

  void Execute(const std::vector<int64_t>& uids, const std::vector<void*>& ptrs, void* workspace) const {
    Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    Ok(cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, uids.size(),
                                uids.data()),
       "variant uids");
    Ok(cudnnBackendSetAttribute(pack.get(), CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, ptrs.size(),
                                ptrs.data()),
       "variant pointers");
    pack.Set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, workspace, "variant workspace");
    pack.Finalize("variant pack");
    Ok(cudnnBackendExecute(handle_, plan_->get(), pack.get()), "execute");
  }
  int64_t workspace() const { return workspace_; }

 private:
  DescPtr Keep(cudnnBackendDescriptorType_t type) {
    keep_.push_back(std::make_shared<Desc>(type));
    return keep_.back();
  }
  cudnnHandle_t handle_;
  std::vector<DescPtr> keep_, ops_;
  DescPtr graph_, plan_;
  int64_t next_virtual_ = kVirtual;
  int64_t workspace_ = 0;
};

// b sequences of at most sq (= sk) tokens when ragged.
struct Shape4 {
  int64_t b, hq, hk, sq, sk, d;
  bool causal;
  int64_t shift;
  bool backward;
  bool ragged;
  auto key() const { return std::make_tuple(b, hq, hk, sq, sk, d, causal, shift, backward, ragged); }
  bool operator<(const Shape4& o) const { return key() < o.key(); }
};

// Token-major [B·S, H, D] as [B, H, S, D].
std::vector<int64_t> TokenMajorStrides(int64_t h, int64_t s, int64_t d) { return {s * h * d, d, h * d, 1}; }

// A ragged graph's sequence lengths (i32 [B, 1, 1, 1], one tensor bound
// twice, as lengths of q and of kv) and element offsets (i64 [B+1, 1, 1, 1]:
// of tensors with Hq heads of D, with Hk heads of D, and of the stats);
// all null for a uniform batch.
struct Ragged {
  DescPtr len_q, len_kv, q_offsets, k_offsets, stats_offsets;
  Ragged(Graph& g, const Shape4& s) {
    if (!s.ragged) return;
    auto lengths = [&](int64_t uid) { return g.Tensor({s.b, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_INT32, uid, false); };
    auto offsets = [&](int64_t uid) {
      return g.Tensor({s.b + 1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_INT64, uid, false);
    };
    len_q = lengths(kSeqQ);
    len_kv = lengths(kSeqKV);
    q_offsets = offsets(kQOffsets);
    k_offsets = offsets(kKOffsets);
    stats_offsets = offsets(kStatsOffsets);
  }
  // The stats (and Δ) [B, Hq, S, 1]: packed, or Loom's lse layout [T, Hq].
  DescPtr Stats(Graph& g, const Shape4& s, int64_t uid) const {
    if (!s.ragged) return g.Tensor({s.b, s.hq, s.sq, 1}, {s.hq * s.sq, s.sq, 1, 1}, CUDNN_DATA_FLOAT, uid, false);
    return g.Tensor({s.b, s.hq, s.sq, 1}, {s.hq * s.sq, 1, s.hq, 1}, CUDNN_DATA_FLOAT, uid, false, false,
                    stats_offsets);
  }
};

// Masks scores x [B, Hq, Sq, Sk] to −∞ outside each sequence's length
// (rows past len_q, columns past len_kv); x itself for a uniform batch.
DescPtr LengthMask(Graph& g, const Shape4& s, const Ragged& ragged, const DescPtr& x) {
  if (!s.ragged) return x;
  const std::vector<int64_t> sdims{s.b, s.hq, s.sq, s.sk};
  auto row = g.Virtual(sdims, CUDNN_DATA_INT32);
  g.Pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, row, 2, CUDNN_DATA_INT32);
  auto col = g.Virtual(sdims, CUDNN_DATA_INT32);
  g.Pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, col, 3, CUDNN_DATA_INT32);
  auto row_in = g.Virtual(sdims, CUDNN_DATA_BOOLEAN);
  g.Pointwise(CUDNN_POINTWISE_CMP_LT, row, ragged.len_q, nullptr, row_in, -1, CUDNN_DATA_BOOLEAN);
  auto col_in = g.Virtual(sdims, CUDNN_DATA_BOOLEAN);
  g.Pointwise(CUDNN_POINTWISE_CMP_LT, col, ragged.len_kv, nullptr, col_in, -1, CUDNN_DATA_BOOLEAN);
  auto inside = g.Virtual(sdims, CUDNN_DATA_BOOLEAN);
  g.Pointwise(CUDNN_POINTWISE_LOGICAL_AND, row_in, col_in, nullptr, inside, -1, CUDNN_DATA_BOOLEAN);
  auto neg_inf = g.Tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, kLengthNegInf, false, true);
  auto masked = g.Virtual(sdims);
  g.Pointwise(CUDNN_POINTWISE_BINARY_SELECT, x, neg_inf, inside, masked);
  return masked;
}

// S = scale · Q Kᵀ with the masks applied; returns the masked scores. With
// `stats` (the backward's), S − stats: a ragged graph subtracts them before
// the masks, as cudnn-frontend does, a uniform one after them.
DescPtr Scores(Graph& g, const Shape4& s, const Ragged& ragged, const DescPtr& q, const DescPtr& k_t,
               const DescPtr& scale, const DescPtr& stats = nullptr) {
  const std::vector<int64_t> sdims{s.b, s.hq, s.sq, s.sk};
  auto raw = g.Virtual(sdims);
  g.Matmul(q, k_t, raw, {ragged.len_q, ragged.len_kv, nullptr});
  auto scaled = g.Virtual(sdims);
  g.Pointwise(CUDNN_POINTWISE_MUL, raw, scale, nullptr, scaled);
  auto minus_stats = [&](const DescPtr& x) {
    if (!stats) return x;
    auto centred = g.Virtual(sdims);
    g.Pointwise(CUDNN_POINTWISE_SUB, x, stats, nullptr, centred);
    return centred;
  };
  if (s.ragged) scaled = LengthMask(g, s, ragged, minus_stats(scaled));
  if (!s.causal) return s.ragged ? scaled : minus_stats(scaled);
  // visible iff row − shift ≥ col
  auto row = g.Virtual(sdims, CUDNN_DATA_INT32);
  g.Pointwise(CUDNN_POINTWISE_GEN_INDEX, scaled, nullptr, nullptr, row, 2);
  auto col = g.Virtual(sdims, CUDNN_DATA_INT32);
  g.Pointwise(CUDNN_POINTWISE_GEN_INDEX, scaled, nullptr, nullptr, col, 3);
  if (s.shift != 0) {
    auto shift = g.Tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_INT32, kShift, false, true);
    auto shifted = g.Virtual(sdims, CUDNN_DATA_INT32);
    g.Pointwise(CUDNN_POINTWISE_SUB, row, shift, nullptr, shifted);
    row = shifted;
  }
  auto visible = g.Virtual(sdims, CUDNN_DATA_BOOLEAN);
  g.Pointwise(CUDNN_POINTWISE_CMP_GE, row, col, nullptr, visible);
  auto neg_inf = g.Tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, kNegInf, false, true);
  auto masked = g.Virtual(sdims);
  g.Pointwise(CUDNN_POINTWISE_BINARY_SELECT, scaled, neg_inf, visible, masked);
  return s.ragged ? masked : minus_stats(masked);
}

std::unique_ptr<Graph> BuildForward(cudnnHandle_t handle, const Shape4& s) {
  auto g = std::make_unique<Graph>(handle);
  const Ragged ragged(*g, s);
  const auto bf16 = CUDNN_DATA_BFLOAT16;
  auto q = g->Tensor({s.b, s.hq, s.sq, s.d}, TokenMajorStrides(s.hq, s.sq, s.d), bf16, kQ, false, false,
                     ragged.q_offsets);
  // Kᵀ: [B, Hk, D, Sk] over K's memory.
  auto k_t = g->Tensor({s.b, s.hk, s.d, s.sk}, {s.sk * s.hk * s.d, s.d, 1, s.hk * s.d}, bf16, kK, false, false,
                       ragged.k_offsets);
  auto v = g->Tensor({s.b, s.hk, s.sk, s.d}, TokenMajorStrides(s.hk, s.sk, s.d), bf16, kV, false, false,
                     ragged.k_offsets);
  auto o = g->Tensor({s.b, s.hq, s.sq, s.d}, TokenMajorStrides(s.hq, s.sq, s.d), bf16, kO, false, false,
                     ragged.q_offsets);
  auto stats = ragged.Stats(*g, s, kStats);
  const std::vector<int64_t> sdims{s.b, s.hq, s.sq, s.sk}, rdims{s.b, s.hq, s.sq, 1};
  auto scale = g->Tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, kScale, false, true);
  auto scores = Scores(*g, s, ragged, q, k_t, scale);
  auto max = g->Virtual(rdims);
  g->Reduction(CUDNN_REDUCE_TENSOR_MAX, scores, max);
  auto centred = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_SUB, scores, max, nullptr, centred);
  auto e = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_EXP, centred, nullptr, nullptr, e);
  auto z = g->Virtual(rdims);
  g->Reduction(CUDNN_REDUCE_TENSOR_ADD, e, z);
  auto log_z = g->Virtual(rdims);
  g->Pointwise(CUDNN_POINTWISE_LOG, z, nullptr, nullptr, log_z);
  g->Pointwise(CUDNN_POINTWISE_ADD, max, log_z, nullptr, stats);
  // The P·V matmul needs A and B of one type (cuDNN 9.19: "A and B need to
  // have the same datatype"): P is rounded to bf16 like V.
  auto p = g->Virtual(sdims, CUDNN_DATA_BFLOAT16);
  g->Pointwise(CUDNN_POINTWISE_DIV, e, z, nullptr, p);
  g->Matmul(p, v, o, {ragged.len_q, nullptr, ragged.len_kv});
  g->Build();
  return g;
}

// The backward graph in the form cuDNN's fused SDPA backward engines match
// (the one cudnn-frontend's SDPA backward node lowers to). Besides the
// outputs, two intermediates live in memory the caller provides:
//   Δ       [B, Hq, Sq, 1] f32, written by the graph (non-virtual);
//   dQ_acc  [B, Hq, Sq, D] f32 packed, zero-filled before execution: the
//           engine accumulates dQ there over key blocks, and the identity
//           node rounds it into dQ.
// P and dS stay f32; the reshapes that transpose them for dV = Pᵀ dO and
// dK = dSᵀ Q round them to bf16. dQ = dS K reads K through a reshape of the
// Kᵀ tensor, not through a second tensor with K's uid. GQA: dK and dV are
// formed per query head and summed over each group by a reduction.
// (An earlier graph, with dQ written straight by the matmul, Δ virtual, K
// declared twice and bf16 P and dS, got an engine whose dQ kernel faulted
// with an illegal address; which difference mattered was not isolated.)
std::unique_ptr<Graph> BuildBackward(cudnnHandle_t handle, const Shape4& s) {
  auto g = std::make_unique<Graph>(handle);
  const Ragged ragged(*g, s);
  const auto bf16 = CUDNN_DATA_BFLOAT16;
  const auto qs = TokenMajorStrides(s.hq, s.sq, s.d), ks = TokenMajorStrides(s.hk, s.sk, s.d);
  const std::vector<int64_t> kt_strides{s.sk * s.hk * s.d, s.d, 1, s.hk * s.d};
  const std::vector<int64_t> qdims{s.b, s.hq, s.sq, s.d}, kdims{s.b, s.hk, s.sk, s.d}, kt_dims{s.b, s.hk, s.d, s.sk};
  auto q_like = [&](int64_t uid) { return g->Tensor(qdims, qs, bf16, uid, false, false, ragged.q_offsets); };
  auto q = q_like(kQ), o = q_like(kO), d_o = q_like(kDO), dq = q_like(kDQ);
  auto k_t = g->Tensor(kt_dims, kt_strides, bf16, kK, false, false, ragged.k_offsets);
  auto v_t = g->Tensor(kt_dims, kt_strides, bf16, kV, false, false, ragged.k_offsets);
  auto dk = g->Tensor(kdims, ks, bf16, kDK, false, false, ragged.k_offsets);
  auto dv = g->Tensor(kdims, ks, bf16, kDV, false, false, ragged.k_offsets);
  auto stats = ragged.Stats(*g, s, kStats);
  auto scale = g->Tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, kScale, false, true);
  auto one = g->Tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, kOne, false, true);
  const std::vector<int64_t> sdims{s.b, s.hq, s.sq, s.sk}, rdims{s.b, s.hq, s.sq, 1};
  const std::vector<int64_t> transposed{s.hq * s.sq * s.sk, s.sq * s.sk, 1, s.sk};  // [B, Hq, Sk, Sq] over S
  // M, N, K of the products: rows of S are queries, columns keys.
  const Graph::Bounds by_q_kv{ragged.len_q, ragged.len_kv, nullptr}, by_kv_q{ragged.len_kv, nullptr, ragged.len_q},
      by_q_over_kv{ragged.len_q, nullptr, ragged.len_kv};

  // Δ = rowsum(dO ⊙ O) · 1 (the factor is where dropout's 1 − p would go)
  auto do_o = g->Virtual(qdims);
  g->Pointwise(CUDNN_POINTWISE_MUL, d_o, o, nullptr, do_o);
  auto do_o_sum = g->Virtual(rdims);
  g->Reduction(CUDNN_REDUCE_TENSOR_ADD, do_o, do_o_sum);
  auto delta = s.ragged ? ragged.Stats(*g, s, kDelta)
                        : g->Tensor(rdims, Graph::Packed(rdims), CUDNN_DATA_FLOAT, kDelta, false);
  g->Pointwise(CUDNN_POINTWISE_MUL, do_o_sum, one, nullptr, delta);
  // P = exp(scale · Q Kᵀ (masked) − stats)
  auto centred = Scores(*g, s, ragged, q, k_t, scale, stats);
  auto p = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_EXP, centred, nullptr, nullptr, p);
  // dV = Pᵀ dO
  auto p_t = g->Tensor({s.b, s.hq, s.sk, s.sq}, transposed, bf16, kVirtual, true);
  g->Reshape(p, p_t);
  const bool gqa = s.hk != s.hq;
  // [B, Hq, Sk, D] bf16, summed over the group into dK or dV: virtual, or
  // in ragged graphs (as cudnn-frontend has them) in memory, token-major
  // with Hq heads, located by dK's offsets times the group size.
  auto per_head = [&](int64_t uid) {
    const std::vector<int64_t> dims{s.b, s.hq, s.sk, s.d};
    if (s.ragged) return g->Tensor(dims, TokenMajorStrides(s.hq, s.sk, s.d), bf16, uid, false, false, ragged.k_offsets);
    return g->Tensor(dims, Graph::Packed(dims), bf16, kVirtual, true);
  };
  if (gqa) {
    auto dv_heads = per_head(kDVHeads);
    g->Matmul(p_t, d_o, dv_heads, by_kv_q);
    g->Reduction(CUDNN_REDUCE_TENSOR_ADD, dv_heads, dv);
  } else {
    g->Matmul(p_t, d_o, dv, by_kv_q);
  }
  // dS = scale · (dO Vᵀ − Δ) ⊙ P
  auto dp = g->Virtual(sdims);
  g->Matmul(d_o, v_t, dp, by_q_kv);
  auto dp_centred = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_SUB, dp, delta, nullptr, dp_centred);
  auto ds_unscaled = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_MUL, dp_centred, p, nullptr, ds_unscaled);
  auto ds = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_MUL, ds_unscaled, scale, nullptr, ds);
  // dK = dSᵀ Q
  auto ds_t = g->Tensor({s.b, s.hq, s.sk, s.sq}, transposed, bf16, kVirtual, true);
  g->Reshape(ds, ds_t);
  if (gqa) {
    auto dk_heads = per_head(kDKHeads);
    g->Matmul(ds_t, q, dk_heads, by_kv_q);
    g->Reduction(CUDNN_REDUCE_TENSOR_ADD, dk_heads, dk);
  } else {
    g->Matmul(ds_t, q, dk, by_kv_q);
  }
  // dQ = dS K into the f32 accumulator, then rounded into dQ
  auto k = g->Tensor(kdims, ks, bf16, kVirtual, true, false, ragged.k_offsets);
  g->Reshape(k_t, k);
  auto dq_acc = s.ragged ? g->Tensor(qdims, qs, CUDNN_DATA_FLOAT, kDQAccum, false, false, ragged.q_offsets)
                         : g->Tensor(qdims, Graph::Packed(qdims), CUDNN_DATA_FLOAT, kDQAccum, false);
  g->Matmul(ds, k, dq_acc, by_q_over_kv);
  g->Pointwise(CUDNN_POINTWISE_IDENTITY, dq_acc, nullptr, nullptr, dq);
  g->Build();
  return g;
}

// One handle per device and a plan cache; cuDNN handles are not shared
// across threads here, so calls are serialised.
struct State {
  std::mutex mu;
  std::map<int, cudnnHandle_t> handles;
  std::map<std::pair<int, Shape4>, std::unique_ptr<Graph>> graphs;
  std::map<std::pair<int, Shape4>, std::string> failures;
};
State& GetState() {
  static State* state = new State;  // never destroyed: handles outlive static teardown order
  return *state;
}

// [B·S, H] <-> [B, H, S]
__global__ void LseToStatsKernel(const float* lse, int64_t s, int64_t h, int64_t n, float* stats) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // index into stats
  if (i >= n) return;
  const int64_t b = i / (h * s), hh = (i / s) % h, t = i % s;
  stats[i] = lse[(b * s + t) * h + hh];
}
__global__ void StatsToLseKernel(const float* stats, int64_t s, int64_t h, int64_t n, float* lse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // index into lse
  if (i >= n) return;
  const int64_t tok = i / h, hh = i % h, b = tok / s, t = tok % s;
  lse[i] = stats[(b * h + hh) * s + t];
}

// Whether the call's tokens are ragged sequences (documents inside rows, or
// rows of different lengths) rather than a uniform batch.
bool IsRagged(const CudaTokenRows& q_rows, const CudaTokenRows& k_rows) {
  return q_rows.doc_ids.defined() || k_rows.doc_ids.defined() || !q_rows.uniform || !k_rows.uniform;
}

// A power of two ≥ n and ≥ floor: ragged plans are built per (sequences,
// longest sequence), rounded so that a run needs few of them.
int64_t Bucket(int64_t n, int64_t floor) {
  int64_t b = floor;
  while (b < n) b *= 2;
  return b;
}

// A ragged call's sequence lengths (i32 [b]) and element offsets (i64
// [b+1]: of q-like tensors, k-like tensors and the stats) from the
// documents' token bounds cu [n+1]; sequences n..b−1 are empty, at the end.
__global__ void RaggedOffsetsKernel(const int32_t* cu, int64_t n, int64_t b, int64_t q_token, int64_t k_token,
                                    int64_t stats_token, int32_t* lengths, int64_t* q_off, int64_t* k_off,
                                    int64_t* stats_off) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i > b) return;
  const int64_t start = cu[i < n ? i : n];
  q_off[i] = start * q_token;
  k_off[i] = start * k_token;
  stats_off[i] = start * stats_token;
  if (i < b) lengths[i] = i < n ? cu[i + 1] - cu[i] : 0;
}

// What of the call the graphs below do not express ("" if nothing).
std::string UnsupportedFeature(const Tensor& q, const Tensor& k, const CudaTokenRows& q_rows,
                               const CudaTokenRows& k_rows, const AttentionOptions& options) {
  if (options.sigmoid) return "[cudnn_attention] sigmoid attention is Loom's kernel only (model.attention_backend = loom)";
  if (options.active.defined()) return "[cudnn_attention] MoH's active-head mask is Loom's kernel only";
  if (IsRagged(q_rows, k_rows)) {
    if (!(q_rows.doc_cu_seqlens.defined() && q_rows.doc_bounds == k_rows.doc_bounds &&
          q_rows.doc_bounds.back() == q.dim(0) && k.dim(0) == q.dim(0)))
      return "[cudnn_attention] documents inside rows and varlen rows run as ragged sequences only where the rows "
             "follow each other from token 0, cover q and k, and q and k have the same documents; other layouts are "
             "Loom's kernel only";
    if (options.k_offset != options.q_offset)
      return "[cudnn_attention] documents with q_offset != k_offset (context-parallel blocks) are Loom's kernel only";
    if (cudnnGetVersion() < 90600) return "[cudnn_attention] ragged sequences (documents inside rows) need cuDNN 9.6";
    return "";
  }
  if (!(q_rows.rows() == k_rows.rows() && q_rows.rows() > 0 && q_rows.rows() * q_rows.max_len == q.dim(0) &&
        k_rows.rows() * k_rows.max_len == k.dim(0)))
    return "[cudnn_attention] uniform rows must cover q and k";
  // Measured on the H100 (cuDNN 9.19): with the row index shifted before the
  // causal compare the engine runs but returns wrong statistics, so offsets
  // are refused rather than computed wrongly.
  if (options.causal && options.k_offset != options.q_offset)
    return "[cudnn_attention] causal masks with q_offset != k_offset (ring CP blocks) are Loom's kernel only "
           "(model.attention_backend = loom)";
  return "";
}

Shape4 CheckAndShape(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                     const CudaTokenRows& k_rows, const AttentionOptions& options, bool backward) {
  LOOM_CHECK(!q.device().is_cpu() && q.dtype() == DType::kBF16 && q.ndim() == 3 && k.ndim() == 3 &&
                 k.dtype() == DType::kBF16 && v.shape() == k.shape() && v.dtype() == DType::kBF16 &&
                 k.dim(2) == q.dim(2) && k.dim(1) > 0 && q.dim(1) % k.dim(1) == 0,
             "[cudnn_attention] q [Tq, Hq, D], k, v [Tk, Hk, D] bf16 on a CUDA device with Hk dividing Hq, got q ",
             ShapeString(q.shape()), " k ", ShapeString(k.shape()), " v ", ShapeString(v.shape()));
  const std::string why = UnsupportedFeature(q, k, q_rows, k_rows, options);
  LOOM_CHECK(why.empty(), why);
  Shape4 s{q_rows.rows(), q.dim(1), k.dim(1), q_rows.max_len, k_rows.max_len, q.dim(2), options.causal,
           options.k_offset - options.q_offset, backward, IsRagged(q_rows, k_rows)};
  if (!s.causal || s.ragged) s.shift = 0;
  if (s.ragged) {
    s.b = Bucket(static_cast<int64_t>(q_rows.doc_bounds.size()) - 1, 8);
    s.sq = s.sk = Bucket(q_rows.doc_max_len, 64);
  }
  return s;
}

// The cached graph for `s`, built on first use; throws CudnnError.
const Graph& GetGraph(int device, const Shape4& s) {
  State& st = GetState();
  auto key = std::make_pair(device, s);
  if (auto it = st.graphs.find(key); it != st.graphs.end()) return *it->second;
  if (auto it = st.failures.find(key); it != st.failures.end()) throw CudnnError{it->second};
  if (!st.handles.count(device)) {
    LOOM_CUDA_CHECK(cudaSetDevice(device));
    cudnnHandle_t h;
    Ok(cudnnCreate(&h), "cudnnCreate");
    st.handles[device] = h;
  }
  try {
    auto g = s.backward ? BuildBackward(st.handles[device], s) : BuildForward(st.handles[device], s);
    return *(st.graphs[key] = std::move(g));
  } catch (const CudnnError& e) {
    st.failures[key] = e.message;
    throw;
  }
}

// One execution of a cached graph: holds the state's lock, carves one
// stream-ordered scratch allocation into 256-byte-aligned pieces (the plan's
// workspace and, for ragged graphs, the sequence lengths and offsets, which
// it writes), and binds the by-value scalars.
class Call {
 public:
  Call(const Tensor& q, const Tensor& k, const CudaTokenRows& rows, const AttentionOptions& options, const Shape4& s,
       CudaStream stream)
      : lock_(GetState().mu), s_(s), stream_(static_cast<cudaStream_t>(stream)), rows_(rows) {
    State& st = GetState();
    const int device = q.device().index;
    LOOM_CUDA_CHECK(cudaSetDevice(device));
    try {
      graph_ = &GetGraph(device, s);
    } catch (const CudnnError& e) {
      LOOM_CHECK(false, e.message);
    }
    Ok(cudnnSetStream(st.handles[device], stream_), "set stream");
    scale_ = static_cast<float>(options.scale != 0 ? options.scale : 1.0 / std::sqrt(double(q.dim(2))));
    shift_ = static_cast<int32_t>(s.shift);
    q_token_ = q.dim(1) * q.dim(2);
    k_token_ = k.dim(1) * k.dim(2);
    workspace_ = Reserve(graph_->workspace());
    if (s.ragged) {
      lengths_ = Reserve(s.b * sizeof(int32_t));
      for (size_t& at : offsets_) at = Reserve((s.b + 1) * sizeof(int64_t));
    }
  }
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;
  ~Call() {
    if (base_) cudaFreeAsync(base_, stream_);
  }

  size_t Reserve(size_t bytes) {
    const size_t at = total_;
    total_ += (bytes + 255) / 256 * 256;
    return at;
  }
  void Allocate() {
    base_ = static_cast<char*>(CudaAllocAsync(std::max<size_t>(total_, 256), stream_));
    if (!s_.ragged) return;
    const int64_t n = static_cast<int64_t>(rows_.doc_bounds.size()) - 1;
    RaggedOffsetsKernel<<<(s_.b + 1 + 255) / 256, 256, 0, stream_>>>(
        rows_.doc_cu_seqlens.data<int32_t>(), n, s_.b, q_token_, k_token_, s_.hq,
        reinterpret_cast<int32_t*>(at(lengths_)), reinterpret_cast<int64_t*>(at(offsets_[0])),
        reinterpret_cast<int64_t*>(at(offsets_[1])), reinterpret_cast<int64_t*>(at(offsets_[2])));
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  char* at(size_t piece) const { return base_ + piece; }
  cudaStream_t stream() const { return stream_; }
  void Bind(int64_t uid, void* ptr) { uids_.push_back(uid), ptrs_.push_back(ptr); }

  void Execute() {
    Bind(kScale, &scale_);
    if (s_.backward) Bind(kOne, &one_);
    if (s_.causal) Bind(kNegInf, &neg_inf_);
    if (s_.causal && s_.shift != 0) Bind(kShift, &shift_);
    if (s_.ragged) {
      Bind(kSeqQ, at(lengths_)), Bind(kSeqKV, at(lengths_)), Bind(kLengthNegInf, &neg_inf_);
      Bind(kQOffsets, at(offsets_[0])), Bind(kKOffsets, at(offsets_[1])), Bind(kStatsOffsets, at(offsets_[2]));
    }
    try {
      graph_->Execute(uids_, ptrs_, at(workspace_));
    } catch (const CudnnError& e) {
      LOOM_CHECK(false, e.message);
    }
  }

 private:
  std::lock_guard<std::mutex> lock_;
  const Shape4 s_;
  cudaStream_t stream_;
  const CudaTokenRows& rows_;
  const Graph* graph_ = nullptr;
  float scale_ = 1, one_ = 1, neg_inf_ = -INFINITY;
  int32_t shift_ = 0;
  int64_t q_token_ = 0, k_token_ = 0;
  size_t total_ = 0, workspace_ = 0, lengths_ = 0, offsets_[3] = {0, 0, 0};  // offsets of q, k, stats
  char* base_ = nullptr;
  std::vector<int64_t> uids_;
  std::vector<void*> ptrs_;
};

}  // namespace


std::string CudnnAttentionUnsupported(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                                      const CudaTokenRows& k_rows, const AttentionOptions& options,
                                      bool with_backward) {
  if (std::string why = UnsupportedFeature(q, k, q_rows, k_rows, options); !why.empty()) return why;
  std::lock_guard<std::mutex> lock(GetState().mu);
  for (bool backward : {false, true}) {
    if (backward && !with_backward) break;
    try {
      GetGraph(q.device().index, CheckAndShape(q, k, v, q_rows, k_rows, options, backward));
    } catch (const CudnnError& e) {
      return std::string(backward ? "backward: " : "forward: ") + e.message;
    }
  }
  return "";
}

void CudnnAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                           const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse,
                           CudaStream stream) {
  const Shape4 s = CheckAndShape(q, k, v, q_rows, k_rows, options, false);
  LOOM_CHECK(o.shape() == q.shape() && o.dtype() == DType::kBF16 && o.device() == q.device(),
             "[cudnn_attention] o must be bf16 like q");
  LOOM_CHECK(lse.defined() && lse.shape() == (Shape{q.dim(0), q.dim(1)}) && lse.dtype() == DType::kF32 &&
                 lse.device() == q.device(),
             "[cudnn_attention] lse must be f32 [Tq, Hq] on q's device");
  Call call(q, k, q_rows, options, s, stream);
  const int64_t n = lse.numel();
  // Uniform batches: the stats [B, Hq, S] in scratch, transposed into lse.
  const size_t stats = s.ragged ? 0 : call.Reserve(n * sizeof(float));
  call.Allocate();
  float* stats_ptr = s.ragged ? lse.data<float>() : reinterpret_cast<float*>(call.at(stats));
  for (auto [uid, ptr] : {std::pair<Uid, void*>{kQ, q.raw()}, {kK, k.raw()}, {kV, v.raw()}, {kO, o.raw()},
                          {kStats, stats_ptr}})
    call.Bind(uid, ptr);
  call.Execute();
  if (!s.ragged) {
    StatsToLseKernel<<<(n + 255) / 256, 256, 0, call.stream()>>>(stats_ptr, s.sq, s.hq, n, lse.data<float>());
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
}

void CudnnAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                            const Tensor& d_o, const CudaTokenRows& q_rows, const CudaTokenRows& k_rows,
                            const AttentionOptions& options, Tensor& dq, Tensor& dk, Tensor& dv, CudaStream stream) {
  const Shape4 s = CheckAndShape(q, k, v, q_rows, k_rows, options, true);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&o, &d_o, &dq})
    LOOM_CHECK(t->shape() == q.shape() && t->dtype() == DType::kBF16 && t->device() == q.device(),
               "[cudnn_attention] o, d_o, dq must be bf16 like q");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dk, &dv})
    LOOM_CHECK(t->shape() == k.shape() && t->dtype() == DType::kBF16 && t->device() == q.device(),
               "[cudnn_attention] dk, dv must be bf16 like k");
  LOOM_CHECK(lse.defined() && lse.shape() == (Shape{q.dim(0), q.dim(1)}) && lse.dtype() == DType::kF32,
             "[cudnn_attention] lse must be f32 [Tq, Hq]");
  Call call(q, k, q_rows, options, s, stream);
  // Scratch: the stats (uniform batches: [B, Hq, S], from lse; ragged: lse
  // itself), Δ like the stats, the f32 dQ accumulator [T, Hq, D] (zeroed),
  // and in ragged GQA graphs dK and dV per query head [T, Hq, D] bf16.
  const int64_t n = lse.numel();
  const bool heads = s.ragged && s.hq != s.hk;
  const size_t stats = s.ragged ? 0 : call.Reserve(n * sizeof(float)), delta = call.Reserve(n * sizeof(float)),
               dq_acc = call.Reserve(q.numel() * sizeof(float)),
               dk_heads = heads ? call.Reserve(q.numel() * sizeof(uint16_t)) : 0,
               dv_heads = heads ? call.Reserve(q.numel() * sizeof(uint16_t)) : 0;
  call.Allocate();
  float* stats_ptr = s.ragged ? lse.data<float>() : reinterpret_cast<float*>(call.at(stats));
  LOOM_CUDA_CHECK(cudaMemsetAsync(call.at(dq_acc), 0, q.numel() * sizeof(float), call.stream()));
  if (!s.ragged) {
    LseToStatsKernel<<<(n + 255) / 256, 256, 0, call.stream()>>>(lse.data<float>(), s.sq, s.hq, n, stats_ptr);
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  for (auto [uid, ptr] : {std::pair<Uid, void*>{kQ, q.raw()}, {kK, k.raw()}, {kV, v.raw()}, {kO, o.raw()},
                          {kDO, d_o.raw()}, {kStats, stats_ptr}, {kDelta, call.at(delta)},
                          {kDQAccum, call.at(dq_acc)}, {kDQ, dq.raw()}, {kDK, dk.raw()}, {kDV, dv.raw()}})
    call.Bind(uid, ptr);
  if (heads) call.Bind(kDKHeads, call.at(dk_heads)), call.Bind(kDVHeads, call.at(dv_heads));
  call.Execute();
}

}  // namespace loom::ops::cuda
