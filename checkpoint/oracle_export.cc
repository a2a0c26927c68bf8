#include "checkpoint/oracle_export.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "checkpoint/checkpoint.h"
#include "ops/lightning_attention.h"
#include "optim/lr_schedule.h"
#include "runtime/config.h"

namespace loom::checkpoint {
namespace {

constexpr char kMagic[8] = {'L', 'O', 'O', 'M', 'B', 'T', 'C', 'H'};
constexpr uint32_t kVersion = 1;

// %.17g round-trips a double; proto floats are widened first, so the oracle
// computes with the very values Loom does.
std::string Num(double x) { return absl::StrFormat("%.17g", x); }
std::string Bool(bool b) { return b ? "true" : "false"; }
std::string Str(const std::string& s) { return absl::StrCat("\"", s, "\""); }  // config strings: no quotes inside

std::string ConfigJson(const config::Config& config, const ModelDims& d, const ParamList& params) {
  std::vector<std::string> decays;
  for (int l = 0; l < d.layers; ++l) {
    if (d.kinds[l] != 'L') continue;
    std::vector<double> lambda(d.heads, 1.0);
    if (d.lightning_decay) lambda = ops::LightningDecay(d.heads, l, d.layers);
    decays.push_back(absl::StrCat("\"", l, "\": [", absl::StrJoin(lambda, ", ", [](std::string* out, double x) {
                                    absl::StrAppend(out, Num(x));
                                  }),
                                  "]"));
  }
  // The softmax layers' RoPE table (rope_theta and rope_scaling), as the model
  // holds it: the oracle rotates with these very frequencies.
  const std::vector<double>& inv_freq = d.rope.inv_freq;
  std::vector<std::string> plist;
  for (const Param* p : params) {
    plist.push_back(absl::StrFormat("    {\"name\": \"%s\", \"shape\": [%s], \"weight_decay\": %s}", p->name,
                                    absl::StrJoin(p->global_shape, ", "), Bool(p->weight_decay)));
  }
  const auto& t = config.train();
  const auto& o = config.optim();
  std::string j = "{\n  \"format\": \"loom-oracle\", \"version\": 1,\n  \"model\": {";
  absl::StrAppend(&j, "\"kinds\": ", Str(d.kinds), ", \"layers\": ", d.layers, ", \"hidden\": ", d.hidden,
                  ", \"heads\": ", d.heads, ", \"kv_heads\": ", d.kv_heads, ", \"head_dim\": ", d.head_dim,
                  ", \"ffn\": ", d.ffn, ", \"vocab\": ", d.vocab, ", \"padded_vocab\": ", d.padded_vocab,
                  ", \"tie_embeddings\": ", Bool(d.tie_embeddings), ", \"norm_eps\": ", Num(d.norm_eps),
                  ", \"rope_theta\": ", Num(d.rope_theta), ", \"sigmoid_attention\": ", Bool(d.sigmoid_attention),
                  ", \"sigmoid_bias\": ", Num(d.sigmoid_bias), ", \"lightning_block\": ", d.lightning_block,
                  ", \"lightning_decay\": ", Bool(d.lightning_decay), ", \"lightning_silu\": ", Bool(d.lightning_silu),
                  ", \"lightning_norm\": ", Bool(d.lightning_norm),
                  ", \"lightning_norm_eps\": ", Num(d.lightning_norm_eps), ", \"lightning_gate\": ", Bool(d.lightning_gate),
                  ", \"moe_experts\": ", d.moe.experts, ",\n    \"rope_inv_freq\": [",
                  absl::StrJoin(inv_freq, ", ", [](std::string* out, double x) { absl::StrAppend(out, Num(x)); }),
                  "], \"rope_attention_factor\": ", Num(d.rope.attention_factor), ",\n    \"lightning_decays\": {",
                  absl::StrJoin(decays, ", "), "}},\n");
  absl::StrAppend(&j, "  \"train\": {\"steps\": ", t.steps(), ", \"seq_len\": ", t.seq_len(),
                  ", \"global_batch\": ", t.global_batch(), ", \"micro_batch\": ", t.micro_batch(),
                  ", \"seed\": ", t.seed(), ", \"dtype\": ", Str(t.dtype()), "},\n");
  absl::StrAppend(&j, "  \"optim\": {\"lr\": ", Num(o.lr()), ", \"min_lr_ratio\": ", Num(o.min_lr_ratio()),
                  ", \"warmup_steps\": ", o.warmup_steps(), ", \"schedule\": ", Str(o.schedule()),
                  ", \"decay_fraction\": ", Num(o.decay_fraction()), ", \"beta1\": ", Num(o.beta1()),
                  ", \"beta2\": ", Num(o.beta2()), ", \"eps\": ", Num(o.eps()), ", \"weight_decay\": ",
                  Num(o.weight_decay()), ", \"grad_clip\": ", Num(o.grad_clip()), "},\n");
  absl::StrAppend(&j, "  \"params\": [\n", absl::StrJoin(plist, ",\n"), "\n  ]\n}\n");
  return j;
}

}  // namespace

absl::StatusOr<std::unique_ptr<OracleExport>> OracleExport::Start(const std::string& dir, const config::Config& config,
                                                                  const ModelDims& dims, const ParamList& params,
                                                                  int world, int64_t start_step) {
  if (world != 1)
    return absl::InvalidArgumentError(absl::StrCat(
        "[oracle_export] --export_oracle needs one process (got ", world, " ranks): its weights are the global ones"));
  if (start_step != 0)
    return absl::InvalidArgumentError(absl::StrCat("[oracle_export] --export_oracle needs a fresh run, this one "
                                                   "resumes at step ", start_step,
                                                   " (set checkpoint.resume=none or a new train.run_dir)"));
  if (dims.moe.experts > 0)
    return absl::InvalidArgumentError("[oracle_export] --export_oracle: MoE models are not replayed by the oracle");
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);  // a stale export of an earlier run must not mix with this one
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("[oracle_export] cannot create ", dir, ": ", ec.message()));

  {
    const std::string path = dir + "/config.json";
    std::ofstream out(path);
    out << ConfigJson(config, dims, params);
    if (!out.good()) return absl::InternalError(absl::StrCat("[oracle_export] ", path, ": cannot write"));
  }

  CheckpointState state;
  state.config_text = ConfigToText(config);
  for (const Param* p : params) {
    if (p->sharded()) return absl::InvalidArgumentError(absl::StrCat("[oracle_export] ", p->name, " is a TP slice"));
    Tensor host = Tensor::Empty(p->value.shape(), p->value.dtype());  // the master, wherever it lives
    host.CopyFrom(p->value);
    state.tensors.push_back({p->name, host});
  }
  LOOM_RETURN_IF_ERROR(SaveCheckpoint(dir + "/init", state, /*keep=*/0));

  std::unique_ptr<OracleExport> e(new OracleExport());
  e->config_ = config;
  e->path_ = dir + "/batches.bin";
  e->file_ = std::fopen(e->path_.c_str(), "wb");
  if (e->file_ == nullptr)
    return absl::InvalidArgumentError(absl::StrCat("[oracle_export] ", e->path_, ": ", std::strerror(errno)));
  const uint32_t header[2] = {kVersion, 16};
  if (std::fwrite(kMagic, 1, 8, e->file_) != 8 || std::fwrite(header, 4, 2, e->file_) != 2)
    return absl::InternalError(absl::StrCat("[oracle_export] ", e->path_, ": write failed"));
  return e;
}

OracleExport::~OracleExport() {
  if (file_ != nullptr) std::fclose(file_);
}

absl::Status OracleExport::WriteStep(int64_t step, const std::vector<Batch>& micro_batches) {
  int64_t step_targets = 0;
  for (const Batch& b : micro_batches) step_targets += b.CountTargets();
  const double lr = LearningRate(config_.optim(), step, config_.train().steps());
  auto put = [&](const void* p, size_t bytes) { return std::fwrite(p, 1, bytes, file_) == bytes; };
  auto put_ids = [&](const Tensor& t) { return put(t.raw(), t.nbytes()); };
  bool ok = true;
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    const Batch& b = micro_batches[i];
    LOOM_CHECK(b.tokens.dtype() == DType::kI32 && b.tokens.device().is_cpu() && b.cp_chunks == nullptr,
               "[oracle_export] batches must be whole, i32, on the CPU");
    const int64_t head[7] = {step,      static_cast<int64_t>(i), static_cast<int64_t>(micro_batches.size()),
                             b.rows,    b.seq_len,               b.token_rows.has_docs() ? 1 : 0,
                             step_targets};
    ok = ok && put(head, sizeof(head)) && put(&lr, sizeof(lr));
    ok = ok && put_ids(b.tokens) && put_ids(b.targets) && put_ids(b.positions) && put_ids(b.token_rows.cu_seqlens);
    if (b.token_rows.has_docs()) ok = ok && put_ids(b.token_rows.doc_ids);
  }
  ok = ok && std::fflush(file_) == 0;
  if (!ok) return absl::InternalError(absl::StrCat("[oracle_export] ", path_, ": write failed"));
  return absl::OkStatus();
}

}  // namespace loom::checkpoint
