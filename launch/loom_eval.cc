// loom-eval --checkpoint DIR [--data PATHS] [--buckets 8]
//           [--needle_lengths 256,512,1024] [--needle_depths 0,0.25,0.5,0.75,1] --out DIR
// Long-context evaluation of a checkpoint (one process, CPU or one GPU):
//
// 1. Perplexity by position. Held-out sequences of --seq_len tokens (default
//    the checkpoint's train.seq_len) from --data (indexed-dataset prefixes,
//    comma-separated; the valid split of --data_split) or else the
//    checkpoint config's own data (the valid split of its files, or the
//    eval split of its built-in task). The positions 0 .. L−1 are cut into
//    --buckets equal ranges [b·L/B, (b+1)·L/B); a bucket's loss is the mean
//    cross-entropy of the targets at those positions (ignored targets do
//    not count), its perplexity exp(loss). Falling loss with position means
//    the model uses its longer context.
// 2. Needle in a haystack (data/needle.h with the checkpoint's
//    data.needle settings): for every context length × needle depth,
//    --needle_samples held-out samples; accuracy = the fraction whose greedy
//    (argmax) answer is the needle's value. Chance is 1/value_vocab.
//
// Prints both tables and writes <out>/eval.md, <out>/eval.json and, when
// python3 with matplotlib is there, <out>/needle_heatmap.png
// (bench/needle_heatmap.py). Exit 0 on success, 1 on a bad checkpoint or
// data, 2 on bad usage.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <google/protobuf/text_format.h>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "checkpoint/checkpoint.h"
#include "data/associative_recall.h"
#include "data/gpt_dataset.h"
#include "data/needle.h"
#include "model/model.h"
#include "runtime/config.h"
#include "runtime/cuda_runtime.h"
#include "runtime/timer.h"
#include "runtime/tool_flags.h"

ABSL_FLAG(std::string, checkpoint, "", "checkpoint directory (through its `latest`) or one step_<N>/ directory");
ABSL_FLAG(std::string, data, "",
          "held-out indexed datasets for the perplexity, comma-separated prefixes (default: the checkpoint config's "
          "data)");
ABSL_FLAG(std::string, data_split, "",
          "train,valid,test shares of the --data documents; the valid split is evaluated (default: the checkpoint "
          "config's data.split)");
ABSL_FLAG(int, seq_len, 0, "tokens per perplexity sequence (0: the checkpoint's train.seq_len)");
ABSL_FLAG(int, sequences, 32, "held-out sequences for the perplexity (0: skip it)");
ABSL_FLAG(int, buckets, 8, "position buckets of the perplexity table");
ABSL_FLAG(std::string, needle_lengths, "256,512,1024", "context lengths of the needle grid, tokens (\"\": skip it)");
ABSL_FLAG(std::string, needle_depths, "0,0.25,0.5,0.75,1", "needle depths of the grid, fractions of the context");
ABSL_FLAG(int, needle_samples, 32, "samples per needle grid cell");
ABSL_FLAG(int, micro_batch, 8, "sequences per forward pass");
ABSL_FLAG(std::string, device, "auto", "cpu, cuda (GPU 0) or auto");
ABSL_FLAG(std::string, out, "", "directory for eval.md, eval.json and needle_heatmap.png (required)");
ABSL_FLAG(std::string, heatmap_script, "",
          "the heatmap script (default: bench/needle_heatmap.py of the source tree Loom was built from)");

namespace loom {
namespace {

struct BucketResult {
  int64_t from = 0, to = 0;  // positions [from, to)
  int64_t tokens = 0;        // counted targets
  double loss_sum = 0;
  double loss() const { return tokens ? loss_sum / tokens : NAN; }
};

struct NeedleGrid {
  std::vector<int64_t> lengths;
  std::vector<double> depths;
  std::vector<std::vector<Accuracy>> cells;  // [length][depth]
  double chance = 0;
};

// The model of a checkpoint, its weights loaded, on `device`.
struct LoadedModel {
  config::Config config;
  int64_t step = 0;
  std::string step_dir;
  std::unique_ptr<Model> model;
};

absl::StatusOr<LoadedModel> LoadModel(const std::string& path, Device device) {
  LoadedModel out;
  LOOM_ASSIGN_OR_RETURN(out.step_dir, checkpoint::ResolveStepDir(path));
  LOOM_ASSIGN_OR_RETURN(checkpoint::CheckpointState state, checkpoint::LoadCheckpoint(out.step_dir));
  if (!google::protobuf::TextFormat::ParseFromString(state.config_text, &out.config))
    return absl::InvalidArgumentError(absl::StrCat(out.step_dir, ": the saved config does not parse"));
  out.step = state.step;
  // bf16 runs evaluate in f32 on the CPU (their masters are f32).
  if (device.is_cpu() && out.config.train().dtype() == "bf16") out.config.mutable_train()->set_dtype("f32");
  ModelDims dims = ModelDims::FromConfig(out.config);
  dims.device = device;
  out.model = std::make_unique<Model>(dims);
  std::map<std::string, Tensor> by_name;
  for (auto& t : state.tensors) by_name[t.name] = t.tensor;
  for (Param* p : out.model->params()) {
    auto it = by_name.find(p->name);
    if (it == by_name.end()) return absl::InvalidArgumentError(absl::StrCat(out.step_dir, ": tensor ", p->name, " missing"));
    if (it->second.shape() != p->value.shape() || it->second.dtype() != p->value.dtype())
      return absl::InvalidArgumentError(absl::StrCat(out.step_dir, ": tensor ", p->name, " has shape [",
                                                     absl::StrJoin(it->second.shape(), ", "), "] ",
                                                     DTypeName(it->second.dtype()), ", the model wants [",
                                                     absl::StrJoin(p->value.shape(), ", "), "] ",
                                                     DTypeName(p->value.dtype())));
    p->value.CopyFrom(it->second);
  }
  out.model->RefreshComputeWeights();
  return out;
}

// Held-out batches for the perplexity: rows [first, first + rows).
using BatchSource = std::function<Batch(int64_t first, int64_t rows)>;

absl::StatusOr<BatchSource> HeldOutData(const config::Config& config, const std::string& data_flag, int64_t seq_len,
                                        std::string* what) {
  config::Config c = config;
  c.mutable_train()->set_seq_len(static_cast<int32_t>(seq_len));
  const std::string& task = c.data().task();
  if (data_flag.empty() && task == "recall") {
    auto recall = std::make_shared<AssociativeRecall>(c);
    *what = "the associative recall task's eval split";
    return BatchSource([recall](int64_t f, int64_t n) { return recall->MakeBatch(AssociativeRecall::Split::kEval, f, n); });
  }
  if (data_flag.empty() && task == "needle") {
    auto needle = std::make_shared<Needle>(c);
    *what = "the needle task's eval split (only answers count)";
    return BatchSource([needle](int64_t f, int64_t n) { return needle->MakeBatch(Needle::Split::kEval, f, n); });
  }
  GptDatasetOptions o;
  o.seq_len = seq_len;
  o.seed = c.train().seed();
  o.eod_token = c.data().eod_token();
  o.reset_positions = c.data().reset_positions();
  o.reset_attention = c.data().reset_attention();
  if (!data_flag.empty()) {
    for (absl::string_view p : absl::StrSplit(data_flag, ',', absl::SkipEmpty())) o.sources.push_back({std::string(p), 1.0});
    const std::string split = absl::GetFlag(FLAGS_data_split);
    o.split = split.empty() ? c.data().split() : split;
    *what = absl::StrCat("the valid split (", o.split, ") of ", data_flag);
  } else {
    for (const auto& p : c.data().paths()) o.sources.push_back({p.prefix(), p.weight()});
    o.split = c.data().split();
    *what = absl::StrCat("the valid split (", o.split, ") of the checkpoint's data.paths");
  }
  LOOM_ASSIGN_OR_RETURN(std::shared_ptr<GptDataset> text, GptDataset::Open(o));
  if (text->num_tokens(GptDataset::Split::kValid) == 0)
    return absl::InvalidArgumentError(absl::StrCat(*what, ": no held-out tokens"));
  return BatchSource([text](int64_t f, int64_t n) { return text->MakeBatch(GptDataset::Split::kValid, f, n); });
}

// One forward per micro-batch; the final norm and the loss run per bucket
// of each row on the slice of the residual stream at those positions. The
// last entry is all positions at once (one loss over the whole micro-batch),
// which the buckets must add up to.
std::vector<BucketResult> PerplexityByPosition(Model& model, const BatchSource& data, int64_t seq_len,
                                               int64_t sequences, int buckets, int64_t micro) {
  std::vector<BucketResult> out(buckets + 1);
  out[buckets].to = seq_len;
  for (int b = 0; b < buckets; ++b) {
    out[b].from = b * seq_len / buckets;
    out[b].to = (b + 1) * seq_len / buckets;
  }
  const Device device = model.dims().device;
  for (int64_t first = 0; first < sequences; first += micro) {
    const int64_t rows = std::min(micro, sequences - first);
    const Batch batch = data(first, rows).To(device);
    const Tensor residual = model.ChunkForward(0, batch, Tensor());
    const ops::CrossEntropyResult all = model.ChunkLoss(residual, batch, 1.0, nullptr);
    out[buckets].loss_sum += all.loss;
    out[buckets].tokens += all.counted;
    for (int64_t r = 0; r < rows; ++r) {
      for (int i = 0; i < buckets; ++i) {
        BucketResult& b = out[i];
        if (b.to == b.from) continue;
        const int64_t at = r * seq_len + b.from, n = b.to - b.from;
        Batch part;
        part.targets = batch.targets.Slice(at, n);
        const ops::CrossEntropyResult ce = model.ChunkLoss(residual.Slice(at, n), part, 1.0, nullptr);
        b.loss_sum += ce.loss;  // normalizer 1: the summed loss
        b.tokens += ce.counted;
      }
    }
    model.ReleaseChunk(0);
  }
  return out;
}

NeedleGrid NeedleAccuracy(Model& model, const config::Config& config, const std::vector<int64_t>& lengths,
                          const std::vector<double>& depths, int64_t samples, int64_t micro) {
  NeedleGrid g;
  g.lengths = lengths;
  g.depths = depths;
  g.chance = 1.0 / config.data().needle().value_vocab();
  const Device device = model.dims().device;
  for (int64_t length : lengths) {
    g.cells.emplace_back();
    for (double depth : depths) {
      config::NeedleConfig task = config.data().needle();
      task.set_depth(depth);
      const Needle needle(task, length, config.train().seed());
      Accuracy a;
      for (int64_t first = 0; first < samples; first += micro) {
        const Batch batch = needle.MakeBatch(Needle::Split::kEval, first, std::min(micro, samples - first));
        Tensor predicted = Tensor::Empty({batch.tokens_count()}, DType::kI32, device);
        model.Evaluate(batch.To(device), 1.0, &predicted);
        const Accuracy part = CountCorrect(predicted.To(Device::Cpu()), batch.targets);
        a.correct += part.correct;
        a.total += part.total;
      }
      g.cells.back().push_back(a);
    }
  }
  return g;
}

std::string Num(double v, const char* format = "%.4f") {
  return std::isfinite(v) ? absl::StrFormat(format, v) : std::string("null");
}

std::string PerplexityMarkdown(const std::vector<BucketResult>& buckets) {
  std::string s = "| positions | tokens | loss | perplexity |\n|---|---:|---:|---:|\n";
  for (size_t i = 0; i < buckets.size(); ++i) {
    const BucketResult& b = buckets[i];
    absl::StrAppend(&s, absl::StrFormat("| %s | %d | %s | %s |\n",
                                        i + 1 == buckets.size() ? "all" : absl::StrFormat("%d-%d", b.from, b.to - 1),
                                        b.tokens,
                                        b.tokens ? Num(b.loss()) : "-", b.tokens ? Num(std::exp(b.loss()), "%.3f") : "-"));
  }
  return s;
}

std::string NeedleMarkdown(const NeedleGrid& g) {
  std::string s = "| length \\ depth |";
  for (double d : g.depths) absl::StrAppend(&s, absl::StrFormat(" %g |", d));
  absl::StrAppend(&s, " mean |\n|---:|");
  for (size_t i = 0; i <= g.depths.size(); ++i) absl::StrAppend(&s, "---:|");
  absl::StrAppend(&s, "\n");
  for (size_t l = 0; l < g.lengths.size(); ++l) {
    absl::StrAppend(&s, "| ", g.lengths[l], " |");
    double sum = 0;
    for (const Accuracy& a : g.cells[l]) {
      absl::StrAppend(&s, absl::StrFormat(" %.1f%% |", 100 * a.value()));
      sum += a.value();
    }
    absl::StrAppend(&s, absl::StrFormat(" %.1f%% |\n", 100 * sum / g.depths.size()));
  }
  return s;
}

std::string Json(const LoadedModel& m, const std::string& data_what, int64_t seq_len, int64_t sequences,
                 const std::vector<BucketResult>& buckets, const NeedleGrid* g, int64_t samples) {
  std::string s = absl::StrFormat("{\n  \"checkpoint\": \"%s\",\n  \"step\": %d,\n", m.step_dir, m.step);
  if (!buckets.empty()) {
    absl::StrAppend(&s, absl::StrFormat("  \"perplexity_by_position\": {\"data\": \"%s\", \"seq_len\": %d, "
                                        "\"sequences\": %d, \"buckets\": [\n",
                                        data_what, seq_len, sequences));
    for (size_t i = 0; i + 1 < buckets.size(); ++i) {
      const BucketResult& b = buckets[i];
      absl::StrAppend(&s, absl::StrFormat("    {\"from\": %d, \"to\": %d, \"tokens\": %d, \"loss\": %s, "
                                          "\"perplexity\": %s}%s\n",
                                          b.from, b.to, b.tokens, Num(b.loss(), "%.6f"),
                                          Num(std::exp(b.loss()), "%.6f"), i + 2 < buckets.size() ? "," : ""));
    }
    const BucketResult& all = buckets.back();
    absl::StrAppend(&s, absl::StrFormat("  ], \"all\": {\"tokens\": %d, \"loss\": %s, \"perplexity\": %s}}%s\n",
                                        all.tokens, Num(all.loss(), "%.6f"), Num(std::exp(all.loss()), "%.6f"),
                                        g ? "," : ""));
  }
  if (g) {
    absl::StrAppend(&s, absl::StrFormat("  \"needle\": {\"samples\": %d, \"chance\": %.6f,\n", samples, g->chance));
    absl::StrAppend(&s, "    \"lengths\": [", absl::StrJoin(g->lengths, ", "), "],\n");
    absl::StrAppend(&s, "    \"depths\": [", absl::StrJoin(g->depths, ", "), "],\n    \"accuracy\": [\n");
    for (size_t l = 0; l < g->lengths.size(); ++l) {
      std::vector<std::string> row;
      for (const Accuracy& a : g->cells[l]) row.push_back(absl::StrFormat("%.6f", a.value()));
      absl::StrAppend(&s, "      [", absl::StrJoin(row, ", "), "]", l + 1 < g->lengths.size() ? "," : "", "\n");
    }
    absl::StrAppend(&s, "    ]}\n");
  }
  absl::StrAppend(&s, "}\n");
  return s;
}

absl::Status WriteText(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out.good()) return absl::InternalError(absl::StrCat(path.string(), ": cannot write"));
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<std::vector<T>> ParseList(const std::string& flag, const std::string& text) {
  std::vector<T> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    T v;
    bool ok;
    if constexpr (std::is_integral_v<T>) ok = absl::SimpleAtoi(part, &v);
    else ok = absl::SimpleAtod(part, &v);
    if (!ok) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", part, "' is not a number"));
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<Device> ResolveDevice(const std::string& how) {
  const bool gpu = BuiltWithCuda() && CudaDeviceCount() > 0;
  if (how == "cpu" || (how == "auto" && !gpu)) return Device::Cpu();
  if (how != "cuda" && how != "auto") return absl::InvalidArgumentError(absl::StrCat("--device: '", how, "' is not cpu, cuda or auto"));
  if (!gpu) return absl::InvalidArgumentError("--device cuda: no GPU is visible, or Loom was built without CUDA");
  return Device::Cuda(0);
}

// Runs bench/needle_heatmap.py when python3 can import matplotlib.
void Heatmap(const std::filesystem::path& out) {
  std::string script = absl::GetFlag(FLAGS_heatmap_script);
  if (script.empty()) script = std::string(LOOM_SOURCE_DIR) + "/bench/needle_heatmap.py";
  if (std::system("python3 -c 'import matplotlib' >/dev/null 2>&1") != 0) {
    std::printf("no PNG heatmap: python3 with matplotlib is not available (pip install matplotlib)\n");
    return;
  }
  const std::string png = (out / "needle_heatmap.png").string();
  const std::string cmd = absl::StrCat("python3 '", script, "' '", (out / "eval.json").string(), "' '", png, "'");
  if (std::system(cmd.c_str()) == 0) std::printf("heatmap: %s\n", png.c_str());
  else std::printf("no PNG heatmap: %s failed\n", cmd.c_str());
}

absl::Status Run() {
  const std::string ckpt = absl::GetFlag(FLAGS_checkpoint), out_dir = absl::GetFlag(FLAGS_out);
  if (ckpt.empty() || out_dir.empty()) return absl::InvalidArgumentError("--checkpoint DIR and --out DIR are required");
  const int buckets = absl::GetFlag(FLAGS_buckets);
  const int64_t sequences = absl::GetFlag(FLAGS_sequences), samples = absl::GetFlag(FLAGS_needle_samples);
  const int64_t micro = absl::GetFlag(FLAGS_micro_batch);
  if (buckets < 1) return absl::InvalidArgumentError("--buckets must be >= 1");
  if (micro < 1 || samples < 1 || sequences < 0)
    return absl::InvalidArgumentError("--micro_batch and --needle_samples must be >= 1, --sequences >= 0");
  LOOM_ASSIGN_OR_RETURN(const std::vector<int64_t> lengths,
                        ParseList<int64_t>("needle_lengths", absl::GetFlag(FLAGS_needle_lengths)));
  LOOM_ASSIGN_OR_RETURN(const std::vector<double> depths,
                        ParseList<double>("needle_depths", absl::GetFlag(FLAGS_needle_depths)));
  for (double d : depths)
    if (d < 0 || d > 1) return absl::InvalidArgumentError(absl::StrCat("--needle_depths: ", d, " is outside [0, 1]"));
  if (!lengths.empty() && depths.empty()) return absl::InvalidArgumentError("--needle_depths: none given");
  LOOM_ASSIGN_OR_RETURN(const Device device, ResolveDevice(absl::GetFlag(FLAGS_device)));

  absl::StatusOr<LoadedModel> loaded = LoadModel(ckpt, device);
  if (!loaded.ok()) return absl::DataLossError(loaded.status().message());  // exit 1
  LoadedModel& m = *loaded;
  const config::NeedleConfig& nc = m.config.data().needle();
  const int64_t min_length = 6 * int64_t{nc.needles()} + 5;
  for (int64_t l : lengths)
    if (l < min_length)
      return absl::InvalidArgumentError(absl::StrCat("--needle_lengths: ", l, " cannot hold ", nc.needles(),
                                                     " needles and the question (needs ", min_length, ")"));
  if (!lengths.empty() && Needle::VocabNeeded(nc) > m.config.model().vocab())
    return absl::InvalidArgumentError(absl::StrCat("the needle task needs ", Needle::VocabNeeded(nc),
                                                   " tokens, the model has ", m.config.model().vocab()));
  std::printf("loom-eval: %s (step %lld, model %s hidden %d, trained at seq_len %d) on %s\n", m.step_dir.c_str(),
              static_cast<long long>(m.step), m.config.model().pattern().c_str(), m.config.model().hidden(),
              m.config.train().seq_len(), device.ToString().c_str());
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("--out ", out_dir, ": cannot create: ", ec.message()));

  std::string md = absl::StrFormat("# loom-eval of %s (step %d)\n\n", m.step_dir, m.step);
  std::vector<BucketResult> ppl;
  const int64_t seq_len = absl::GetFlag(FLAGS_seq_len) > 0 ? absl::GetFlag(FLAGS_seq_len) : m.config.train().seq_len();
  std::string data_what;
  if (sequences > 0) {
    absl::StatusOr<BatchSource> data = HeldOutData(m.config, absl::GetFlag(FLAGS_data), seq_len, &data_what);
    if (!data.ok()) return absl::DataLossError(data.status().message());
    Timer t;
    ppl = PerplexityByPosition(*m.model, *data, seq_len, sequences, buckets, micro);
    const std::string table = PerplexityMarkdown(ppl);
    const std::string title = absl::StrFormat("Perplexity by position: %d sequences of %d tokens from %s", sequences,
                                              seq_len, data_what);
    std::printf("\n%s (%.1f s)\n%s", title.c_str(), t.Seconds(), table.c_str());
    absl::StrAppend(&md, "## ", title, "\n\n", table, "\n");
  }
  std::unique_ptr<NeedleGrid> grid;
  if (!lengths.empty()) {
    Timer t;
    grid = std::make_unique<NeedleGrid>(NeedleAccuracy(*m.model, m.config, lengths, depths, samples, micro));
    const std::string table = NeedleMarkdown(*grid);
    const std::string title = absl::StrFormat("Needle in a haystack: answer accuracy, %d samples a cell, %d needle%s, "
                                              "chance %.1f%%",
                                              samples, nc.needles(), nc.needles() > 1 ? "s" : "", 100 * grid->chance);
    std::printf("\n%s (%.1f s)\n%s", title.c_str(), t.Seconds(), table.c_str());
    absl::StrAppend(&md, "## ", title, "\n\n", table);
  }
  const std::filesystem::path out(out_dir);
  LOOM_RETURN_IF_ERROR(WriteText(out / "eval.md", md));
  LOOM_RETURN_IF_ERROR(WriteText(out / "eval.json", Json(m, data_what, seq_len, sequences, ppl, grid.get(), samples)));
  std::printf("\nwrote %s and %s\n", (out / "eval.md").c_str(), (out / "eval.json").c_str());
  if (grid) Heatmap(out);
  return absl::OkStatus();
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::ParseToolFlags(argc, argv,
                       "loom-eval --checkpoint DIR [--data PATHS] [--buckets 8] [--needle_lengths 256,512,1024] "
                       "[--needle_depths 0,0.25,0.5,0.75,1] --out DIR");
  if (absl::Status s = loom::Run(); !s.ok()) {
    std::fprintf(stderr, "loom-eval: %s\n", std::string(s.message()).c_str());
    return absl::IsInvalidArgument(s) ? 2 : 1;
  }
  return 0;
}
