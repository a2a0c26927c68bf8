// mpirun -np P loom-bench --what=cp [--cp_seq=1024,4096] [--cp_rows=1] [--cp_heads=8]
//     [--cp_kv_heads=4] [--cp_head_dim=64] [--steps N] [--json]
// Context-parallel attention schemes (parallel/cp_attention.h,
// parallel/cp_lightning.h) with cp = P, one layer call (forward + backward)
// per repetition, f32, on zig-zag chunks of random inputs. Per scheme and
// sequence length, the table gives:
//   recv MB/rank  bytes a rank receives from other ranks per layer call
//                 (forward + backward), from the communicator's counters:
//                 recv messages + all_gather in·(P−1) + reduce_scatter
//                 in·(P−1)/P + all_to_all in·(P−1)/P; the largest over ranks
//   calls         communicator calls per rank per layer call (the largest)
//   time ms       forward + backward, the slowest rank, mean of --steps
//   peak MB/rank  the most bytes held at once by the scheme (CpMemoryLedger:
//                 the local q, k, v, o, lse, d_o, dq, dk, dv while the calls
//                 run, plus every buffer the scheme allocates: blocks in
//                 flight, gathered K/V, partial outputs, all-to-all staging,
//                 states, and what it keeps from forward to backward); not
//                 the score tiles inside the single-chunk ops, the same for
//                 every scheme. The largest over ranks.
// A "serial" row per length runs the single-process op on the full rows on
// rank 0 (the others wait), counted the same way: the baseline of the run.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "bench/bench.h"
#include "ops/lightning_attention.h"
#include "ops/softmax_attention.h"
#include "parallel/cp_attention.h"
#include "parallel/cp_lightning.h"
#include "parallel/mpi_communicator.h"
#include "runtime/timer.h"

ABSL_FLAG(std::string, cp_seq, "1024,4096", "sequence lengths (tokens per row), comma separated");
ABSL_FLAG(int, cp_rows, 1, "rows (sequences) per micro-batch");
ABSL_FLAG(int, cp_heads, 8, "query heads (softmax) / heads (lightning)");
ABSL_FLAG(int, cp_kv_heads, 4, "KV heads of the softmax layer");
ABSL_FLAG(int, cp_head_dim, 64, "head dimension");

namespace loom {
namespace {

struct Row {
  std::string scheme;
  int64_t seq = 0;
  double recv_bytes = 0, calls = 0, seconds = 0, peak = 0;
};

double ReceivedBytes(const CommCounters& c, int p) {
  const double f = p > 1 ? static_cast<double>(p - 1) : 0.0;
  return static_cast<double>(c.Bytes(CommOp::kRecv)) + c.Bytes(CommOp::kAllGather) * f +
         (c.Bytes(CommOp::kReduceScatter) + c.Bytes(CommOp::kAllToAll)) * f / p;
}

int64_t Calls(const CommCounters& c) {
  int64_t n = 0;
  for (int i = 0; i < kCommOps; ++i) n += c.calls[i];
  return n;
}

// Max over the ranks of each field.
absl::Status MaxOverRanks(Communicator& world, Row& row) {
  Tensor t = Tensor::FromVector<double>({row.recv_bytes, row.calls, row.seconds, row.peak}, {4});
  LOOM_RETURN_IF_ERROR(world.AllReduce(t, ReduceOp::kMax));
  row.recv_bytes = t.Get(0);
  row.calls = t.Get(1);
  row.seconds = t.Get(2);
  row.peak = t.Get(3);
  return absl::OkStatus();
}

struct Shapes {
  int64_t rows, seq, hq, hk, d;
};

// One scheme: `call(ledger)` runs forward + backward once.
template <typename Call>
absl::StatusOr<Row> Measure(Communicator& world, const std::string& name, int64_t seq, int steps, Call call) {
  Row row{name, seq};
  CpMemoryLedger ledger;
  LOOM_RETURN_IF_ERROR(call(&ledger));  // warm-up, and the counted pass
  world.ResetCounters();
  ledger.Reset();
  LOOM_RETURN_IF_ERROR(call(&ledger));
  row.recv_bytes = ReceivedBytes(world.counters(), world.size());
  row.calls = static_cast<double>(Calls(world.counters()));
  row.peak = static_cast<double>(ledger.peak);
  LOOM_RETURN_IF_ERROR(world.Barrier());
  Timer timer;
  for (int s = 0; s < steps; ++s) LOOM_RETURN_IF_ERROR(call(nullptr));
  row.seconds = timer.Seconds() / steps;
  LOOM_RETURN_IF_ERROR(MaxOverRanks(world, row));
  return row;
}

absl::StatusOr<std::vector<Row>> MeasureLength(Communicator& world, const Shapes& sh, int steps) {
  const int cp = world.size(), rank = world.rank();
  std::vector<Row> out;
  LOOM_RETURN_IF_ERROR(CheckZigzag(sh.seq, cp));
  LOOM_ASSIGN_OR_RETURN(CpChunks layout, ZigzagChunks(sh.rows, sh.seq, cp, rank));
  const int64_t t = layout.local_tokens();
  const uint64_t seed = 1000 + rank;
  auto random = [&](const Shape& s, uint64_t k) {
    Tensor x = Tensor::Empty(s, DType::kF32);
    uint64_t z = seed * 7919 + k;
    for (int64_t i = 0; i < x.numel(); ++i) {
      z = z * 6364136223846793005ULL + 1442695040888963407ULL;
      x.data<float>()[i] = static_cast<float>(static_cast<int64_t>(z >> 40) % 2001 - 1000) / 1000.0f;
    }
    return x;
  };
  const ops::TokenRows local_rows = ops::TokenRows::Uniform(sh.rows, 2 * layout.chunk);
  ops::AttentionOptions attn;

  // Serial baselines on rank 0: the full rows, one process.
  {
    const int64_t n = sh.rows * sh.seq;
    const ops::TokenRows rows = ops::TokenRows::Uniform(sh.rows, sh.seq);
    Tensor q = random({n, sh.hq, sh.d}, 1), k = random({n, sh.hk, sh.d}, 2), v = random({n, sh.hk, sh.d}, 3);
    Tensor d_o = random({n, sh.hq, sh.d}, 4);
    Tensor o = Tensor::Empty(q.shape(), DType::kF32), lse = Tensor::Empty({n, sh.hq}, DType::kF32);
    Tensor dq = Tensor::Empty(q.shape(), DType::kF32), dk = Tensor::Empty(k.shape(), DType::kF32),
           dv = Tensor::Empty(v.shape(), DType::kF32);
    auto softmax = [&](CpMemoryLedger* l) -> absl::Status {
      if (rank != 0) return absl::OkStatus();
      std::vector<HeldTensor> held;
      for (const Tensor* x : {&q, &k, &v, &o, &lse, &d_o, &dq, &dk, &dv}) held.push_back(HeldTensor::Wrap(l, *x));
      ops::SoftmaxAttentionForward(q, k, v, rows, rows, attn, o, lse);
      ops::SoftmaxAttentionBackward(q, k, v, o, lse, d_o, rows, rows, attn, dq, dk, dv);
      return absl::OkStatus();
    };
    LOOM_ASSIGN_OR_RETURN(Row r, Measure(world, "serial softmax", sh.seq, steps, softmax));
    out.push_back(r);
    Tensor lk = random({n, sh.hq, sh.d}, 5), lv = random({n, sh.hq, sh.d}, 6), lo, state, ldq, ldk, ldv, none;
    std::vector<double> lambda = ops::LightningDecay(static_cast<int>(sh.hq), 0, 1);
    Tensor decay = Tensor::FromVector<float>(std::vector<float>(lambda.begin(), lambda.end()), {sh.hq});
    Tensor lq = random({n, sh.hq, sh.d}, 7);
    auto lightning = [&](CpMemoryLedger* l) -> absl::Status {
      if (rank != 0) return absl::OkStatus();
      ops::LightningAttentionForward(lq, lk, lv, decay, rows, {}, Tensor(), lo, state);
      ops::LightningAttentionBackward(lq, lk, lv, decay, rows, {}, Tensor(), d_o, Tensor(), ldq, ldk, ldv, none);
      std::vector<HeldTensor> held;  // inputs, outputs, gradients (counted once all exist)
      for (const Tensor* x : {&lq, &lk, &lv, &lo, &d_o, &ldq, &ldk, &ldv}) held.push_back(HeldTensor::Wrap(l, *x));
      return absl::OkStatus();
    };
    LOOM_ASSIGN_OR_RETURN(Row r2, Measure(world, "serial lightning", sh.seq, steps, lightning));
    out.push_back(r2);
  }

  // Softmax schemes.
  {
    Tensor q = random({t, sh.hq, sh.d}, 11), k = random({t, sh.hk, sh.d}, 12), v = random({t, sh.hk, sh.d}, 13);
    Tensor d_o = random({t, sh.hq, sh.d}, 14), o, lse, dq, dk, dv;
    for (CpSoftmaxScheme scheme : {CpSoftmaxScheme::kRing, CpSoftmaxScheme::kAllGather, CpSoftmaxScheme::kUlysses}) {
      if (!CheckCpAttention(scheme, cp, sh.hq, sh.hk).ok()) continue;
      auto call = [&](CpMemoryLedger* l) -> absl::Status {
        const CpAttentionOptions opt{scheme, false, l};
        CpAttentionSaved saved;
        LOOM_RETURN_IF_ERROR(CpAttentionForward(world, opt, layout, q, k, v, local_rows, attn, o, lse, &saved));
        return CpAttentionBackward(world, opt, layout, q, k, v, o, lse, d_o, local_rows, attn, &saved, dq, dk, dv);
      };
      LOOM_ASSIGN_OR_RETURN(Row r, Measure(world, CpSoftmaxSchemeName(scheme), sh.seq, steps, call));
      out.push_back(r);
    }
  }
  // Lightning schemes.
  {
    Tensor q = random({t, sh.hq, sh.d}, 21), k = random({t, sh.hq, sh.d}, 22), v = random({t, sh.hq, sh.d}, 23);
    Tensor d_o = random({t, sh.hq, sh.d}, 24), o, dq, dk, dv;
    std::vector<double> lambda = ops::LightningDecay(static_cast<int>(sh.hq), 0, 1);
    Tensor decay = Tensor::FromVector<float>(std::vector<float>(lambda.begin(), lambda.end()), {sh.hq});
    for (CpLinearScheme scheme : {CpLinearScheme::kLasp1, CpLinearScheme::kLasp2}) {
      auto call = [&](CpMemoryLedger* l) -> absl::Status {
        const CpLightningOptions opt{scheme, l};
        CpLightningSaved saved;
        LOOM_RETURN_IF_ERROR(CpLightningForward(world, opt, layout, q, k, v, decay, local_rows, o, &saved));
        return CpLightningBackward(world, opt, layout, q, k, v, decay, local_rows, d_o, &saved, dq, dk, dv);
      };
      LOOM_ASSIGN_OR_RETURN(Row r, Measure(world, CpLinearSchemeName(scheme), sh.seq, steps, call));
      out.push_back(r);
    }
  }
  return out;
}

int BenchCp(const config::Config&) {
  auto world_or = MpiWorld(/*timeout_s=*/600);
  if (!world_or.ok()) {
    std::fprintf(stderr, "loom-bench: %s\n", std::string(world_or.status().message()).c_str());
    return 1;
  }
  Communicator& world = **world_or;
  const auto lengths_or = bench::ParseSizes("cp_seq", absl::GetFlag(FLAGS_cp_seq));
  if (!lengths_or) return 1;
  const std::vector<int64_t>& lengths = *lengths_or;
  const int steps = std::max(1, absl::GetFlag(FLAGS_steps));
  const bool json = absl::GetFlag(FLAGS_json), print = world.rank() == 0;
  if (print && !json) {
    std::printf("cp = %d ranks, rows %d, heads %d (softmax KV heads %d), head dim %d, f32; per layer call "
                "(forward + backward), largest over ranks\n",
                world.size(), absl::GetFlag(FLAGS_cp_rows), absl::GetFlag(FLAGS_cp_heads),
                absl::GetFlag(FLAGS_cp_kv_heads), absl::GetFlag(FLAGS_cp_head_dim));
    std::printf("%-18s %8s %14s %7s %12s %14s\n", "scheme", "seq", "recv MB/rank", "calls", "time ms",
                "peak MB/rank");
  }
  for (int64_t n : lengths) {
    const Shapes sh{absl::GetFlag(FLAGS_cp_rows), n, absl::GetFlag(FLAGS_cp_heads), absl::GetFlag(FLAGS_cp_kv_heads),
                    absl::GetFlag(FLAGS_cp_head_dim)};
    auto rows = MeasureLength(world, sh, steps);
    if (!rows.ok()) {
      if (print) std::fprintf(stderr, "loom-bench: %s\n", std::string(rows.status().message()).c_str());
      return 1;
    }
    if (!print) continue;
    for (const Row& r : *rows) {
      if (json)
        std::printf("{\"what\": \"cp\", \"cp\": %d, \"scheme\": \"%s\", \"seq\": %ld, \"recv_bytes_per_rank\": %.0f, "
                    "\"calls\": %.0f, \"seconds\": %.6f, \"peak_bytes_per_rank\": %.0f}\n",
                    world.size(), r.scheme.c_str(), static_cast<long>(r.seq), r.recv_bytes, r.calls, r.seconds,
                    r.peak);
      else
        std::printf("%-18s %8ld %14.3f %7.0f %12.2f %14.3f\n", r.scheme.c_str(), static_cast<long>(r.seq),
                    r.recv_bytes / 1e6, r.calls, r.seconds * 1e3, r.peak / 1e6);
    }
    std::fflush(stdout);
  }
  return 0;
}

LOOM_BENCHMARK("cp", "context-parallel attention schemes under mpirun: bytes, time and peak memory per rank",
               BenchCp);

}  // namespace
}  // namespace loom
