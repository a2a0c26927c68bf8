// Softmax attention (and sigmoid attention) with GQA, causal masks by
// absolute position, documents, and the LSE that ring attention merges with.
//   q [Tq, Hq, D], k, v [Tk, Hk, D], o [Tq, Hq, D], lse [Tq, Hq]
//   Query head h reads KV head h / (Hq / Hk).
//   Rows of q and k correspond one to one (q_rows.rows() == k_rows.rows()).
//   Within a row, query i has position q_offset + i, key j k_offset + j;
//   causal: visible iff q_offset + i ≥ k_offset + j; and, with documents,
//   only keys of the query's document id.
// softmax:  S = scale·q kᵀ, P = softmax(S over visible keys), o = P v,
//           lse = log Σ exp(S) (−inf and o = 0 for a row with no visible key).
// sigmoid:  P = sigmoid(scale·q kᵀ + bias) on visible keys, 0 elsewhere;
//           o = P v; no normaliser (lse is left untouched).
// Backward: dq, dk, dv written.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "ops/attention_seqs.h"
#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

// Which kernels run bf16 CUDA tensors (model.attention_backend): Loom's flash
// attention or cuDNN's SDPA. f32 CUDA tensors always run the f32 kernels, CPU
// tensors the CPU reference.
enum class AttentionBackend { kLoom, kCudnn };

struct AttentionOptions {
  bool causal = true;
  double scale = 0;            // 0: 1/sqrt(D)
  bool sigmoid = false;        // FlashSigmoid instead of softmax
  double sigmoid_bias = 0;     // b, DESIGN.md: −log(train.seq_len)
  int64_t q_offset = 0;        // position of a row's first query
  int64_t k_offset = 0;        // position of a row's first key
  AttentionBackend backend = AttentionBackend::kLoom;  // bf16 CUDA tensors only
  bool deterministic = false;  // Loom's bf16 backward: dq without float atomics, bitwise repeatable
  // MoH (model/moh.h): which (query head, query block) pairs run. i32
  // [Hq, ceil(Tq / active_block)] on the CPU, non-zero = run; block b holds
  // the query tokens [b·active_block, (b+1)·active_block) of q. An inactive
  // pair is skipped, not computed: its o is 0 and lse −∞, and its d_o is
  // read as 0 (it adds nothing to dq, dk, dv). Undefined: every pair runs.
  // On the GPU only Loom's bf16 flash kernels take it (on q's device; a
  // query tile runs when any mask block it overlaps is active); see
  // SoftmaxAttentionSkipsInactive.
  Tensor active;
  int64_t active_block = 64;
};

// CPU tensors (f32, f64): the reference below (ops/cpu/softmax_attention.cc);
// lse in q's dtype. CUDA tensors: f32 → the f32 kernels, bf16 → the kernels
// of options.backend, as SoftmaxAttentionBf16Backend (below) picks them: on
// a GPU that is not Hopper, backend kLoom runs cuDNN, and backend kCudnn
// runs Loom's kernels where cuDNN does not take the call (or the f32
// kernels); lse f32 either way; the host rows reach the kernels through
// their cached device copy (cuda::DeviceRows). Outputs are allocated by the
// caller on q's device.
void SoftmaxAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const TokenRows& q_rows,
                             const TokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse);
// Whether the call with q and options may pass AttentionOptions::active:
// CPU tensors, or bf16 CUDA tensors that SoftmaxBf16TakesMask on a GPU
// running Loom's flash kernels (cuda::FlashAttentionRuns: Hopper).
bool SoftmaxAttentionSkipsInactive(const Tensor& q, const AttentionOptions& options);
// The head dims Loom's flash attention kernels are compiled for.
inline bool FlashAttentionHeadDim(int64_t d) { return d == 64 || d == 128; }
// Whether a bf16 call of this head dim and backend runs Loom's flash
// kernels where they run, the kernels that take MoH's mask (what
// SoftmaxAttentionSkipsInactive asks of a GPU call, and the memory plan of
// model/memory_estimate.cc, which assumes a Hopper GPU).
inline bool SoftmaxBf16TakesMask(int64_t head_dim, AttentionBackend backend) {
  return backend == AttentionBackend::kLoom && FlashAttentionHeadDim(head_dim);
}

void SoftmaxAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                              const Tensor& lse, const Tensor& d_o, const TokenRows& q_rows,
                              const TokenRows& k_rows, const AttentionOptions& options, Tensor& dq, Tensor& dk,
                              Tensor& dv);

// ------------------------------------------------------------------ CUDA
// The GPU kernels (ops/cuda/softmax_attention.cu: Loom's own flash attention;
// ops/cuda/cudnn_attention.cu: cuDNN 9's fused SDPA). Same math as above,
// with these differences:
//   q, k, v, o, d_o, dq, dk, dv bf16 on one CUDA device; lse [Tq, Hq] f32
//   (softmax statistics and accumulation are f32 inside the kernels);
//   rows come as CudaTokenRows (cu_seqlens on the device).
// Every launcher runs on `stream` (nullptr: the default stream) and does not
// synchronise; scratch memory is stream-ordered (cudaMallocAsync).
namespace cuda {

// TokenRows as the kernels read them: cu_seqlens [R+1] (and doc_ids [T] if
// any) on the device, plus what the host must know to size the grid.
struct CudaTokenRows {
  Tensor cu_seqlens;   // i32 [R+1], CUDA
  Tensor doc_ids;      // i32 [T], CUDA, or undefined
  int64_t max_len = 0; // longest row
  bool uniform = false;  // every row max_len long and the rows tile [0, T)
  int64_t end = 0;       // cu_seqlens[R]: the tokens past it are in no row
  int64_t rows() const { return cu_seqlens.numel() - 1; }
  // Where the rows follow each other from token 0 without gaps and hold
  // documents or differ in length: every document of every row as a
  // sequence of its own (ops::SplitAtDocuments), which cuDNN's ragged
  // graphs take. Empty, and doc_cu_seqlens undefined, otherwise.
  std::vector<int32_t> doc_bounds;  // host, [N+1]
  Tensor doc_cu_seqlens;            // the same, i32 [N+1], CUDA
  int64_t doc_max_len = 0;          // longest document
};
// Copies host rows to `device` (synchronously: do it once per batch).
CudaTokenRows ToDevice(const TokenRows& rows, int device);
// The rows' device copy, made by ToDevice on first use for `device` and kept
// in rows.device_copy (shared by copies of `rows`); remade when the contents
// of cu_seqlens or doc_ids differ from what was copied (batch builders fill
// doc_ids in place after Batch::Allocate), which costs one host comparison
// of T ints a call. The reference stays valid until the next call on rows.
const CudaTokenRows& DeviceRows(const TokenRows& rows, int device);
// Checks that rows fit tokens laid out like `like` ([T, ...] on a CUDA
// device); a failure starts "[op] name".
void CheckDeviceRows(const CudaTokenRows& rows, const Tensor& like, const char* op, const char* name);

using AttentionBackend = ops::AttentionBackend;
AttentionBackend ParseAttentionBackend(const std::string& name);  // "loom" | "cudnn"

// Loom's kernels: FA3-style tiles on Hopper's wgmma, D in {64, 128};
// everything AttentionOptions offers, doc_ids included. The backward
// accumulates dq in f32 with atomic adds (not bitwise deterministic) unless
// options.deterministic: then a separate dQ pass sums it in a fixed order.
// They are sm_90a code: FlashAttentionRuns says whether `device` runs them
// (SoftmaxAttentionForward/Backward then take cuDNN or the f32 kernels).
bool FlashAttentionRuns(int device);
void FlashAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                           const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse,
                           CudaStream stream = nullptr);
void FlashAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                            const Tensor& d_o, const CudaTokenRows& q_rows, const CudaTokenRows& k_rows,
                            const AttentionOptions& options, Tensor& dq, Tensor& dk, Tensor& dv,
                            CudaStream stream = nullptr);

// cuDNN's SDPA through the backend graph API: softmax only, causal or full,
// GQA, head dims that are multiples of 8 up to 128; uniform rows as a
// [B, H, S, D] batch, and documents inside rows (or varlen rows that follow
// each other from token 0) as ragged sequences (CudaTokenRows::doc_bounds)
// with q_rows and k_rows alike; no sigmoid, no causal offsets, no MoH mask
// (refused with a message). Verified on an H100
// (tests/gpu/cudnn_attention_gpu_test.cc).
void CudnnAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                           const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse,
                           CudaStream stream = nullptr);
void CudnnAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                            const Tensor& d_o, const CudaTokenRows& q_rows, const CudaTokenRows& k_rows,
                            const AttentionOptions& options, Tensor& dq, Tensor& dk, Tensor& dv,
                            CudaStream stream = nullptr);

// "" when cuDNN has engines for this forward (and backward, if asked):
// plans are built and cached; else why not (a feature above that the graphs
// lack, or cuDNN's own reason).
std::string CudnnAttentionUnsupported(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                                      const CudaTokenRows& k_rows, const AttentionOptions& options,
                                      bool backward = true);

// f32 kernels (ops/cuda/softmax_attention_f32.cu) for fp32 GPU runs: f32
// FMA on tiles in shared memory (no tensor cores: TF32 would miss the 1e-5
// agreement with the CPU), FA2's online softmax; everything
// AttentionOptions offers; D in {16, 32, 64, 128}; q, k, v, o, d_o, dq, dk,
// dv and lse all f32 on one CUDA device. Deterministic (no atomics).
void AttentionF32Forward(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                         const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse,
                         CudaStream stream = nullptr);
void AttentionF32Backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                          const Tensor& d_o, const CudaTokenRows& q_rows, const CudaTokenRows& k_rows,
                          const AttentionOptions& options, Tensor& dq, Tensor& dk, Tensor& dv,
                          CudaStream stream = nullptr);

// Context parallelism's merge of one block's partial result into a running
// one, on the device (parallel/cp_attention.cc's host loop, for CUDA
// tensors): o, o_b [N, H, D] f32 or bf16, lse, lse_b [N, H] f32.
//   softmax: m = max(lse, lse_b), w = e^(lse−m), w_b = e^(lse_b−m),
//            o' = (w o + w_b o_b) / (w + w_b), lse' = m + log(w + w_b);
//            a row with lse_b = −∞ keeps (o, lse), one with lse = −∞ takes
//            (o_b, lse_b).
//   sigmoid: o' = o + o_b (lse unused, may be undefined).
void MergeAttentionPartial(bool sigmoid, Tensor& o, Tensor& lse, const Tensor& o_b, const Tensor& lse_b,
                           CudaStream stream = nullptr);

// One entry for the model: picks the backend.
void AttentionForward(AttentionBackend backend, const Tensor& q, const Tensor& k, const Tensor& v,
                      const CudaTokenRows& q_rows, const CudaTokenRows& k_rows, const AttentionOptions& options,
                      Tensor& o, Tensor& lse, CudaStream stream = nullptr);
void AttentionBackward(AttentionBackend backend, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& o, const Tensor& lse, const Tensor& d_o, const CudaTokenRows& q_rows,
                       const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& dq, Tensor& dk,
                       Tensor& dv, CudaStream stream = nullptr);

}  // namespace cuda

// The kernels a bf16 CUDA call of SoftmaxAttentionForward/Backward runs:
// those of the returned backend, or (nullopt) the f32 kernels on f32 copies.
// Head dims: Loom's kernels take 64 and 128, cuDNN multiples of 8 up to 128,
// others run the f32 kernels. flash_runs: whether q's GPU runs Loom's
// kernels (cuda::FlashAttentionRuns; a parameter so that a test on Hopper
// can ask what another GPU runs). options.backend kLoom: Loom's kernels, or
// without them cuDNN if it takes the call both ways (the forward and
// backward must agree) and options.deterministic is off, else the f32
// kernels (deterministic too). kCudnn: cuDNN if it takes the call (varlen
// rows, documents, sigmoid attention and ring CP's offset masks it does
// not), else Loom's kernels where they run, else the f32 kernels. Each
// reason for a fallback is logged once a process.
std::optional<AttentionBackend> SoftmaxAttentionBf16Backend(const Tensor& q, const Tensor& k, const Tensor& v,
                                                            const cuda::CudaTokenRows& gq,
                                                            const cuda::CudaTokenRows& gk,
                                                            const AttentionOptions& options, bool flash_runs);

}  // namespace loom::ops
