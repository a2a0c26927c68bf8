#include "model/memory_estimate.h"

#include <algorithm>
#include <map>

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

// Sizes of one micro-batch on this rank, in bytes.
struct StepShapes {
  const ModelDims& d;
  int64_t t, rows, c, f, hq, hk, e, tp;
  int64_t es;  // statistics (rstd, lse, lightning states): e on the CPU, f32 on the GPU
  int64_t Tc() const { return t * c * e; }

  // Saved tensors of one block up to (pre) and after (post) the lightning
  // state transient, in Forward's order (block.cc, the layers' Forward).
  int64_t SavedPre(char kind) const {
    int64_t n = t * c + t * c;  // n1, mixed (= x1); rstd1 below
    if (SoftmaxKind(kind))
      return (n + t * (2 * hq * d.head_dim + 2 * hk * d.head_dim)) * e + (t + t * hq) * es + MohSaved(kind);  // + lse
    const int64_t thd = t * hq * d.head_dim;
    n += thd * (3 + (d.lightning_silu ? 3 : 0) + 1);  // qa,ka,va, q,k,v, a
    return n * e + t * es + MohSaved(kind);
  }
  // MoH (model/moh.h): the router's activations (shared scores, routed
  // logits and scores, the kept heads' ids and p, lse, α), the gates, the
  // gated input of W_o and the skip mask.
  int64_t MohSaved(char kind) const {
    if (!MohKind(kind)) return 0;
    const int64_t shared = d.moh.shared_heads, routed = d.heads - shared, k = routed > 0 ? d.moh.top_k : 0;
    const int64_t block = SoftmaxKind(kind) ? 64 : d.lightning_block;
    return t * (shared + 2 * routed + 2 * k + 3 + hq + hq * d.head_dim) * e + hq * ((t + block - 1) / block) * 4;
  }
  int64_t SavedPost(char kind) const {
    int64_t n = t * c + 3 * t * f;  // n2, SwiGLU gate, up, h; rstd2 below
    int64_t stats = t;
    if (!SoftmaxKind(kind)) {
      const int64_t thd = t * hq * d.head_dim;
      if (d.lightning_norm) n += thd, stats += t * hq;  // n, rstd
      if (d.lightning_gate) n += 2 * thd;               // g, y
    }
    return n * e + stats * es;
  }
  int64_t Saved(char kind) const { return SavedPre(kind) + SavedPost(kind); }
  int64_t LightningState() const { return rows * hq * d.head_dim * d.head_dim * es; }

  void BlockForward(Ledger& m, char kind) const {
    m.Alloc(SavedPre(kind));
    if (!SoftmaxKind(kind)) {
      m.Alloc(LightningState());
      m.Free(LightningState());
    }
    m.Alloc(SavedPost(kind));
  }

  // Mixer backward transients (softmax_attention_layer.cc /
  // lightning_attention_layer.cc Backward), all freed at its return.
  void MixerBackward(Ledger& m, char kind) const {
    if (MohKind(kind)) {  // dgates, then the router's logit gradients (model/moh.cc)
      const int64_t router = t * (hq + d.heads + 2) * e;
      m.Alloc(router);
      m.Free(router);
    }
    if (SoftmaxKind(kind)) {
      const int64_t b = t * (2 * hq + 2 * hk) * d.head_dim * e;  // d_o, dq, dk, dv
      m.Alloc(b);
      m.Free(b);
      return;
    }
    const int64_t thd = t * hq * d.head_dim * e;
    int64_t held = thd;  // d_y
    m.Alloc(thd);
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
    m.Free(3 * thd + held);
  }

  void LossBackward(Ledger& m) const {
    m.Alloc(t * c * e + t * es);  // final_x, final_rstd
    m.Alloc(Tc());                // dh
    int64_t logits, extra = 0;
    if (!d.device.is_cpu() && tp == 1) {
      // ops/cuda/cross_entropy.cu: f32 logits of 2,048 rows at vocab 32,000
      // (rows scaled to keep 250 MiB), plus their bf16 copy in bf16 runs.
      const int64_t rows = std::min<int64_t>(t, std::max<int64_t>(1, 2048 * 32000 / d.padded_vocab));
      logits = rows * d.padded_vocab * (4 + (d.mixed_bf16 ? 2 : 0));
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
      const int64_t mlp = 3 * s.t * s.f * s.e;  // dh, dgate, dup
      m.Alloc(mlp);
      m.Free(mlp);
      m.Alloc(tc);  // dx1
      s.MixerBackward(m, kind);
      m.Free(2 * tc);  // dx1, dn
      m.Free(s.Saved(kind));
    }
    // layer_inputs.clear(): the outputs, the embedding output or the input.
    m.Free(static_cast<int64_t>(layers.size()) * tc + (first || !input_held_elsewhere ? tc : 0));
    m.Free(first ? 2 * tc : tc);  // dprev (and dx on the first stage)
  }
};

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

  // ---- Parameters in Model::params() order (model.cc, block.cc CollectParams).
  std::vector<int64_t> sizes;
  const bool has_embed = o.pp_rank == 0, has_head = o.pp_rank == lay.pp - 1;
  const int64_t vocab_rows = d.padded_vocab / tp, f = d.ffn / tp, hq = d.heads / tp, hk = d.kv_heads / tp;
  const int64_t qd = hq * d.head_dim, kvd = hk * d.head_dim;
  if (has_embed) sizes.push_back(vocab_rows * c);
  std::vector<std::vector<int>> chunk_layers(lay.vpp);
  for (int v = 0; v < lay.vpp; ++v) {
    const int first_layer = (v * lay.pp + o.pp_rank) * per_stage;
    for (int l = first_layer; l < first_layer + per_stage; ++l) {
      chunk_layers[v].push_back(l);
      sizes.push_back(c);  // norm1
      if (SoftmaxKind(d.kinds[l])) {
        sizes.insert(sizes.end(), {qd * c, kvd * c, kvd * c, c * qd});
      } else {
        sizes.insert(sizes.end(), {qd * c, qd * c, qd * c});
        if (d.lightning_gate) sizes.push_back(qd * c);
        sizes.push_back(c * qd);
        if (d.lightning_norm) sizes.push_back(d.head_dim);
      }
      if (MohKind(d.kinds[l])) sizes.push_back(d.MohRouterRows() * c);  // W_s, W_r, W_h (counted as one)
      sizes.push_back(c);  // norm2
      sizes.insert(sizes.end(), {f * c, f * c, c * f});
    }
  }
  if (has_head) {
    sizes.push_back(c);  // final norm
    if (!d.tie_embeddings) sizes.push_back(vocab_rows * c);
  }

  MemoryEstimate m;
  for (int64_t n : sizes) m.parameters += n;
  // ---- DataParallel's buckets (parallel/data_parallel.cc): backward order,
  // a bucket closes before a parameter that would take it past bucket_mb.
  const int64_t g = int64_t{lay.dp} * lay.cp;
  const int64_t bucket_elems = std::max<int64_t>(1, static_cast<int64_t>(o.bucket_mb * (1 << 20) / e));
  std::vector<int64_t> buckets;
  int64_t total = 0, begin = 0;
  auto close = [&] {
    const int64_t size = (total - begin + g - 1) / g * g;
    total = begin + size;
    buckets.push_back(size);
  };
  for (size_t k = sizes.size(); k-- > 0;) {
    if (total - begin > 0 && total - begin + sizes[k] > bucket_elems) {
      close();
      begin = total;
    }
    total += sizes[k];
  }
  close();
  m.param_bytes = total * e;
  m.grad_bytes = total * e;
  if (o.zero) {
    int64_t slice = 0;
    for (int64_t b : buckets) slice += b / g;
    m.grad_bytes += slice * e;
    m.optimizer_bytes = 2 * slice * e;
  } else {
    m.optimizer_bytes = 2 * m.parameters * e;
  }
  // bf16 runs: the bf16 copy of every matrix (Param::compute).
  if (d.mixed_bf16)
    for (int64_t n : sizes)
      if (n != c && n != d.head_dim) m.param_bytes += n * ea;

  // ---- Activations of one step.
  if (o.seq_len % lay.cp != 0) return absl::InvalidArgumentError("[memory] seq_len not divisible by cp");
  const StepShapes s{d, o.micro_batch * o.seq_len / lay.cp, o.micro_batch, c, f, hq, hk, ea, tp,
                     DTypeSize(d.stat_dtype())};
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
