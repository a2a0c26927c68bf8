#include "model/memory_estimate.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "model/softmax_attention_layer.h"
#include "ops/cross_entropy.h"
#include "ops/softmax_attention.h"
#include "parallel/pipeline_schedule.h"

namespace loom {
namespace {

// Live bytes and their running maximum while the allocations are replayed.
struct Ledger {
  int64_t live = 0, peak = 0;
  void Alloc(int64_t bytes) {
    live += bytes;
    peak = std::max(peak, live);
  }
  void Free(int64_t bytes) { live -= bytes; }
};

// Sizes of one micro-batch on this rank, in bytes, and the allocations of
// one block replayed in the order model/*.cc makes them.
struct StepShapes {
  const ModelDims& d;
  int64_t t, rows, c, f, hq, hk, e, tp;
  int64_t es;  // statistics (rstd, lse, lightning states, router scores and gates): e on the CPU, f32 on the GPU
  int64_t cp;
  int64_t moe_rows;  // S = R: expert rows of an MoE layer on this rank (planned, see EstimateMemory)
  bool ep;           // expert parallelism: the exchange copies its rows (parallel/expert_parallel.cc)
  int64_t Tc() const { return t * c * e; }
  int64_t Thd() const { return t * hq * d.head_dim * e; }

  // ---- MoH (model/moh.cc MohRouter): S shared, R routed heads, top k.
  int64_t MohShared() const { return d.moh.fixed_gates ? 0 : d.moh.shared_heads; }  // W_s rows
  int64_t MohRouted() const { return d.heads - d.moh.shared_heads; }
  bool MohMix() const { return !d.moh.fixed_gates && d.moh.shared_heads > 0 && MohRouted() > 0; }  // W_h
  // ops/moe_router.h MoeRouting over n choices: scores [T, n], experts i32
  // [T, k], gates [T, k], lse [T].
  int64_t Routing(int64_t n, int64_t k) const { return t * n * es + t * k * 4 + t * k * es + t * es; }
  // Whether the layer's attention takes MoH's skip mask (model/*_layer.cc):
  // never under CP; softmax on the CPU or Loom's bf16 kernels only
  // (ops::SoftmaxBf16TakesMask, a Hopper GPU assumed).
  bool MohMask(char kind) const {
    if (cp > 1) return false;
    if (!SoftmaxKind(kind) || d.device.is_cpu()) return true;
    return d.mixed_bf16 && ops::SoftmaxBf16TakesMask(d.head_dim, d.attention_backend);
  }
  // MohRouter::Forward and the layer's ActiveMask.
  void MohForward(Ledger& m, char kind) const {
    const int64_t s = MohShared(), r = MohRouted(), k = r > 0 ? d.moh.top_k : 0;
    const int64_t logits = t * (s + (MohMix() ? 2 : 0)) * e;  // W_s x, W_h x: dropped at return
    m.Alloc(logits);
    if (r > 0) m.Alloc(t * r * e + Routing(r, k));  // routed_logits_, routing_
    m.Alloc(t * d.heads * es);                      // gates of every head (= gates_ at tp 1)
    m.Alloc(t * (s + (MohMix() ? 2 : 0)) * es);     // shared scores, α
    if (tp > 1) {                                   // this rank's columns
      m.Alloc(t * hq * es);
      m.Free(t * d.heads * es);
    }
    m.Free(logits);
    if (MohMask(kind)) {  // i32 [H, blocks]: a TP rank's slice keeps the whole mask alive
      const int64_t block = SoftmaxKind(kind) ? SoftmaxAttentionLayer::kMohBlock : d.lightning_block;
      m.Alloc(d.heads * ((t + block - 1) / block) * 4);
    }
  }
  // MohRouter::Backward: the router's logit gradients, all dropped at return.
  void MohBackward(Ledger& m) const {
    const int64_t s = MohShared(), r = MohRouted(), k = r > 0 ? d.moh.top_k : 0;
    int64_t b = (tp > 1 ? t * d.heads * es : 0)          // the [T, H] dgates summed over TP
                + t * (s + (MohMix() ? 2 : 0)) * e       // dz_s, dz_h
                + t * k * es + t * r * e;                // dgr, dz_r
    m.Alloc(b);
    m.Free(b);
  }
  // MohRouter::GateBackward's dgates_ [T, hq], kept until ReleaseActivations.
  int64_t MohGateGrad(char kind) const { return MohKind(kind) ? t * hq * es : 0; }

  // ---- Mixers (softmax_attention_layer.cc, lightning_attention_layer.cc Forward).
  void SoftmaxForward(Ledger& m, char kind) const {
    const int64_t qkv = t * (hq + 2 * hk) * d.head_dim * e;
    m.Alloc(qkv);  // q, k, v
    m.Alloc(qkv);  // the packed projection, unpacked into them
    m.Free(qkv);
    m.Alloc(t * hq * d.head_dim * e + t * hq * es);  // o, lse
    if (MohKind(kind)) {
      MohForward(m, kind);
      m.Alloc(Thd());  // gated_ = g ⊙ o
    }
  }
  int64_t LightningState() const { return rows * hq * d.head_dim * d.head_dim * es; }
  void LightningForward(Ledger& m, char kind) const {
    const int64_t thd = Thd();
    m.Alloc(thd * (3 + (d.lightning_silu ? 3 : 0) + 1));  // qa,ka,va, q,k,v, a
    m.Alloc(LightningState());                              // state_out, dropped at return
    if (MohKind(kind)) MohForward(m, kind);
    if (d.lightning_norm) m.Alloc(thd + t * hq * es);  // n, rstd
    if (d.lightning_gate) m.Alloc(2 * thd);            // g, y
    if (MohKind(kind)) m.Alloc(thd);                   // yg = g ⊙ y
    m.Free(LightningState());
  }

  // ---- MLPs (mlp.cc SwigluMlp, moe.cc MoeLayer), Forward.
  void MlpForward(Ledger& m) const {
    if (d.moe.experts == 0) {
      m.Alloc(3 * t * f * e);  // gate, up, h
      return;
    }
    const int64_t n = d.moe.experts, k = d.moe.top_k, fe = d.moe.ffn, s = moe_rows, r = moe_rows;
    m.Alloc(t * n * e + Routing(n, k));  // logits_, routing_
    m.Alloc(t * k * 4);                  // perm_.rows [T, k] (i32)
    m.Alloc(s * c * e + s * es);         // sent [S, C], sent_gates [S, 1] (= expert_x_, expert_gates_ without ep)
    if (ep) {                            // Dispatch: received, then expert_x_ [R, C]; the same for the gates
      m.Alloc(2 * r * c * e);
      m.Free(r * c * e);
      m.Alloc(2 * r * es);
      m.Free(r * es);
    }
    m.Alloc(3 * r * fe * e);  // gate_, up_, h_
    m.Alloc(r * c * e);       // expert_y (= returned_y without ep)
    if (ep) {                 // Combine: source-major copy, then returned_y [S, C]
      m.Alloc(r * c * e + s * c * e);
      m.Free(r * c * e);
    }
    for (int i = 0; i < d.moe.shared_experts; ++i) {  // the expert's out [T, C], gate, up, h
      m.Alloc(Tc() + 3 * t * fe * e);
      if (i > 0) m.Free(Tc());  // the previous sum, added in this one's output GEMM
    }
    if (d.moe.shared_experts > 0) m.Free(Tc());  // shared_y
    m.Free(r * c * e);                           // expert_y (and returned_y without ep)
    if (ep) m.Free(s * c * e + s * es + s * c * e);  // sent, sent_gates, returned_y
  }
  // Backward transients, all dropped at return.
  void MlpBackward(Ledger& m) const {
    if (d.moe.experts == 0) {
      const int64_t mlp = 3 * t * f * e;  // dh, dgu [T, 2F]
      m.Alloc(mlp);
      m.Free(mlp);
      return;
    }
    const int64_t n = d.moe.experts, k = d.moe.top_k, fe = d.moe.ffn, s = moe_rows, r = moe_rows;
    int64_t held = s * c * e;  // dsent (= dye without ep)
    m.Alloc(held);
    if (ep) {  // Dispatch: received, dye
      m.Alloc(2 * r * c * e);
      m.Free(r * c * e);
      held += r * c * e;
    }
    m.Alloc(r * c * e + r * es);  // dxe (= dreturned without ep), dexpert_gates
    held += r * c * e + r * es;
    m.Alloc(3 * r * fe * e);  // dh, dgu [R, 2F]
    m.Free(3 * r * fe * e);
    if (ep) {  // Combine: source-major copy, dreturned
      m.Alloc(r * c * e + s * c * e);
      m.Free(r * c * e);
      held += s * c * e;
    }
    m.Alloc(t * k * es);  // dgates
    held += t * k * es;
    if (ep) {  // Combine of dexpert_gates, a temporary
      m.Alloc(r * es + s * es);
      m.Free(r * es + s * es);
    }
    m.Alloc(t * n * e);  // dlogits
    held += t * n * e;
    if (d.moe.shared_experts > 0) {  // rest (the shared experts' dx)
      m.Alloc(Tc());
      held += Tc();
    }
    for (int i = 0; i < d.moe.shared_experts; ++i) {  // SwigluMlp::Backward's dh, dgu
      m.Alloc(3 * t * fe * e);
      m.Free(3 * t * fe * e);
    }
    m.Free(held);
  }

  // ---- One block (block.cc ForwardKeepingActivations).
  void BlockForward(Ledger& m, char kind) const {
    m.Alloc(Tc() + t * es);  // n1, rstd1
    m.Alloc(Tc());           // mixed (= x1)
    if (SoftmaxKind(kind)) {
      SoftmaxForward(m, kind);
    } else {
      LightningForward(m, kind);
    }
    m.Alloc(Tc() + t * es);  // n2, rstd2
    MlpForward(m);
  }
  // What a block keeps from its forward to its backward.
  int64_t Saved(char kind) const {
    Ledger l;
    BlockForward(l, kind);
    return l.live;
  }

  // Mixer backward transients (softmax_attention_layer.cc /
  // lightning_attention_layer.cc Backward), all freed at its return but
  // MoH's dgates_ (MohGateGrad, freed with the saved tensors).
  void MixerBackward(Ledger& m, char kind) const {
    const bool moh = MohKind(kind);
    if (SoftmaxKind(kind)) {
      const int64_t d_o = Thd(), dqkv = t * (hq + 2 * hk) * d.head_dim * e;
      m.Alloc(d_o);
      m.Alloc(MohGateGrad(kind));
      m.Alloc(dqkv);  // dq, dk, dv
      m.Free(d_o);
      m.Alloc(dqkv);  // packed for the one GEMM
      m.Free(dqkv);
      if (moh) MohBackward(m);
      m.Free(dqkv);
      return;
    }
    const int64_t thd = Thd();
    int64_t held = thd;  // d_y
    m.Alloc(thd);
    m.Alloc(MohGateGrad(kind));
    if (d.lightning_gate) {
      m.Alloc(2 * thd);  // dn, dg (dg dies with its scope)
      m.Free(thd);
      held += thd;
    }
    if (d.lightning_norm) {
      const int64_t dw = tp > 1 ? d.head_dim * DTypeSize(d.dtype) : 0;
      m.Alloc(thd + dw);  // da
      m.Free(dw);
      held += thd;
    }
    m.Alloc(3 * thd);  // dq, dk, dv
    // ops/cpu/lightning_attention.cc reads MoH's masked d_o from a copy
    // (so do the GPU's f32 kernels; its bf16 kernels take the mask).
    const bool bf16_kernels = !d.device.is_cpu() && d.mixed_bf16 && (d.head_dim == 64 || d.head_dim == 128);
    if (moh && MohMask(kind) && !bf16_kernels) {
      m.Alloc(thd);
      m.Free(thd);
    }
    if (moh) MohBackward(m);
    m.Free(3 * thd + held);
  }

  void LossBackward(Ledger& m) const {
    m.Alloc(t * c * e + t * es);  // final_x, final_rstd
    m.Alloc(Tc());                // dh
    int64_t logits, extra = 0;
    if (!d.device.is_cpu() && tp == 1) {
      // ops/cuda/cross_entropy.cu: a chunk of f32 logits, plus in bf16 runs
      // the bf16 gradients of a group of chunks.
      const int64_t rows = ops::cuda::CrossEntropyChunkRows(t, d.padded_vocab);
      logits = rows * d.padded_vocab * 4 +
               (d.mixed_bf16 ? ops::cuda::CrossEntropyGradRows(t, rows) * d.padded_vocab * 2 : 0);
    } else if (tp == 1) {
      logits = std::min<int64_t>(128, t) * d.padded_vocab * e;
    } else {
      // parallel/vocab_parallel_cross_entropy.cc: row max, sum, z_t, index,
      // the local max copy and the negated index, 8 bytes each per row.
      logits = std::min<int64_t>(512, std::max<int64_t>(t, 1)) * (d.padded_vocab / tp) * e;
      extra = 6 * t * 8;
    }
    m.Alloc(extra + logits);
    m.Free(extra + logits);
    m.Free(t * c * e + t * es);
    m.Free(Tc());
  }
};

// One chunk of `layers` (global layer indices), as Model::ChunkForward and
// ChunkBackward allocate.
struct ChunkReplay {
  const StepShapes& s;
  std::vector<int> layers;
  bool first, last;

  // The input (when not the first stage) is allocated by the caller.
  void Forward(Ledger& m) const {
    if (first) m.Alloc(s.Tc());  // embedding output
    for (int l : layers) {
      m.Alloc(s.Tc());  // block output
      s.BlockForward(m, s.d.kinds[l]);
      if (s.d.recompute[l]) m.Free(s.Saved(s.d.kinds[l]));
    }
  }
  // Frees what ReleaseChunk frees: block activations and the outputs that
  // nobody else holds. `out_kept`: the last output is held by a send.
  void Release(Ledger& m, bool out_kept) const {
    for (int l : layers)
      if (!s.d.recompute[l]) m.Free(s.Saved(s.d.kinds[l]));
    const int64_t outputs = static_cast<int64_t>(layers.size()) - (out_kept ? 1 : 0);
    m.Free((outputs + (first ? 1 : 0)) * s.Tc());
  }
  // Backward right after Forward. Frees the chunk's outputs, activations and
  // (non-first) its input; returns with dx allocated when not first (kept by
  // the caller), nothing otherwise. dout is allocated and freed by the caller.
  void Backward(Ledger& m, bool input_held_elsewhere) const {
    const int64_t tc = s.Tc();
    m.Alloc(tc);  // dx
    if (last) s.LossBackward(m);
    m.Alloc(tc);  // dprev
    for (size_t i = layers.size(); i-- > 0;) {
      const int l = layers[i];
      const char kind = s.d.kinds[l];
      if (s.d.recompute[l]) {
        m.Alloc(tc);  // scratch output of the re-run, dropped with its scope
        s.BlockForward(m, kind);
        m.Free(tc);
      }
      m.Alloc(tc);  // dn
      s.MlpBackward(m);
      m.Alloc(tc);  // dx1
      m.Alloc(tc);  // dn for the mixer, before the MLP's is dropped
      m.Free(tc);
      s.MixerBackward(m, kind);
      m.Free(s.Saved(kind) + s.MohGateGrad(kind));  // ReleaseActivations
      m.Free(2 * tc);                                 // dx1, dn
    }
    // layer_inputs.clear(): the outputs, the embedding output or the input.
    m.Free(static_cast<int64_t>(layers.size()) * tc + (first || !input_held_elsewhere ? tc : 0));
    m.Free(first ? 2 * tc : tc);  // dprev (and dx on the first stage)
  }
};

// A parameter as DataParallel and Model::RefreshComputeWeights see it.
struct ParamShape {
  int64_t elements;
  bool matrix;  // 2-D: a bf16 compute copy in bf16 runs
  bool expert;  // ".moe.experts.": reduced over expert_dp (parallel/expert_parallel.h)
};

// DataParallel's flat buffers for `params` over a group of g ranks
// (parallel/data_parallel.cc): backward order, a bucket closes before a
// parameter that would take it past bucket_mb, each padded to a multiple of
// g. Returns the padded total; *slice: this rank's ZeRO slices together.
int64_t FlatElements(const std::vector<int64_t>& params, int64_t g, int64_t bucket_elems, int64_t* slice) {
  int64_t total = 0, begin = 0;
  *slice = 0;
  auto close = [&] {
    const int64_t size = (total - begin + g - 1) / g * g;
    total = begin + size;
    *slice += size / g;
  };
  for (size_t k = params.size(); k-- > 0;) {
    if (total - begin > 0 && total - begin + params[k] > bucket_elems) {
      close();
      begin = total;
    }
    total += params[k];
  }
  close();
  return total;
}

}  // namespace

MemoryEstimateOptions MemoryEstimateOptionsFromConfig(const config::Config& config, const Layout& layout) {
  MemoryEstimateOptions o;
  o.layout = layout;
  o.zero = config.parallel().zero() == 1;
  o.bucket_mb = config.parallel().bucket_mb();
  o.micro_batch = config.train().micro_batch();
  o.seq_len = config.train().seq_len();
  o.micro_batches = config.train().global_batch() / layout.dp / config.train().micro_batch();
  return o;
}

absl::StatusOr<MemoryEstimate> EstimateMemory(const ModelDims& d, const MemoryEstimateOptions& o) {
  const Layout& lay = o.layout;
  // e: master weights, gradients, AdamW state; ea: activations.
  const int64_t e = DTypeSize(d.dtype), ea = DTypeSize(d.act_dtype()), c = d.hidden, tp = lay.tp;
  const int stages = lay.pp * lay.vpp;
  if (d.layers % stages != 0)
    return absl::InvalidArgumentError(absl::StrCat("[memory] ", d.layers, " layers in ", stages, " stages"));
  const int per_stage = d.layers / stages;
  const bool moe = d.moe.experts > 0;
  if (moe && (lay.ep < 1 || d.moe.experts % lay.ep != 0))
    return absl::InvalidArgumentError(
        absl::StrCat("[memory] ", d.moe.experts, " experts do not split over ep = ", lay.ep));

  // ---- Parameters in Model::params() order (model.cc, block.cc CollectParams).
  std::vector<ParamShape> params;
  auto add = [&](int64_t n, bool matrix, bool expert = false) { params.push_back({n, matrix, expert}); };
  const bool has_embed = o.pp_rank == 0, has_head = o.pp_rank == lay.pp - 1;
  const int64_t vocab_rows = d.padded_vocab / tp, f = d.ffn / tp, hq = d.heads / tp, hk = d.kv_heads / tp;
  const int64_t qd = hq * d.head_dim, kvd = hk * d.head_dim;
  if (has_embed) add(vocab_rows * c, true);
  std::vector<std::vector<int>> chunk_layers(lay.vpp);
  for (int v = 0; v < lay.vpp; ++v) {
    const int first_layer = (v * lay.pp + o.pp_rank) * per_stage;
    for (int l = first_layer; l < first_layer + per_stage; ++l) {
      chunk_layers[v].push_back(l);
      add(c, false);  // norm1
      if (SoftmaxKind(d.kinds[l])) {
        for (int64_t n : {qd * c, kvd * c, kvd * c, c * qd}) add(n, true);
      } else {
        for (int i = 0; i < 3; ++i) add(qd * c, true);
        if (d.lightning_gate) add(qd * c, true);
        add(c * qd, true);
        if (d.lightning_norm) add(d.head_dim, false);
      }
      if (MohKind(d.kinds[l])) {  // model/moh.cc: W_s, W_r, W_h, replicated over TP
        const int64_t shared = d.moh.shared_heads, routed = d.heads - shared;
        if (shared > 0 && !d.moh.fixed_gates) add(shared * c, true);
        if (routed > 0) add(routed * c, true);
        if (shared > 0 && routed > 0 && !d.moh.fixed_gates) add(2 * c, true);
      }
      add(c, false);  // norm2
      if (moe) {  // model/moe.cc: router, this ep rank's experts, the shared experts; replicated over TP
        const int64_t fe = d.moe.ffn;
        add(int64_t{d.moe.experts} * c, true);
        for (int x = 0; x < d.moe.experts / lay.ep; ++x)
          for (int64_t n : {fe * c, fe * c, c * fe}) add(n, true, /*expert=*/true);
        for (int x = 0; x < d.moe.shared_experts; ++x)
          for (int64_t n : {fe * c, fe * c, c * fe}) add(n, true);
      } else {
        for (int64_t n : {f * c, f * c, c * f}) add(n, true);
      }
    }
  }
  if (has_head) {
    add(c, false);  // final norm
    if (!d.tie_embeddings) add(vocab_rows * c, true);
  }

  MemoryEstimate m;
  // ---- DataParallel's buckets: ExpertDataParallel (parallel/expert_parallel.h)
  // runs one DataParallel over the dense parameters (dp·cp ranks) and one
  // over the expert parameters ((dp/ep)·cp ranks), each bucketing its own.
  std::vector<int64_t> dense, experts;
  for (const ParamShape& p : params) {
    m.parameters += p.elements;
    (p.expert ? experts : dense).push_back(p.elements);
  }
  const int64_t bucket_elems = std::max<int64_t>(1, static_cast<int64_t>(o.bucket_mb * (1 << 20) / e));
  int64_t dense_slice = 0, expert_slice = 0;
  int64_t flat = FlatElements(dense, int64_t{lay.dp} * lay.cp, bucket_elems, &dense_slice);
  if (!experts.empty())
    flat += FlatElements(experts, int64_t{lay.dp / lay.ep} * lay.cp, bucket_elems, &expert_slice);
  m.param_bytes = flat * e;
  m.grad_bytes = flat * e;
  if (o.zero) {
    m.grad_bytes += (dense_slice + expert_slice) * e;
    m.optimizer_bytes = 2 * (dense_slice + expert_slice) * e;
  } else {
    m.optimizer_bytes = 2 * m.parameters * e;
  }
  // bf16 runs: the bf16 copy of every matrix (Param::compute).
  if (d.mixed_bf16)
    for (const ParamShape& p : params)
      if (p.matrix) m.param_bytes += p.elements * ea;

  // ---- Activations of one step.
  if (o.seq_len % lay.cp != 0) return absl::InvalidArgumentError("[memory] seq_len not divisible by cp");
  const int64_t t = o.micro_batch * o.seq_len / lay.cp;
  // MoE rows of this rank: dropless, every assignment (T·k); with a
  // capacity, at most `capacity` (model/moe.cc, over the N tokens of the
  // dp·cp group) per expert. Under expert parallelism the rows that arrive
  // depend on the routing: the plan takes the balanced case, R = S.
  int64_t moe_rows = 0;
  if (moe) {
    moe_rows = t * d.moe.top_k;
    if (d.moe.capacity_factor > 0) {
      const int64_t n = t * lay.dp * lay.cp;
      const auto capacity =
          static_cast<int64_t>(std::ceil(d.moe.capacity_factor * double(n * d.moe.top_k) / d.moe.experts));
      moe_rows = std::min(moe_rows, capacity * d.moe.experts);
    }
  }
  const int64_t es = DTypeSize(d.stat_dtype());
  const StepShapes s{d, t, o.micro_batch, c, f, hq, hk, ea, tp, es, lay.cp, moe_rows, moe && lay.ep > 1};
  m.moe_rows = moe_rows;
  m.input_bytes = o.micro_batches * 3 * s.t * 4;  // tokens, targets, positions (i32)
  Ledger ledger;
  if (lay.pp == 1) {
    const ChunkReplay chunk{s, chunk_layers[0], true, true};
    chunk.Forward(ledger);
    chunk.Backward(ledger, false);
  } else {
    LOOM_ASSIGN_OR_RETURN(const std::vector<PipelineTask> schedule,
                          PipelineSchedule(lay.pp, lay.vpp, o.pp_rank, static_cast<int>(o.micro_batches)));
    for (const PipelineTask& task : schedule) {
      const int v = task.chunk;
      const bool first = o.pp_rank == 0 && v == 0, last = o.pp_rank == lay.pp - 1 && v == lay.vpp - 1;
      const ChunkReplay chunk{s, chunk_layers[v], first, last};
      if (task.forward) {
        if (!first) ledger.Alloc(s.Tc());  // received input, stashed until backward
        chunk.Forward(ledger);
        chunk.Release(ledger, /*out_kept=*/!last);  // a sent output lives until the step ends
      } else {
        chunk.Forward(ledger);  // the re-run; its input is the stashed one
        if (!last) ledger.Alloc(s.Tc());  // dout
        chunk.Backward(ledger, false);
        if (!last) ledger.Free(s.Tc());
        // A non-first chunk's dx is sent and kept until the step ends.
      }
    }
  }
  m.activation_bytes = ledger.peak;
  return m;
}

}  // namespace loom
