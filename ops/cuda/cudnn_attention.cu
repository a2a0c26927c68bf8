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
  kVirtual = 100,
};

// A graph under construction: its tensors and operations stay alive with it.
class Graph {
 public:
  explicit Graph(cudnnHandle_t handle) : handle_(handle) {}

  DescPtr Tensor(std::vector<int64_t> dims, std::vector<int64_t> strides, cudnnDataType_t type, int64_t uid,
                 bool is_virtual, bool by_value = false) {
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

  void Matmul(const DescPtr& a, const DescPtr& b, const DescPtr& c) {
    auto m = Keep(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    m->Set(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT, "matmul comp type");
    m->Finalize("matmul");
    auto op = Keep(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op->SetDesc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, *a, "matmul a")
        .SetDesc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, *b, "matmul b")
        .SetDesc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, *c, "matmul c")
        .SetDesc(CUDNN_ATTR_OPERATION_MATMUL_DESC, *m, "matmul desc");
    op->Finalize("matmul op");
    ops_.push_back(op);
  }
  // y = mode(x[, b[, t]]); axis for GEN_INDEX.
  void Pointwise(cudnnPointwiseMode_t mode, const DescPtr& x, const DescPtr& b, const DescPtr& t, const DescPtr& y,
                 int64_t axis = -1) {
    auto pw = Keep(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw->Set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, mode, "pointwise mode");
    pw->Set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT, "pointwise precision");
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

struct Shape4 {
  int64_t b, hq, hk, sq, sk, d;
  bool causal;
  int64_t shift;
  bool backward;
  auto key() const { return std::make_tuple(b, hq, hk, sq, sk, d, causal, shift, backward); }
  bool operator<(const Shape4& o) const { return key() < o.key(); }
};

// Token-major [B·S, H, D] as [B, H, S, D].
std::vector<int64_t> TokenMajorStrides(int64_t h, int64_t s, int64_t d) { return {s * h * d, d, h * d, 1}; }

// S = scale · Q Kᵀ with the causal mask applied; returns the masked scores.
DescPtr Scores(Graph& g, const Shape4& s, const DescPtr& q, const DescPtr& k_t, const DescPtr& scale) {
  const std::vector<int64_t> sdims{s.b, s.hq, s.sq, s.sk};
  auto raw = g.Virtual(sdims);
  g.Matmul(q, k_t, raw);
  auto scaled = g.Virtual(sdims);
  g.Pointwise(CUDNN_POINTWISE_MUL, raw, scale, nullptr, scaled);
  if (!s.causal) return scaled;
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
  return masked;
}

std::unique_ptr<Graph> BuildForward(cudnnHandle_t handle, const Shape4& s) {
  auto g = std::make_unique<Graph>(handle);
  auto q = g->Tensor({s.b, s.hq, s.sq, s.d}, TokenMajorStrides(s.hq, s.sq, s.d), CUDNN_DATA_BFLOAT16, kQ, false);
  // Kᵀ: [B, Hk, D, Sk] over K's memory.
  auto k_t = g->Tensor({s.b, s.hk, s.d, s.sk}, {s.sk * s.hk * s.d, s.d, 1, s.hk * s.d}, CUDNN_DATA_BFLOAT16, kK, false);
  auto v = g->Tensor({s.b, s.hk, s.sk, s.d}, TokenMajorStrides(s.hk, s.sk, s.d), CUDNN_DATA_BFLOAT16, kV, false);
  auto o = g->Tensor({s.b, s.hq, s.sq, s.d}, TokenMajorStrides(s.hq, s.sq, s.d), CUDNN_DATA_BFLOAT16, kO, false);
  auto stats = g->Tensor({s.b, s.hq, s.sq, 1}, {s.hq * s.sq, s.sq, 1, 1}, CUDNN_DATA_FLOAT, kStats, false);
  const std::vector<int64_t> sdims{s.b, s.hq, s.sq, s.sk}, rdims{s.b, s.hq, s.sq, 1};
  auto scale = g->Tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, kScale, false, true);
  auto scores = Scores(*g, s, q, k_t, scale);
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
  g->Matmul(p, v, o);
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
  const auto qs = TokenMajorStrides(s.hq, s.sq, s.d), ks = TokenMajorStrides(s.hk, s.sk, s.d);
  const std::vector<int64_t> kt_strides{s.sk * s.hk * s.d, s.d, 1, s.hk * s.d};
  auto q = g->Tensor({s.b, s.hq, s.sq, s.d}, qs, CUDNN_DATA_BFLOAT16, kQ, false);
  auto k_t = g->Tensor({s.b, s.hk, s.d, s.sk}, kt_strides, CUDNN_DATA_BFLOAT16, kK, false);
  auto v_t = g->Tensor({s.b, s.hk, s.d, s.sk}, kt_strides, CUDNN_DATA_BFLOAT16, kV, false);
  auto o = g->Tensor({s.b, s.hq, s.sq, s.d}, qs, CUDNN_DATA_BFLOAT16, kO, false);
  auto d_o = g->Tensor({s.b, s.hq, s.sq, s.d}, qs, CUDNN_DATA_BFLOAT16, kDO, false);
  auto stats = g->Tensor({s.b, s.hq, s.sq, 1}, {s.hq * s.sq, s.sq, 1, 1}, CUDNN_DATA_FLOAT, kStats, false);
  auto dq = g->Tensor({s.b, s.hq, s.sq, s.d}, qs, CUDNN_DATA_BFLOAT16, kDQ, false);
  auto dk = g->Tensor({s.b, s.hk, s.sk, s.d}, ks, CUDNN_DATA_BFLOAT16, kDK, false);
  auto dv = g->Tensor({s.b, s.hk, s.sk, s.d}, ks, CUDNN_DATA_BFLOAT16, kDV, false);
  auto scale = g->Tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, kScale, false, true);
  auto one = g->Tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, kOne, false, true);
  const std::vector<int64_t> sdims{s.b, s.hq, s.sq, s.sk}, rdims{s.b, s.hq, s.sq, 1};
  const std::vector<int64_t> transposed{s.hq * s.sq * s.sk, s.sq * s.sk, 1, s.sk};  // [B, Hq, Sk, Sq] over S

  // Δ = rowsum(dO ⊙ O) · 1 (the factor is where dropout's 1 − p would go)
  auto do_o = g->Virtual({s.b, s.hq, s.sq, s.d});
  g->Pointwise(CUDNN_POINTWISE_MUL, d_o, o, nullptr, do_o);
  auto do_o_sum = g->Virtual(rdims);
  g->Reduction(CUDNN_REDUCE_TENSOR_ADD, do_o, do_o_sum);
  auto delta = g->Tensor(rdims, Graph::Packed(rdims), CUDNN_DATA_FLOAT, kDelta, false);
  g->Pointwise(CUDNN_POINTWISE_MUL, do_o_sum, one, nullptr, delta);
  // P = exp(scale · Q Kᵀ (masked) − stats)
  auto scores = Scores(*g, s, q, k_t, scale);
  auto centred = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_SUB, scores, stats, nullptr, centred);
  auto p = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_EXP, centred, nullptr, nullptr, p);
  // dV = Pᵀ dO
  auto p_t = g->Tensor({s.b, s.hq, s.sk, s.sq}, transposed, CUDNN_DATA_BFLOAT16, kVirtual, true);
  g->Reshape(p, p_t);
  const bool gqa = s.hk != s.hq;
  auto per_head = [&] {  // [B, Hq, Sk, D] bf16, summed over the group into dK or dV
    const std::vector<int64_t> dims{s.b, s.hq, s.sk, s.d};
    return g->Tensor(dims, Graph::Packed(dims), CUDNN_DATA_BFLOAT16, kVirtual, true);
  };
  if (gqa) {
    auto dv_heads = per_head();
    g->Matmul(p_t, d_o, dv_heads);
    g->Reduction(CUDNN_REDUCE_TENSOR_ADD, dv_heads, dv);
  } else {
    g->Matmul(p_t, d_o, dv);
  }
  // dS = scale · (dO Vᵀ − Δ) ⊙ P
  auto dp = g->Virtual(sdims);
  g->Matmul(d_o, v_t, dp);
  auto dp_centred = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_SUB, dp, delta, nullptr, dp_centred);
  auto ds_unscaled = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_MUL, dp_centred, p, nullptr, ds_unscaled);
  auto ds = g->Virtual(sdims);
  g->Pointwise(CUDNN_POINTWISE_MUL, ds_unscaled, scale, nullptr, ds);
  // dK = dSᵀ Q
  auto ds_t = g->Tensor({s.b, s.hq, s.sk, s.sq}, transposed, CUDNN_DATA_BFLOAT16, kVirtual, true);
  g->Reshape(ds, ds_t);
  if (gqa) {
    auto dk_heads = per_head();
    g->Matmul(ds_t, q, dk_heads);
    g->Reduction(CUDNN_REDUCE_TENSOR_ADD, dk_heads, dk);
  } else {
    g->Matmul(ds_t, q, dk);
  }
  // dQ = dS K into the f32 accumulator, then rounded into dQ
  auto k = g->Tensor({s.b, s.hk, s.sk, s.d}, ks, CUDNN_DATA_BFLOAT16, kVirtual, true);
  g->Reshape(k_t, k);
  const std::vector<int64_t> qdims{s.b, s.hq, s.sq, s.d};
  auto dq_acc = g->Tensor(qdims, Graph::Packed(qdims), CUDNN_DATA_FLOAT, kDQAccum, false);
  g->Matmul(ds, k, dq_acc);
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

// What of the call the graphs below do not express ("" if nothing).
std::string UnsupportedFeature(const Tensor& q, const Tensor& k, const CudaTokenRows& q_rows,
                               const CudaTokenRows& k_rows, const AttentionOptions& options) {
  if (options.sigmoid) return "[cudnn_attention] sigmoid attention is Loom's kernel only (model.attention_backend = loom)";
  if (q_rows.doc_ids.defined())
    return "[cudnn_attention] documents inside rows (doc_ids) are Loom's kernel only (with data.reset_attention=false "
           "a token also sees the earlier documents of its row, and the batches carry none)";
  if (options.active.defined()) return "[cudnn_attention] MoH's active-head mask is Loom's kernel only";
  if (!(q_rows.uniform && k_rows.uniform && q_rows.rows() == k_rows.rows() && q_rows.rows() > 0 &&
        q_rows.rows() * q_rows.max_len == q.dim(0) && k_rows.rows() * k_rows.max_len == k.dim(0)))
    return "[cudnn_attention] rows must be uniform and cover q and k (ops::cuda::ToDevice sets .uniform); varlen "
           "rows are Loom's kernel only";
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
           options.k_offset - options.q_offset, backward};
  if (!s.causal) s.shift = 0;
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
  State& st = GetState();
  std::lock_guard<std::mutex> lock(st.mu);
  const int device = q.device().index;
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  const Graph* g = nullptr;
  try {
    g = &GetGraph(device, s);
  } catch (const CudnnError& e) {
    LOOM_CHECK(false, e.message);
  }
  auto cs = static_cast<cudaStream_t>(stream);
  Ok(cudnnSetStream(st.handles[device], cs), "set stream");
  const int64_t n = lse.numel();
  char* scratch = nullptr;
  const size_t stats_bytes = (n * sizeof(float) + 255) / 256 * 256;
  LOOM_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&scratch), stats_bytes + g->workspace(), cs));
  float scale = static_cast<float>(options.scale != 0 ? options.scale : 1.0 / std::sqrt(double(q.dim(2))));
  float neg_inf = -INFINITY;
  int32_t shift = static_cast<int32_t>(s.shift);
  std::vector<int64_t> uids{kQ, kK, kV, kO, kStats, kScale};
  std::vector<void*> ptrs{q.raw(), k.raw(), v.raw(), o.raw(), scratch, &scale};
  if (s.causal) uids.push_back(kNegInf), ptrs.push_back(&neg_inf);
  if (s.causal && s.shift != 0) uids.push_back(kShift), ptrs.push_back(&shift);
  try {
    g->Execute(uids, ptrs, scratch + stats_bytes);
  } catch (const CudnnError& e) {
    LOOM_CHECK(false, e.message);
  }
  StatsToLseKernel<<<(n + 255) / 256, 256, 0, cs>>>(reinterpret_cast<float*>(scratch), s.sq, s.hq, n,
                                                    lse.data<float>());
  LOOM_CUDA_CHECK(cudaGetLastError());
  LOOM_CUDA_CHECK(cudaFreeAsync(scratch, cs));
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
  State& st = GetState();
  std::lock_guard<std::mutex> lock(st.mu);
  const int device = q.device().index;
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  const Graph* g = nullptr;
  try {
    g = &GetGraph(device, s);
  } catch (const CudnnError& e) {
    LOOM_CHECK(false, e.message);
  }
  auto cs = static_cast<cudaStream_t>(stream);
  Ok(cudnnSetStream(st.handles[device], cs), "set stream");
  // Scratch: stats [B, Hq, Sq] | Δ [B, Hq, Sq] | dQ_acc [B, Hq, Sq, D] | the plan's workspace.
  const int64_t n = lse.numel();
  auto aligned = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t stats_bytes = aligned(n * sizeof(float)), acc_bytes = aligned(q.numel() * sizeof(float));
  char* scratch = nullptr;
  LOOM_CUDA_CHECK(
      cudaMallocAsync(reinterpret_cast<void**>(&scratch), 2 * stats_bytes + acc_bytes + g->workspace(), cs));
  char* delta = scratch + stats_bytes;
  char* dq_acc = delta + stats_bytes;
  LOOM_CUDA_CHECK(cudaMemsetAsync(dq_acc, 0, q.numel() * sizeof(float), cs));
  LseToStatsKernel<<<(n + 255) / 256, 256, 0, cs>>>(lse.data<float>(), s.sq, s.hq, n, reinterpret_cast<float*>(scratch));
  LOOM_CUDA_CHECK(cudaGetLastError());
  float scale = static_cast<float>(options.scale != 0 ? options.scale : 1.0 / std::sqrt(double(q.dim(2))));
  float one = 1, neg_inf = -INFINITY;
  int32_t shift = static_cast<int32_t>(s.shift);
  std::vector<int64_t> uids{kQ, kK, kV, kO, kDO, kStats, kDelta, kDQAccum, kDQ, kDK, kDV, kScale, kOne};
  std::vector<void*> ptrs{q.raw(), k.raw(),  v.raw(),   o.raw(),  d_o.raw(), scratch, delta,
                          dq_acc,  dq.raw(), dk.raw(), dv.raw(), &scale,    &one};
  if (s.causal) uids.push_back(kNegInf), ptrs.push_back(&neg_inf);
  if (s.causal && s.shift != 0) uids.push_back(kShift), ptrs.push_back(&shift);
  try {
    g->Execute(uids, ptrs, dq_acc + acc_bytes);
  } catch (const CudnnError& e) {
    LOOM_CHECK(false, e.message);
  }
  LOOM_CUDA_CHECK(cudaFreeAsync(scratch, cs));
}

}  // namespace loom::ops::cuda
