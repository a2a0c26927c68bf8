// Hugging Face import/export (checkpoint/hf.h) against transformers'
// fixtures (tests/fixtures/hf, made by bench/hf_fixtures.py): the imported
// model's f32 logits, export -> import identity, and one-line errors.
#include "checkpoint/hf.h"

#include <gtest/gtest.h>
#include <google/protobuf/text_format.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "checkpoint/safetensors.h"
#include "model/model.h"
#include "ops/linear.h"
#include "ops/rmsnorm.h"
#include "runtime/config.h"
#include "tests/testing.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

std::string Fixture(const std::string& name) { return std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/hf/" + name; }

std::map<std::string, Tensor> ByName(const std::vector<checkpoint::NamedTensor>& tensors) {
  std::map<std::string, Tensor> out;
  for (const auto& t : tensors) out[t.name] = t.tensor;
  return out;
}

// Loom's f32 forward of an imported model on `ids`: the model's own blocks
// (Model::ChunkForward), then its final norm and output matrix.
Tensor LoomLogits(const checkpoint::HfModel& hf, const std::vector<int32_t>& ids) {
  const ModelDims dims = ModelDims::FromConfig(hf.config);
  Model model(dims);
  const std::map<std::string, Tensor> weights = ByName(hf.tensors);
  for (Param* p : model.params()) {
    auto it = weights.find(p->name);
    LOOM_CHECK(it != weights.end(), "imported model lacks ", p->name);
    p->value.CopyFrom(it->second);
  }
  const int64_t t = static_cast<int64_t>(ids.size());
  Batch batch = Batch::Allocate(1, t, /*with_docs=*/false);
  for (int64_t i = 0; i < t; ++i) {
    batch.tokens.data<int32_t>()[i] = ids[i];
    batch.positions.data<int32_t>()[i] = static_cast<int32_t>(i);
    batch.targets.data<int32_t>()[i] = -100;
  }
  const Tensor out = model.ChunkForward(0, batch, Tensor());
  Tensor h = Tensor::Empty({t, dims.hidden}, DType::kF32), rstd = Tensor::Empty({t}, DType::kF32);
  const Tensor& final_norm = weights.at("final_norm");
  ops::RmsNormForward(out, final_norm, dims.norm_eps, h, rstd);
  Tensor logits = Tensor::Empty({t, dims.padded_vocab}, DType::kF32);
  ops::LinearForward(h, weights.at(dims.tie_embeddings ? "embed" : "lm_head"), logits);
  return logits;
}

void ExpectLogitsMatch(const std::string& folder, double tol) {
  absl::StatusOr<checkpoint::HfModel> hf = checkpoint::ReadHfModel(Fixture(folder));
  ASSERT_TRUE(hf.ok()) << hf.status();
  absl::StatusOr<checkpoint::SafetensorsFile> ref = checkpoint::ReadSafetensors(Fixture(folder + ".logits.safetensors"));
  ASSERT_TRUE(ref.ok()) << ref.status();
  const auto& ids_entry = ref->tensors.at("input_ids");
  const auto& logits_entry = ref->tensors.at("logits");
  absl::StatusOr<Tensor> ids_tensor = checkpoint::ReadTensor(*ref, ids_entry);
  absl::StatusOr<Tensor> logits_tensor = checkpoint::ReadTensor(*ref, logits_entry);
  ASSERT_TRUE(ids_tensor.ok() && logits_tensor.ok()) << ids_tensor.status() << logits_tensor.status();
  std::vector<int32_t> ids(ids_entry.shape[0]);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(ids_tensor->data<int64_t>()[i]);
  const float* want = logits_tensor->data<float>();
  const int64_t vocab = logits_entry.shape[1];
  const Tensor got = LoomLogits(*hf, ids);
  ASSERT_EQ(got.dim(0), static_cast<int64_t>(ids.size()));
  double worst = 0;
  int64_t worst_at = 0;
  for (int64_t t = 0; t < got.dim(0); ++t) {
    for (int64_t v = 0; v < vocab; ++v) {
      const double d = std::abs(got.data<float>()[t * got.dim(1) + v] - want[t * vocab + v]);
      if (d > worst) worst = d, worst_at = t * vocab + v;
    }
  }
  EXPECT_LE(worst, tol) << folder << ": largest |Loom − transformers| logit difference " << worst << " at token "
                        << worst_at / vocab << ", vocab " << worst_at % vocab << " (transformers "
                        << want[worst_at] << "), tolerance " << tol;
}

TEST(HfImport, LogitsMatchTransformers_ShardedF32Untied) { ExpectLogitsMatch("llama_f32", 1e-4); }

TEST(HfImport, LogitsMatchTransformers_TiedYarnBf16) { ExpectLogitsMatch("llama_yarn_bf16", 1e-4); }

TEST(HfImport, ConfigMapsShapesGqaTyingAndRope) {
  absl::StatusOr<checkpoint::HfModel> f32 = checkpoint::ReadHfModel(Fixture("llama_f32"));
  ASSERT_TRUE(f32.ok()) << f32.status();
  const config::ModelConfig& m = f32->config.model();
  EXPECT_EQ(m.pattern(), "S");
  EXPECT_EQ(m.layers(), 2);
  EXPECT_EQ(m.kv_heads(), 2);
  EXPECT_EQ(m.ffn_hidden(), 96);
  EXPECT_FALSE(m.tie_embeddings());
  EXPECT_EQ(m.rope_scaling().type(), "default");
  const auto w = ByName(f32->tensors);
  EXPECT_EQ(w.at("embed").shape(), (Shape{128, 64})) << "vocab 100 padded to 128";
  EXPECT_EQ(w.at("layers.1.attn.wk").shape(), (Shape{32, 64}));
  for (int64_t i = 100 * 64; i < 128 * 64; ++i) ASSERT_EQ(w.at("lm_head").Get(i), 0.0) << "padding row not zero";

  absl::StatusOr<checkpoint::HfModel> yarn = checkpoint::ReadHfModel(Fixture("llama_yarn_bf16"));
  ASSERT_TRUE(yarn.ok()) << yarn.status();
  EXPECT_TRUE(yarn->config.model().tie_embeddings());
  EXPECT_EQ(ByName(yarn->tensors).count("lm_head"), 0u);
  EXPECT_EQ(yarn->config.model().rope_scaling().type(), "yarn");
  EXPECT_EQ(yarn->config.model().rope_scaling().factor(), 4.0);
  EXPECT_EQ(yarn->config.model().rope_scaling().original_max_position_embeddings(), 64);
}

// import -> checkpoint -> export -> import: the same tensors, bit for bit,
// through one shard (tied) and through several with an index (untied).
TEST(HfExport, ExportThenImportGivesIdenticalTensors) {
  for (const auto& [folder, shard_bytes] : {std::pair<std::string, int64_t>{"llama_f32", 64 << 10},
                                            std::pair<std::string, int64_t>{"llama_yarn_bf16", int64_t{1} << 30}}) {
    SCOPED_TRACE(folder);
    const std::string ckpt = testing::TempPath("rt_ckpt_" + folder), out = testing::TempPath("rt_hf_" + folder);
    ASSERT_TRUE(checkpoint::ImportHf(Fixture(folder), ckpt).ok());
    const absl::Status exported = checkpoint::ExportHf(ckpt, out, shard_bytes);
    ASSERT_TRUE(exported.ok()) << exported;
    EXPECT_EQ(fs::exists(out + "/model.safetensors.index.json"), folder == "llama_f32");
    absl::StatusOr<checkpoint::HfModel> a = checkpoint::ReadHfModel(Fixture(folder));
    absl::StatusOr<checkpoint::HfModel> b = checkpoint::ReadHfModel(out);
    ASSERT_TRUE(a.ok() && b.ok()) << b.status();
    std::string text_a, text_b;
    google::protobuf::TextFormat::PrintToString(a->config.model(), &text_a);
    google::protobuf::TextFormat::PrintToString(b->config.model(), &text_b);
    EXPECT_EQ(text_a, text_b) << "the model config changed through export";
    ASSERT_EQ(a->tensors.size(), b->tensors.size());
    for (size_t i = 0; i < a->tensors.size(); ++i) {
      const Tensor& x = a->tensors[i].tensor;
      const Tensor& y = b->tensors[i].tensor;
      EXPECT_EQ(a->tensors[i].name, b->tensors[i].name);
      ASSERT_EQ(x.shape(), y.shape()) << a->tensors[i].name;
      EXPECT_EQ(std::memcmp(x.raw(), y.raw(), x.nbytes()), 0) << a->tensors[i].name << " differs after export";
    }
  }
}

// The checkpoint import writes is one loom-train resumes from: the model
// tensors, zero moments and optim.steps 0, verified by LoadCheckpoint.
TEST(HfImport, WritesAResumableCheckpoint) {
  const std::string ckpt = testing::TempPath("resumable");
  ASSERT_TRUE(checkpoint::ImportHf(Fixture("llama_f32"), ckpt).ok());
  absl::StatusOr<std::string> step = checkpoint::ResolveStepDir(ckpt);
  ASSERT_TRUE(step.ok()) << step.status();
  absl::StatusOr<checkpoint::CheckpointState> state = checkpoint::LoadCheckpoint(*step);
  ASSERT_TRUE(state.ok()) << state.status();
  const auto w = ByName(state->tensors);
  EXPECT_EQ(state->step, 0);
  ASSERT_EQ(w.count("optim.steps"), 1u);
  EXPECT_EQ(w.at("optim.steps").Get(0), 0.0);
  ASSERT_EQ(w.count("optim.m.layers.0.attn.wq"), 1u);
  ASSERT_EQ(w.count("optim.v.lm_head"), 1u);
  config::Config saved;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(state->config_text, &saved));
  EXPECT_EQ(saved.model().hidden(), 64);
  EXPECT_EQ(saved.data().task(), "files");
  EXPECT_EQ(saved.data().eod_token(), 2) << "eos_token_id of config.json";
}

// ---------------------------------------------------------------- errors

// A scratch copy of a fixture folder.
std::string CopyFixture(const std::string& folder, const std::string& as) {
  const std::string dir = testing::TempPath(as);
  fs::remove_all(dir);
  fs::copy(Fixture(folder), dir, fs::copy_options::recursive);
  return dir;
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void ExpectOneLineError(const std::string& dir, const std::string& want) {
  absl::StatusOr<checkpoint::HfModel> m = checkpoint::ReadHfModel(dir);
  ASSERT_FALSE(m.ok()) << dir << " was accepted";
  const std::string msg(m.status().message());
  EXPECT_NE(msg.find(want), std::string::npos) << "got: " << msg << "\nwanted it to contain: " << want;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
}

TEST(HfImport, BadInputsGiveOneClearLine) {
  {
    const std::string dir = CopyFixture("llama_f32", "missing_shard");
    fs::remove(dir + "/model-00002-of-00002.safetensors");
    ExpectOneLineError(dir, "shard model-00002-of-00002.safetensors missing");
  }
  {  // The index names only the first shard: the second's tensors are missing.
    const std::string dir = CopyFixture("llama_f32", "missing_tensor");
    std::string index = ReadText(dir + "/model.safetensors.index.json");
    size_t at;
    while ((at = index.find("model-00002-of-00002")) != std::string::npos) index.replace(at, 20, "model-00001-of-00002");
    WriteText(dir + "/model.safetensors.index.json", index);
    ExpectOneLineError(dir, "missing from shard model-00001-of-00002.safetensors");
  }
  {
    const std::string dir = CopyFixture("llama_yarn_bf16", "mistral");
    std::string config = ReadText(dir + "/config.json");
    config.replace(config.find("\"llama\""), 7, "\"mistral\"");
    WriteText(dir + "/config.json", config);
    ExpectOneLineError(dir, "model_type 'mistral' is not supported");
  }
  {
    const std::string dir = CopyFixture("llama_yarn_bf16", "bias");
    std::string config = ReadText(dir + "/config.json");
    config.replace(config.find("\"attention_bias\": false"), 23, "\"attention_bias\": true");
    WriteText(dir + "/config.json", config);
    ExpectOneLineError(dir, "attention_bias = true is not supported");
  }
  {
    const std::string dir = CopyFixture("llama_yarn_bf16", "longrope");
    std::string config = ReadText(dir + "/config.json");
    config.replace(config.find("\"type\": \"yarn\""), 14, "\"type\": \"longrope\"");
    WriteText(dir + "/config.json", config);
    ExpectOneLineError(dir, "rope type 'longrope' is not supported");
  }
  {
    const std::string dir = testing::TempPath("no_weights");
    fs::create_directories(dir);
    fs::copy_file(Fixture("llama_f32/config.json"), dir + "/config.json", fs::copy_options::overwrite_existing);
    ExpectOneLineError(dir, "no model.safetensors or model.safetensors.index.json");
  }
  ExpectOneLineError(testing::TempPath("nowhere"), "not a directory");
}

TEST(HfExport, LightningModelIsRefusedByName) {
  const std::string ckpt = testing::TempPath("hybrid_ckpt");
  absl::StatusOr<config::Config> config = LoadConfig("", {"model.pattern=SL", "model.layers=2", "model.hidden=32"});
  ASSERT_TRUE(config.ok()) << config.status();
  checkpoint::CheckpointState state;
  state.config_text = ConfigToText(*config);
  ASSERT_TRUE(checkpoint::SaveCheckpoint(ckpt, state, 0).ok());
  const absl::Status s = checkpoint::ExportHf(ckpt, testing::TempPath("hybrid_hf"));
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("lightning layers"), std::string::npos) << s;
}

}  // namespace
}  // namespace loom
