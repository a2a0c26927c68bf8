#!/usr/bin/env python3
"""The PyTorch oracle for Loom's training step (issue 9; docs/oracle.md).

Rebuilds Loom's model in PyTorch from what `loom-train --export_oracle`
writes into <run_dir>/oracle/ (checkpoint/oracle_export.h: config.json, the
initial weights, batches.bin) and trains on the very same micro-batches:

  embedding -> [RMSNorm -> mixer -> +, RMSNorm -> SwiGLU -> +] x layers
  -> RMSNorm -> output (tied or untied; padded vocab rows never scored)
  -> cross-entropy summed over targets != -100, divided by the step's count
  of such targets (the normaliser is per step, over all micro-batches)
mixers:
  S  softmax (or sigmoid) attention, GQA, causal within a row and document,
     RoPE half-split (dimension i pairs with i + D/2) from the exported table
  L  lightning attention (Lightning Attention-2 with a per-head decay, no 1/sqrt(D)),
     SiLU on q, k, v, RMSNorm over each head with one shared weight, sigmoid
     output gate from the block input: each switch as the config sets it
optimizer: gradients summed over micro-batches, global-norm clipping
(scale max/(norm + 1e-6) when norm > max), AdamW with bias correction and
decoupled decay on the params Loom decays (optim/adamw.cc), the learning rate
of optim/lr_schedule.cc.

Per step it prints loss, grad norm and tokens/s; at the end one JSON line.
With --compare <run_dir>/metrics.jsonl it checks Loom's losses against its own.

A second mode, --config FILE.textproto, needs no Loom run: random weights
(Loom's init stds) and random tokens, for throughput only (its losses mean
nothing against Loom's).

PyTorch is a tool for this check, never a dependency of Loom.
"""
import argparse
import contextlib
import json
import math
import os
import re
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# ---------------------------------------------------------------- inputs


def read_safetensors(path):
    """{name: CPU tensor} from a safetensors file (the format is tiny)."""
    dtypes = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64, "F16": np.float16}
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        if e["dtype"] == "BF16":
            raw = np.frombuffer(data, dtype=np.int16, count=(end - b) // 2, offset=base + b)
            t = torch.from_numpy(raw.copy()).view(torch.bfloat16).float()
        else:
            arr = np.frombuffer(data, dtype=dtypes[e["dtype"]], count=(end - b) // np.dtype(dtypes[e["dtype"]]).itemsize,
                                offset=base + b)
            t = torch.from_numpy(arr.copy())
        out[name] = t.reshape(e["shape"])
    return out


def read_batches(path):
    """Steps in order, each a list of micro-batch dicts (checkpoint/oracle_export.h)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"LOOMBTCH":
        sys.exit(f"{path}: not a Loom batches file (magic {data[:8]!r})")
    version, header_bytes = struct.unpack_from("<II", data, 8)
    if version != 1:
        sys.exit(f"{path}: version {version}, this oracle reads 1")
    at = header_bytes
    steps = []
    while at < len(data):
        step, micro, micros, rows, seq_len, has_docs, step_targets, lr = struct.unpack_from("<7qd", data, at)
        at += 64
        t = rows * seq_len

        def ids(n):
            nonlocal at
            a = np.frombuffer(data, dtype=np.int32, count=n, offset=at)
            at += 4 * n
            return torch.from_numpy(a.astype(np.int64))

        b = {"step": step, "micro": micro, "micros": micros, "rows": rows, "seq_len": seq_len,
             "step_targets": step_targets, "lr": lr}
        b["tokens"], b["targets"], b["positions"] = (ids(t).view(rows, seq_len) for _ in range(3))
        cu = ids(rows + 1)
        if not torch.equal(cu, torch.arange(rows + 1) * seq_len):
            sys.exit(f"{path}: step {step} micro-batch {micro}: rows of unequal length (varlen) are not replayed")
        b["docs"] = ids(t).view(rows, seq_len) if has_docs else None
        if micro == 0:
            if len(steps) != step:
                sys.exit(f"{path}: step {step} follows step {len(steps) - 1}")
            steps.append([])
        steps[step].append(b)
    return steps


# ---------------------------------------------------------------- the model's pieces


def lightning_decay(heads, layer, layers):
    """ops/cpu/lightning_attention.cc LightningDecay: ALiBi slopes scaled by depth, lambda = exp(-slope)."""
    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (h + 1) for h in range(n)]
    n = 1
    while 2 * n <= heads:
        n *= 2
    slopes = power_of_two(n)
    if n != heads:
        finer = power_of_two(2 * n)
        i = 0
        while len(slopes) < heads:
            slopes.append(finer[i])
            i += 2
    factor = 1.0 if layers == 1 else 1.0 - layer / (layers - 1) + 1e-5
    return [math.exp(-s * factor) for s in slopes]


def learning_rate(o, step, total):
    """optim/lr_schedule.cc."""
    # o.lr() * o.min_lr_ratio() multiplies two C++ floats: a float product.
    lr, min_lr, warmup = o["lr"], float(np.float32(o["lr"]) * np.float32(o["min_lr_ratio"])), o["warmup_steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if o["schedule"] == "constant":
        return lr
    span = max(1, total - warmup - 1)
    p = min(max((step - warmup) / span, 0.0), 1.0)
    if o["schedule"] == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))
    if o["schedule"] == "linear":
        return lr - (lr - min_lr) * p
    decay_steps = max(1.0, o["decay_fraction"] * total)
    decay_start = total - decay_steps
    if step < decay_start:
        return lr
    q = min(max((step - decay_start + 1) / decay_steps, 0.0), 1.0)
    return lr - (lr - min_lr) * q


def rms_norm(x, w, eps, out_dtype):
    """ops/cpu/rmsnorm.cc: y = x / sqrt(mean(x^2) + eps) * w, statistics in f32."""
    xf = x.double() if out_dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(out_dtype)


def rope(x, cos, sin):
    """ops/cpu/rope.cc, half-split: (x_i, x_{i+D/2}) rotated by pos * inv_freq_i. x [R, N, H, D]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def same_doc_causal(docs, n, device):
    """[R, 1, N, N] bool: key j visible to query i (j <= i, same document)."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if docs is None:
        return causal[None, None]
    return (causal[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]


class Attention:
    """How softmax attention runs: cuDNN SDPA (bf16 on CUDA), else the math path."""

    def __init__(self, device, dtype, gqa_native):
        self.cudnn = device.type == "cuda" and dtype == torch.bfloat16
        self.gqa_native = gqa_native

    def __call__(self, q, k, v, docs, sigmoid, sigmoid_bias):
        # q [R, Hq, N, D], k, v [R, Hk, N, D]
        rows, hq, n, d = q.shape
        hk = k.shape[1]
        scale = 1.0 / math.sqrt(d)
        if sigmoid:
            # ops/softmax_attention.h: P = sigmoid(scale q k^T + b) on visible keys, o = P v, no normaliser.
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
            st = torch.float64 if q.dtype == torch.float64 else torch.float32
            s = torch.matmul(q.to(st), k.to(st).transpose(-1, -2)) * scale + sigmoid_bias
            p = torch.sigmoid(s) * same_doc_causal(docs, n, q.device)
            return torch.matmul(p, v.to(st)).to(q.dtype)
        gqa = self.gqa_native and hq != hk
        if not gqa and hq != hk:
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
        if q.device.type == "cpu" or q.dtype == torch.float64:
            # The math written out, in the activations' dtype (f32 for the equivalence check); f64 on a GPU,
            # where SDPA has no fused kernel, by blocks of queries.
            return math_attention(q, k, v, docs, scale, block=1024 if q.device.type == "cuda" else None)
        if docs is None and q.device.type == "cuda":
            # cuDNN's kernel when LoomModel.loss_sum restricted SDPA to it (bf16).
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=same_doc_causal(docs, n, q.device), enable_gqa=gqa)


def math_attention(q, k, v, docs, scale, block=None):
    """Softmax attention written out: softmax(scale q k^T, masked) v, k and v
    repeated over the GQA group. With `block`, a block of queries at a time,
    each block computed again in the backward, so that the [Hq, block, N]
    scores of one block exist at a time, not [Hq, N, N] (17 GB a copy at 32
    heads and 8K tokens in f64)."""
    rows, hq, n, d = q.shape
    if k.shape[1] != hq:
        k = k.repeat_interleave(hq // k.shape[1], dim=1)
        v = v.repeat_interleave(hq // v.shape[1], dim=1)
    visible = same_doc_causal(docs, n, q.device)

    def one(qb, lo):
        s = torch.matmul(qb, k.transpose(-1, -2)) * scale
        s = s.masked_fill(~visible[:, :, lo:lo + qb.shape[2]], float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1), v)

    if block is None:
        return one(q, 0)
    from torch.utils.checkpoint import checkpoint
    return torch.cat([checkpoint(one, q[:, :, lo:lo + block], lo, use_reentrant=False) for lo in range(0, n, block)],
                     dim=2)


def lightning_attention(q, k, v, log_decay, docs, chunk):
    """Chunked lightning attention, exactly ops/lightning_attention.h's definition:
      o_i = sum_{j <= i, same document} lambda^(i-j) (q_i . k_j) v_j
    q, k, v [R, H, N, D] (f32), log_decay [H] (log lambda), docs [R, N] or None.
    With C tokens a chunk and chunks c = 0 .. M-1:
      intra  O_c  = [(Q_c K_c^T) * Mask] V_c,  Mask[i, j] = lambda^(i-j) [j <= i, same doc]
      local  U_c  = sum_{j in the chunk's last document} lambda^(C-1-j) k_j^T v_j
      state  S_c  = sum_{c' < c, same document as c-1's last token} lambda^(C (c-1-c')) U_c'
             (the state entering chunk c: documents are contiguous, so a chunk
             whose last document is c-1's carries all of its predecessors' too)
      inter  O_c[i] += lambda^(i+1) [doc_i = doc of c-1's last token] q_i S_c
    """
    rows, heads, n, d = q.shape
    c = min(chunk, n)
    m = (n + c - 1) // c
    pad = m * c - n
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # zero keys and values add nothing
        if docs is not None:
            docs = F.pad(docs, (0, pad), value=-1)
    q, k, v = (t.reshape(rows, heads, m, c, d) for t in (q, k, v))
    dev = q.device
    idx = torch.arange(c, device=dev, dtype=q.dtype)
    ld = log_decay.to(dev, q.dtype)[:, None]  # [H, 1]
    diff = idx[:, None] - idx[None, :]
    # Exponents are masked after the multiply: log(lambda) may be 0 (no decay) and 0 * inf is NaN.
    mask = torch.exp(torch.where(diff >= 0, diff[None] * ld[:, :, None], float("-inf")))  # [H, C, C], 0 above the diagonal
    mask = mask[None, :, None]  # [1, H, 1, C, C]
    w_key = torch.exp((c - 1 - idx)[None] * ld)[None, :, None]  # [1, H, 1, C]: lambda^(C-1-j)
    w_query = torch.exp((idx + 1)[None] * ld)[None, :, None]  # lambda^(i+1)
    cidx = torch.arange(m, device=dev, dtype=q.dtype)
    gap = cidx[:, None] - 1 - cidx[None, :]  # c - 1 - c'
    carry = torch.exp(torch.where(gap >= 0, (gap * c)[None] * ld[:, :, None], float("-inf")))[None]  # [1, H, M, M]
    if docs is not None:
        dc = docs.reshape(rows, m, c)
        last = dc[:, :, -1]  # [R, M]: each chunk's last document
        prev_last = torch.cat((torch.full_like(last[:, :1], -2), last[:, :-1]), dim=1)  # entering doc
        mask = mask * (dc[:, :, :, None] == dc[:, :, None, :])[:, None]
        w_key = w_key * (dc == last[:, :, None])[:, None]
        w_query = w_query * (dc == prev_last[:, :, None])[:, None]
        carry = carry * (last[:, None, :] == prev_last[:, :, None])[:, None]
    scores = torch.matmul(q, k.transpose(-1, -2)) * mask
    o = torch.matmul(scores, v)
    u = torch.matmul((k * w_key[..., None]).transpose(-1, -2), v)  # [R, H, M, D, D]
    s = torch.matmul(carry, u.reshape(rows, heads, m, d * d)).reshape(rows, heads, m, d, d)
    o = o + torch.matmul(q * w_query[..., None], s)
    return o.reshape(rows, heads, m * c, d)[:, :, :n]


class LoomModel:
    """Loom's decoder (model/*.cc) over a {name: tensor} weight dict.

    Three functions do the work: a softmax block, a lightning block and the
    head (final norm + loss). With --compile each is compiled once and reused
    by every layer of its kind (weights are arguments), which keeps the
    compile time of a 22-layer model that of one block.
    """

    def __init__(self, cfg, device, act_dtype, gqa_native, lightning_chunk, compile_blocks, recompute=False):
        self.m = m = cfg["model"]
        self.device, self.dt = device, act_dtype
        self.st = torch.float64 if act_dtype == torch.float64 else torch.float32  # statistics, as Loom's
        if m["moe_experts"] > 0:
            sys.exit("torch_oracle: MoE models are not replayed")
        self.attention = Attention(device, act_dtype, gqa_native)
        self.inv_freq = torch.tensor(m["rope_inv_freq"], dtype=torch.float64, device=device)
        self.rope_factor = m["rope_attention_factor"]
        self.chunk = lightning_chunk or m["lightning_block"]
        self.log_decay = {}
        for layer, lam in m["lightning_decays"].items():
            mine = lightning_decay(m["heads"], int(layer), m["layers"]) if m["lightning_decay"] else [1.0] * m["heads"]
            worst = max(abs(a - b) for a, b in zip(lam, mine))
            if worst > 1e-12:
                sys.exit(f"torch_oracle: layer {layer}: exported decays differ from LightningDecay by {worst:g}")
            self.log_decay[int(layer)] = torch.log(torch.tensor(lam, dtype=torch.float64)).to(device, self.st)
        wrap = torch.compile if compile_blocks else (lambda f: f)
        self.head = wrap(self._head)
        self.softmax_block = wrap(self._softmax_block)
        self.lightning_block = wrap(self._lightning_block)
        if recompute:
            # Each block keeps only its input and runs its forward again in the backward (model.recompute "all").
            from torch.utils.checkpoint import checkpoint
            sb, lb = self.softmax_block, self.lightning_block
            self.softmax_block = lambda *a: checkpoint(sb, *a, use_reentrant=False)
            self.lightning_block = lambda *a: checkpoint(lb, *a, use_reentrant=False)

    def rope_tables(self, positions):
        # ops/cpu/rope.cc: angles, cos and sin in double.
        angle = positions.to(torch.float64)[..., None] * self.inv_freq
        cos = (torch.cos(angle) * self.rope_factor).to(self.dt)[:, :, None, :]
        sin = (torch.sin(angle) * self.rope_factor).to(self.dt)[:, :, None, :]
        return cos, sin

    def _mlp_residual(self, x, norm2, w_gate, w_up, w_down):
        dt = self.dt
        y = rms_norm(x, norm2, self.m["norm_eps"], dt)
        return x + F.linear(F.silu(F.linear(y, w_gate.to(dt))) * F.linear(y, w_up.to(dt)), w_down.to(dt))

    def _softmax_block(self, x, norm1, wq, wk, wv, wo, norm2, w_gate, w_up, w_down, cos, sin, docs):
        m, dt = self.m, self.dt
        rows, n, _ = x.shape
        h, hk, d = m["heads"], m["kv_heads"], m["head_dim"]
        y = rms_norm(x, norm1, m["norm_eps"], dt)
        q = rope(F.linear(y, wq.to(dt)).view(rows, n, h, d), cos, sin).transpose(1, 2)
        k = rope(F.linear(y, wk.to(dt)).view(rows, n, hk, d), cos, sin).transpose(1, 2)
        v = F.linear(y, wv.to(dt)).view(rows, n, hk, d).transpose(1, 2)
        o = self.attention(q, k, v, docs, m["sigmoid_attention"], m["sigmoid_bias"])
        x = x + F.linear(o.transpose(1, 2).reshape(rows, n, h * d), wo.to(dt))
        return self._mlp_residual(x, norm2, w_gate, w_up, w_down)

    def _lightning_block(self, x, norm1, wq, wk, wv, wg, wo, head_norm, norm2, w_gate, w_up, w_down, log_decay,
                         docs):
        m, dt = self.m, self.dt
        rows, n, _ = x.shape
        h, d = m["heads"], m["head_dim"]
        y = rms_norm(x, norm1, m["norm_eps"], dt)
        q, k, v = (F.linear(y, w.to(dt)).view(rows, n, h, d) for w in (wq, wk, wv))
        if m["lightning_silu"]:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        # The attention itself in f32 (Loom keeps its states in f32 too).
        o = lightning_attention(*(t.transpose(1, 2).to(self.st) for t in (q, k, v)), log_decay, docs,
                                self.chunk).transpose(1, 2)  # [R, N, H, D]
        o = rms_norm(o, head_norm, m.get("lightning_norm_eps", m["norm_eps"]), dt) if m["lightning_norm"] else o.to(dt)
        o = o.reshape(rows, n, h * d)
        if m["lightning_gate"]:
            o = o * torch.sigmoid(F.linear(y, wg.to(dt)))
        x = x + F.linear(o, wo.to(dt))
        return self._mlp_residual(x, norm2, w_gate, w_up, w_down)

    def _head(self, x, final_norm, out, targets):
        m = self.m
        y = rms_norm(x, final_norm, m["norm_eps"], self.dt)
        # Padded vocabulary rows are masked in Loom: never scored here.
        logits = F.linear(y, out[: m["vocab"]].to(self.dt)).to(self.st)
        return F.cross_entropy(logits.view(-1, m["vocab"]), targets.reshape(-1), ignore_index=-100, reduction="sum")

    def loss_sum(self, w, tokens, targets, positions, docs):
        """Sum of cross-entropy over the targets != -100 of one micro-batch (f32)."""
        m = self.m
        # bf16 on CUDA without documents: SDPA may use cuDNN only (an error, not a fallback, if it cannot).
        # Set around the compiled blocks, so that tracing sees it; the backward follows the forward's kernel.
        only_cudnn = self.attention.cudnn and docs is None
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if only_cudnn else contextlib.nullcontext():
            return self._loss_sum(w, tokens, targets, positions, docs)

    def _loss_sum(self, w, tokens, targets, positions, docs):
        m = self.m
        cos, sin = self.rope_tables(positions)
        x = F.embedding(tokens, w["embed"].to(self.dt))
        for layer, kind in enumerate(m["kinds"]):
            p = f"layers.{layer}."
            a, mp = p + "attn.", p + "mlp."
            mlp = (w[p + "norm2"], w[mp + "w_gate"], w[mp + "w_up"], w[mp + "w_down"])
            if kind == "S":
                x = self.softmax_block(x, w[p + "norm1"], w[a + "wq"], w[a + "wk"], w[a + "wv"], w[a + "wo"], *mlp,
                                       cos, sin, docs)
            else:
                x = self.lightning_block(x, w[p + "norm1"], w[a + "wq"], w[a + "wk"], w[a + "wv"], w.get(a + "wg"),
                                         w[a + "wo"], w.get(a + "norm"), *mlp, self.log_decay[layer], docs)
        return self.head(x, w["final_norm"], w["embed"] if m["tie_embeddings"] else w["lm_head"], targets)


# ---------------------------------------------------------------- synthetic mode (--config)


def parse_textproto(text):
    """The subset of protobuf text format Loom's configs use: nested blocks, scalars, repeated blocks."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}:]|[^\s{}:"]+', re.sub(r"#[^\n]*", "", text))
    pos = 0

    def block():
        nonlocal pos
        out = {}
        while pos < len(tokens) and tokens[pos] != "}":
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "{":
                pos += 1
                val = block()
                pos += 1
            else:
                raw = tokens[pos]
                pos += 1
                val = raw[1:-1] if raw.startswith('"') else (raw == "true" if raw in ("true", "false") else float(raw))
            out.setdefault(key, []).append(val)
        return {k: (v if len(v) > 1 else v[0]) for k, v in out.items()}

    return block()


def proto_defaults(proto_path):
    """{message: {field: default}} from configs/loom.proto's [default = ...]."""
    out, msg = {}, None
    for line in open(proto_path):
        mm = re.match(r"\s*message\s+(\w+)", line)
        if mm:
            msg = mm.group(1)
            out[msg] = {}
        f = re.match(r"\s*optional\s+(\w+)\s+(\w+)\s*=\s*\d+\s*(?:\[default\s*=\s*(.+?)\])?;", line)
        if f and msg:
            typ, name, dflt = f.groups()
            if dflt is None:
                continue
            dflt = dflt.strip()
            if typ == "string":
                out[msg][name] = dflt.strip('"')
            elif typ == "bool":
                out[msg][name] = dflt == "true"
            else:
                out[msg][name] = float(dflt)
    return out


def float32(x):
    return float(np.float32(x))


def synthetic_export(config_path, sets, steps, seed, device):
    """config.json-like dict, random weights and random batches for a config (throughput only)."""
    defaults = proto_defaults(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "loom.proto"))
    cfg = parse_textproto(open(config_path).read())
    for s in sets:
        path, val = s.split("=", 1)
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = val.strip('"') if not re.match(r"^-?[\d.e+-]+$", val) else float(val)
    get = lambda msg, sec, k: cfg.get(sec, {}).get(k, defaults[msg].get(k))
    mo = lambda k: get("ModelConfig", "model", k)
    tr = lambda k: get("TrainConfig", "train", k)
    op = lambda k: get("OptimConfig", "optim", k)
    hidden, heads, layers = int(mo("hidden")), int(mo("heads")), int(mo("layers"))
    d = hidden // heads
    pattern = mo("pattern")
    kinds = "".join(pattern[i % len(pattern)] for i in range(layers))
    ffn = int(mo("ffn_hidden")) or (8 * hidden // 3 + 63) // 64 * 64
    vocab = int(mo("vocab"))
    padded = (vocab + 63) // 64 * 64
    theta = float32(mo("rope_theta"))
    m = {"kinds": kinds, "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": int(mo("kv_heads")),
         "head_dim": d, "ffn": ffn, "vocab": vocab, "padded_vocab": padded,
         "tie_embeddings": bool(mo("tie_embeddings")), "norm_eps": float32(mo("norm_eps")), "rope_theta": theta,
         "sigmoid_attention": mo("attention") == "sigmoid", "sigmoid_bias": -math.log(tr("seq_len")),
         "lightning_block": int(mo("lightning_block")), "lightning_decay": bool(mo("lightning_decay")),
         "lightning_silu": bool(mo("lightning_silu")), "lightning_norm": bool(mo("lightning_norm")),
         "lightning_norm_eps": float32(mo("lightning_norm_eps") or mo("norm_eps")),
         "lightning_gate": bool(mo("lightning_gate")), "moe_experts": 0,
         "rope_inv_freq": [theta ** (-2.0 * i / d) for i in range(d // 2)], "rope_attention_factor": 1.0}
    m["lightning_decays"] = {str(l): (lightning_decay(heads, l, layers) if m["lightning_decay"] else [1.0] * heads)
                             for l in range(layers) if kinds[l] == "L"}
    train = {k: int(tr(k)) for k in ("steps", "seq_len", "global_batch", "micro_batch")}
    train["dtype"] = tr("dtype")
    optim = {k: float32(op(k)) for k in ("lr", "min_lr_ratio", "decay_fraction", "beta1", "beta2", "eps",
                                          "weight_decay", "grad_clip")}
    optim["warmup_steps"], optim["schedule"] = int(op("warmup_steps")), op("schedule")
    std = float32(mo("init_std"))
    out_std = std / math.sqrt(2.0 * layers)
    params = [("embed", [padded, hidden], std, True)]
    kvd = m["kv_heads"] * d
    for l, kind in enumerate(kinds):
        p = f"layers.{l}."
        params.append((p + "norm1", [hidden], 0, False))
        if kind == "S":
            params += [(p + "attn.wq", [heads * d, hidden], std, True), (p + "attn.wk", [kvd, hidden], std, True),
                       (p + "attn.wv", [kvd, hidden], std, True), (p + "attn.wo", [hidden, heads * d], out_std, True)]
        else:
            params += [(p + "attn." + nm, [heads * d, hidden], std, True) for nm in ("wq", "wk", "wv")]
            if m["lightning_gate"]:
                params.append((p + "attn.wg", [heads * d, hidden], std, True))
            params.append((p + "attn.wo", [hidden, heads * d], out_std, True))
            if m["lightning_norm"]:
                params.append((p + "attn.norm", [d], 0, False))
        params += [(p + "norm2", [hidden], 0, False), (p + "mlp.w_gate", [ffn, hidden], std, True),
                   (p + "mlp.w_up", [ffn, hidden], std, True), (p + "mlp.w_down", [hidden, ffn], out_std, True)]
    params.append(("final_norm", [hidden], 0, False))
    if not m["tie_embeddings"]:
        params.append(("lm_head", [padded, hidden], std, True))
    cfg_json = {"model": m, "train": train, "optim": optim,
                "params": [{"name": n, "shape": s, "weight_decay": wd} for n, s, _, wd in params]}
    # Drawn on the device: a 1B model's weights take minutes from one CPU generator.
    wgen = torch.Generator(device=device).manual_seed(seed)
    init = {n: (torch.randn(s, generator=wgen, device=device) * sd if sd > 0 else torch.ones(s, device=device))
            for n, s, sd, _ in params}
    gen = torch.Generator().manual_seed(seed)
    rows, n = train["micro_batch"], train["seq_len"]
    micros = train["global_batch"] // rows
    batches = []
    for step in range(steps):
        micro_list = []
        for i in range(micros):
            seq = torch.randint(0, vocab, (rows, n + 1), generator=gen)
            micro_list.append({"step": step, "micro": i, "micros": micros, "rows": rows, "seq_len": n,
                               "step_targets": rows * n * micros, "lr": learning_rate(optim, step, train["steps"]),
                               "tokens": seq[:, :-1], "targets": seq[:, 1:],
                               "positions": torch.arange(n).expand(rows, n), "docs": None})
        batches.append(micro_list)
    return cfg_json, init, batches


# ---------------------------------------------------------------- training


def probe_cudnn_gqa(device):
    """Whether cuDNN SDPA takes GQA (enable_gqa) here, forward and backward; else k, v are repeated."""
    try:
        q = torch.randn(1, 8, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 2, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize()
        return True
    except RuntimeError as e:
        print(f"cuDNN SDPA without native GQA here ({str(e).splitlines()[0][:120]}): k, v repeated", flush=True)
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", help="<run_dir>/oracle from loom-train --export_oracle")
    src.add_argument("--config", help="a Loom .textproto: random weights and tokens (throughput only)")
    ap.add_argument("--set", action="append", default=[], help="with --config: path.to.field=value")
    ap.add_argument("--steps", type=int, default=0, help="steps to train (0: all exported; --config: 10)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f64"], default="f32",
                    help="f64: everything in double, against Loom's train.dtype=f64 (CPU) or as the exact "
                         "reference an f32 run's losses and gradient norms are measured against (GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks and the head")
    ap.add_argument("--recompute", action="store_true",
                    help="recompute each block in the backward (what makes gpu_1b_hybrid's 32K tokens fit)")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the mean tokens/s")
    ap.add_argument("--lightning-chunk", type=int, default=0, help="tokens a chunk (0: model.lightning_block)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--compare", help="Loom's metrics.jsonl: compare the losses")
    ap.add_argument("--rtol", type=float, default=1e-4, help="with --compare: largest relative loss difference")
    ap.add_argument("--json", help="also write the final JSON line to this file")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_oracle: --device cuda, but torch sees no GPU")
    if args.dtype == "bf16" and device.type != "cuda":
        sys.exit("torch_oracle: bf16 runs on CUDA only (as Loom's bf16)")
    # f32 means f32: no TF32 in matmuls or cuDNN.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    act_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f64": torch.float64}[args.dtype]
    master_dtype = torch.float64 if args.dtype == "f64" else torch.float32

    if args.export:
        cfg = json.load(open(os.path.join(args.export, "config.json")))
        init = read_safetensors(os.path.join(args.export, "init", "step_00000000", "rank_00000.safetensors"))
        steps_data = read_batches(os.path.join(args.export, "batches.bin"))
    else:
        cfg, init, steps_data = synthetic_export(args.config, args.set, args.steps or 10, 1234, device)
    steps = min(args.steps or len(steps_data), len(steps_data))
    if steps == 0:
        sys.exit("torch_oracle: no exported steps")

    # Master weights f32 (the exported dtype otherwise), gradients in the same dtype.
    w, decay, no_decay = {}, [], []
    for p in cfg["params"]:
        t = init[p["name"]]
        if list(t.shape) != p["shape"]:
            sys.exit(f"torch_oracle: {p['name']} is {list(t.shape)} in the weights, {p['shape']} in config.json")
        w[p["name"]] = t.to(device=device, dtype=master_dtype).requires_grad_(True)
        (decay if p["weight_decay"] else no_decay).append(w[p["name"]])
    o = cfg["optim"]
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    adam_kw = {"fused": True} if device.type == "cuda" and master_dtype != torch.float64 else {"foreach": True}
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=o["lr"], betas=(o["beta1"], o["beta2"]),
                            eps=o["eps"], **adam_kw)
    params = list(w.values())

    gqa_native = probe_cudnn_gqa(device) if device.type == "cuda" and act_dtype == torch.bfloat16 else True
    model = LoomModel(cfg, device, act_dtype, gqa_native, args.lightning_chunk, args.compile, args.recompute)
    loss_fn = model.loss_sum

    total_steps = cfg["train"]["steps"]
    losses, norms, rates = [], [], []
    print(f"torch {torch.__version__} | {args.device} {args.dtype}{' compiled' if args.compile else ''} | "
          f"model {cfg['model']['kinds']} hidden {cfg['model']['hidden']} | "
          f"{sum(t.numel() for t in params) / 1e6:.2f}M parameters | {steps} steps", flush=True)
    for step in range(steps):
        micro = steps_data[step]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        normaliser = float(max(micro[0]["step_targets"], 1))
        loss = torch.zeros((), dtype=torch.float64, device=device)
        tokens = 0
        for b in micro:
            def put(t):
                return None if t is None else t.to(device, non_blocking=True)
            s = loss_fn(w, put(b["tokens"]), put(b["targets"]), put(b["positions"]), put(b["docs"]))
            (s / normaliser).backward()
            loss += s.detach().double()
            tokens += b["tokens"].numel()
        # optim/adamw.cc ClipGradNorm: the norm of all gradients; scaled when above the limit.
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).double())
        clip = o["grad_clip"]
        norm_value = norm.item()
        if clip > 0 and norm_value > clip:
            torch._foreach_mul_(grads, clip / (norm_value + 1e-6))
        lr = learning_rate(o, step, total_steps)
        if abs(lr - micro[0]["lr"]) > 1e-12 * max(1.0, abs(lr)):
            sys.exit(f"torch_oracle: step {step + 1}: lr {lr!r} here, {micro[0]['lr']!r} in Loom's export")
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=False)
        loss_value = loss.item() / normaliser
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        losses.append(loss_value)
        norms.append(norm_value)
        rates.append(tokens / seconds)
        print(f"step {step + 1:5d} | loss {loss_value:.6f} | grad norm {norm_value:.4f} | lr {lr:.3e} | "
              f"{tokens / seconds:,.0f} tok/s | {seconds:.3f} s", flush=True)

    skip = min(args.warmup, len(rates) - 1)
    timed = rates[skip:]
    result = {"oracle": "torch", "torch": torch.__version__, "device": args.device,
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": args.dtype, "compile": args.compile, "kinds": cfg["model"]["kinds"],
              "steps": steps, "losses": losses, "grad_norms": norms,
              "tokens_per_s_mean": sum(timed) / len(timed), "warmup_steps": skip}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    status = 0
    if args.compare:
        loom = {}
        for line in open(args.compare):
            r = json.loads(line)
            if "loss" in r:
                loom[int(r["step"])] = r["loss"]
        worst, worst_step = 0.0, 0
        for i, ours in enumerate(losses):
            if i + 1 not in loom:
                sys.exit(f"torch_oracle: {args.compare} has no loss for step {i + 1}")
            rel = abs(ours - loom[i + 1]) / max(abs(loom[i + 1]), 1e-30)
            if rel > worst:
                worst, worst_step = rel, i + 1
        result["compare"] = {"max_rel_diff": worst, "at_step": worst_step, "rtol": args.rtol}
        ok = worst <= args.rtol
        print(f"losses vs Loom over {len(losses)} steps: largest relative difference {worst:.3e} at step "
              f"{worst_step} (Loom {loom.get(worst_step, float('nan')):.8f}, oracle "
              f"{losses[worst_step - 1] if worst_step else float('nan'):.8f}); tolerance {args.rtol:g}: "
              f"{'ok' if ok else 'FAIL'}", flush=True)
        status = 0 if ok else 1
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
