// Hugging Face Llama folders <-> Loom checkpoints (see checkpoint/hf.h).
#include "checkpoint/hf.h"

#include <google/protobuf/text_format.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/safetensors.h"
#include "model/dims.h"
#include "nlohmann/json.hpp"
#include "runtime/config.h"

namespace loom::checkpoint {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

absl::Status Error(const std::string& where, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("[hf] ", where, ": ", what));
}

absl::StatusOr<json> ParseJson(std::string_view text, const std::string& where) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Error(where, "not a JSON object");
  return j;
}

absl::StatusOr<std::string> ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) return absl::NotFoundError(absl::StrCat("[hf] ", path.string(), ": cannot open"));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Field `key` of object j: absent or null -> fallback; wrong type -> error.
absl::StatusOr<double> Number(const json& j, const std::string& key, std::optional<double> fallback,
                              const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return Error(where, absl::StrCat(key, " missing"));
  }
  if (!it->is_number()) return Error(where, absl::StrCat(key, " is not a number"));
  return it->get<double>();
}

absl::StatusOr<int64_t> Integer(const json& j, const std::string& key, std::optional<int64_t> fallback,
                                const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return Error(where, absl::StrCat(key, " missing"));
  }
  if (!it->is_number_integer()) return Error(where, absl::StrCat(key, " is not an integer"));
  return it->get<int64_t>();
}

bool Flag(const json& j, const std::string& key) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() && it->get<bool>();
}

// The shortest decimal that reads back as the float f (1e-05, not
// 9.99999974737875e-06), so an exported config.json says what the user set.
double ShortestDouble(float f) {
  for (int digits = 1; digits < 10; ++digits) {
    const double d = std::strtod(absl::StrFormat("%.*g", digits, f).c_str(), nullptr);
    if (static_cast<float>(d) == f) return d;
  }
  return f;
}

}  // namespace

// ---------------------------------------------------------------- config.json

namespace {

// `where` names config.json in errors.
absl::Status RopeFromHfAt(std::string_view config_json, config::ModelConfig* model, const std::string& where) {
  LOOM_ASSIGN_OR_RETURN(const json j, ParseJson(config_json, where));
  // transformers' standardize_rope_params: rope_parameters (5.x) or
  // rope_theta + rope_scaling (4.x); a rope_theta inside the dict wins.
  json params = json::object();
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    params = *it;
  } else if (auto it = j.find("rope_scaling"); it != j.end() && it->is_object()) {
    params = *it;
  }
  if (!params.empty() && !params.contains("rope_type") && !params.contains("type") && !params.contains("rope_theta"))
    return Error(where, "per-layer-type rope_parameters are not supported (one RoPE for all layers)");
  LOOM_ASSIGN_OR_RETURN(const double top_theta, Number(j, "rope_theta", 10000.0, where));
  LOOM_ASSIGN_OR_RETURN(const double theta, Number(params, "rope_theta", top_theta, where));
  LOOM_ASSIGN_OR_RETURN(const double partial, Number(params, "partial_rotary_factor", 1.0, where));
  LOOM_ASSIGN_OR_RETURN(const double partial_top, Number(j, "partial_rotary_factor", 1.0, where));
  if (partial != 1.0 || partial_top != 1.0)
    return Error(where, "partial_rotary_factor != 1 is not supported (Loom rotates the whole head)");
  std::string type = "default";
  if (auto it = params.find("rope_type"); it != params.end() && it->is_string()) {
    type = it->get<std::string>();
  } else if (auto it2 = params.find("type"); it2 != params.end() && it2->is_string()) {
    type = it2->get<std::string>();
  }
  model->set_rope_theta(static_cast<float>(theta));
  // Fields a type does not use keep their values (the defaults, in a
  // config from LoadConfig), so that the saved config compares equal to a
  // user's config of the same model (loom-train's resume check).
  if (type == "default") {
    model->mutable_rope_scaling()->set_type("default");
    return absl::OkStatus();
  }
  if (type != "linear" && type != "dynamic" && type != "yarn" && type != "llama3")
    return Error(where, absl::StrCat("rope type '", type,
                                     "' is not supported (Loom has default, linear, dynamic, yarn, llama3)"));
  config::RopeScaling& r = *model->mutable_rope_scaling();
  r.set_type(type);
  LOOM_ASSIGN_OR_RETURN(const int64_t max_positions, Integer(j, "max_position_embeddings", 2048, where));
  // transformers moves a top-level original_max_position_embeddings (Phi-3)
  // into the dict, else defaults it to max_position_embeddings.
  LOOM_ASSIGN_OR_RETURN(int64_t original, Integer(params, "original_max_position_embeddings", max_positions, where));
  LOOM_ASSIGN_OR_RETURN(original, Integer(j, "original_max_position_embeddings", original, where));
  std::optional<double> default_factor;
  if (type == "yarn") default_factor = static_cast<double>(max_positions) / original;  // DeepSeek-V3 style
  LOOM_ASSIGN_OR_RETURN(const double factor, Number(params, "factor", default_factor, where));
  r.set_factor(factor);
  if (type == "dynamic") {
    // transformers' dynamic NTK uses max_position_embeddings as the original
    // length; Loom freezes it at dynamic_seq_len (0: unscaled until set).
    r.set_original_max_position_embeddings(static_cast<int32_t>(max_positions));
  } else if (type == "yarn" || type == "llama3") {
    r.set_original_max_position_embeddings(static_cast<int32_t>(original));
  }
  if (type == "yarn") {
    LOOM_ASSIGN_OR_RETURN(const double attention_factor, Number(params, "attention_factor", 0.0, where));
    LOOM_ASSIGN_OR_RETURN(const double beta_fast, Number(params, "beta_fast", 32.0, where));
    LOOM_ASSIGN_OR_RETURN(const double beta_slow, Number(params, "beta_slow", 1.0, where));
    LOOM_ASSIGN_OR_RETURN(const double mscale, Number(params, "mscale", 0.0, where));
    LOOM_ASSIGN_OR_RETURN(const double mscale_all_dim, Number(params, "mscale_all_dim", 0.0, where));
    r.set_attention_factor(attention_factor);
    r.set_beta_fast(beta_fast != 0 ? beta_fast : 32.0);  // transformers: `get("beta_fast") or 32`
    r.set_beta_slow(beta_slow != 0 ? beta_slow : 1.0);
    r.set_mscale(mscale);
    r.set_mscale_all_dim(mscale_all_dim);
    auto truncate = params.find("truncate");
    r.set_truncate(truncate == params.end() || !truncate->is_boolean() || truncate->get<bool>());
  }
  if (type == "llama3") {
    LOOM_ASSIGN_OR_RETURN(const double low, Number(params, "low_freq_factor", std::nullopt, where));
    LOOM_ASSIGN_OR_RETURN(const double high, Number(params, "high_freq_factor", std::nullopt, where));
    r.set_low_freq_factor(low);
    r.set_high_freq_factor(high);
  }
  return absl::OkStatus();
}

absl::StatusOr<config::Config> ConfigFromHfAt(std::string_view config_json, const std::string& where) {
  LOOM_ASSIGN_OR_RETURN(const json j, ParseJson(config_json, where));
  const std::string model_type = j.value("model_type", std::string());
  if (model_type != "llama")
    return Error(where, absl::StrCat("model_type '", model_type, "' is not supported (only llama)"));
  if (auto it = j.find("architectures"); it != j.end() && it->is_array()) {
    for (const json& a : *it)
      if (!a.is_string() || a.get<std::string>() != "LlamaForCausalLM")
        return Error(where, absl::StrCat("architecture ", a.dump(), " is not supported (only LlamaForCausalLM)"));
  }
  if (j.value("hidden_act", std::string("silu")) != "silu")
    return Error(where, absl::StrCat("hidden_act '", j.value("hidden_act", std::string()),
                                     "' is not supported (Loom's MLP is SwiGLU: silu)"));
  for (const char* bias : {"attention_bias", "mlp_bias"})
    if (Flag(j, bias)) return Error(where, absl::StrCat(bias, " = true is not supported (Loom has no biases)"));

  config::Config config;
  LOOM_ASSIGN_OR_RETURN(config, LoadConfig("", {}));  // defaults for everything but the model
  // Every field set to its default (as LoadConfig leaves a config), then
  // the model's own.
  config::ModelConfig& m = *config.mutable_model();
  LOOM_ASSIGN_OR_RETURN(const int64_t vocab, Integer(j, "vocab_size", std::nullopt, where));
  LOOM_ASSIGN_OR_RETURN(const int64_t hidden, Integer(j, "hidden_size", std::nullopt, where));
  LOOM_ASSIGN_OR_RETURN(const int64_t ffn, Integer(j, "intermediate_size", std::nullopt, where));
  LOOM_ASSIGN_OR_RETURN(const int64_t layers, Integer(j, "num_hidden_layers", std::nullopt, where));
  LOOM_ASSIGN_OR_RETURN(const int64_t heads, Integer(j, "num_attention_heads", std::nullopt, where));
  LOOM_ASSIGN_OR_RETURN(const int64_t kv_heads, Integer(j, "num_key_value_heads", heads, where));
  LOOM_ASSIGN_OR_RETURN(const double eps, Number(j, "rms_norm_eps", 1e-6, where));
  if (heads <= 0 || hidden % heads != 0)
    return Error(where, absl::StrCat("num_attention_heads ", heads, " does not divide hidden_size ", hidden));
  LOOM_ASSIGN_OR_RETURN(const int64_t head_dim, Integer(j, "head_dim", hidden / heads, where));
  if (head_dim != hidden / heads)
    return Error(where, absl::StrCat("head_dim ", head_dim, " != hidden_size / num_attention_heads = ",
                                     hidden / heads, " is not supported"));
  m.set_pattern("S");
  m.set_layers(static_cast<int32_t>(layers));
  m.set_hidden(static_cast<int32_t>(hidden));
  m.set_heads(static_cast<int32_t>(heads));
  m.set_kv_heads(static_cast<int32_t>(kv_heads));
  m.set_vocab(static_cast<int32_t>(vocab));
  m.set_ffn_hidden(static_cast<int32_t>(ffn));
  m.set_tie_embeddings(Flag(j, "tie_word_embeddings"));
  m.set_norm_eps(static_cast<float>(eps));
  m.set_attention("softmax");
  LOOM_RETURN_IF_ERROR(RopeFromHfAt(config_json, &m, where));
  // A pretrained model is fine-tuned on text: task "files", ending documents
  // with its eos token; the run's config names the data.
  int32_t eod = 0;  // eos_token_id may also be a list (Llama 3) or null
  if (auto it = j.find("eos_token_id"); it != j.end() && it->is_number_integer() && it->get<int64_t>() >= 0 &&
                                        it->get<int64_t>() < vocab)
    eod = static_cast<int32_t>(it->get<int64_t>());
  config.mutable_data()->set_task("files");
  config.mutable_data()->set_eod_token(eod);
  // Validate the model section: the data paths are the fine-tuning run's.
  config::Config check = config;
  check.mutable_data()->add_paths()->set_prefix("(the fine-tuning run's data)");
  if (absl::Status s = ValidateConfig(check); !s.ok())
    return Error(where, absl::StrCat("gives an invalid Loom model: ", s.message()));
  return config;
}

}  // namespace

absl::Status RopeFromHfConfig(std::string_view config_json, config::ModelConfig* model) {
  return RopeFromHfAt(config_json, model, "config.json");
}

absl::StatusOr<config::Config> ConfigFromHf(std::string_view config_json) {
  return ConfigFromHfAt(config_json, "config.json");
}

// ---------------------------------------------------------------- tensors

namespace {

struct Mapping {
  std::string hf, loom;
  Shape shape;       // Loom's shape (vocab rows padded)
  bool vocab_rows;   // rows beyond the true vocabulary are padding
};

// Every tensor of the dense all-softmax Llama, in Model::params() order.
std::vector<Mapping> Mappings(const ModelDims& d) {
  const int64_t c = d.hidden, qd = int64_t{d.heads} * d.head_dim, kvd = int64_t{d.kv_heads} * d.head_dim;
  std::vector<Mapping> out;
  out.push_back({"model.embed_tokens.weight", "embed", {d.padded_vocab, c}, true});
  for (int l = 0; l < d.layers; ++l) {
    const std::string hf = absl::StrCat("model.layers.", l, "."), loom = absl::StrCat("layers.", l, ".");
    out.push_back({hf + "input_layernorm.weight", loom + "norm1", {c}, false});
    out.push_back({hf + "self_attn.q_proj.weight", loom + "attn.wq", {qd, c}, false});
    out.push_back({hf + "self_attn.k_proj.weight", loom + "attn.wk", {kvd, c}, false});
    out.push_back({hf + "self_attn.v_proj.weight", loom + "attn.wv", {kvd, c}, false});
    out.push_back({hf + "self_attn.o_proj.weight", loom + "attn.wo", {c, qd}, false});
    out.push_back({hf + "post_attention_layernorm.weight", loom + "norm2", {c}, false});
    out.push_back({hf + "mlp.gate_proj.weight", loom + "mlp.w_gate", {d.ffn, c}, false});
    out.push_back({hf + "mlp.up_proj.weight", loom + "mlp.w_up", {d.ffn, c}, false});
    out.push_back({hf + "mlp.down_proj.weight", loom + "mlp.w_down", {c, d.ffn}, false});
  }
  out.push_back({"model.norm.weight", "final_norm", {c}, false});
  if (!d.tie_embeddings) out.push_back({"lm_head.weight", "lm_head", {d.padded_vocab, c}, true});
  return out;
}

// HF shape of a mapping: vocab rows unpadded.
Shape HfShape(const Mapping& m, const ModelDims& d) {
  Shape s = m.shape;
  if (m.vocab_rows) s[0] = d.vocab;
  return s;
}

}  // namespace

absl::StatusOr<HfModel> ReadHfModel(const std::string& dir_str) {
  const fs::path dir(dir_str);
  if (!fs::is_directory(dir)) return Error(dir_str, "not a directory");
  absl::StatusOr<std::string> config_text = ReadFile(dir / "config.json");
  if (!config_text.ok()) return Error(dir_str, "config.json missing");
  HfModel model;
  LOOM_ASSIGN_OR_RETURN(model.config, ConfigFromHfAt(*config_text, (dir / "config.json").string()));
  const ModelDims dims = ModelDims::FromConfig(model.config);

  // Shards: the index's weight_map, or the single model.safetensors.
  std::map<std::string, std::string> file_of;  // tensor -> shard file name
  std::vector<std::string> files;
  const fs::path index_path = dir / "model.safetensors.index.json";
  if (fs::exists(index_path)) {
    LOOM_ASSIGN_OR_RETURN(const std::string index_text, ReadFile(index_path));
    LOOM_ASSIGN_OR_RETURN(const json index, ParseJson(index_text, dir_str + "/model.safetensors.index.json"));
    auto map = index.find("weight_map");
    if (map == index.end() || !map->is_object())
      return Error(dir_str + "/model.safetensors.index.json", "weight_map missing");
    std::set<std::string> seen;
    for (const auto& [name, file] : map->items()) {
      if (!file.is_string()) return Error(dir_str + "/model.safetensors.index.json", name + ": file is not a string");
      file_of[name] = file.get<std::string>();
      if (seen.insert(file.get<std::string>()).second) files.push_back(file.get<std::string>());
    }
  } else if (fs::exists(dir / "model.safetensors")) {
    files.push_back("model.safetensors");
  } else {
    return Error(dir_str, "no model.safetensors or model.safetensors.index.json");
  }
  std::vector<std::unique_ptr<SafetensorsFile>> shards;
  std::map<std::string, const SafetensorsFile*> shard_of;  // tensor -> its shard, as found
  for (const std::string& file : files) {
    if (!fs::exists(dir / file))
      return Error(dir_str, absl::StrCat("shard ", file, " missing (named by model.safetensors.index.json)"));
    absl::StatusOr<SafetensorsFile> f = ReadSafetensors((dir / file).string());
    if (!f.ok()) return Error(dir_str, std::string(f.status().message()));
    shards.push_back(std::make_unique<SafetensorsFile>(*std::move(f)));
    for (const auto& [name, entry] : shards.back()->tensors) shard_of[name] = shards.back().get();
  }

  std::set<std::string> used;
  for (const Mapping& m : Mappings(dims)) {
    auto it = shard_of.find(m.hf);
    if (it == shard_of.end()) {
      auto named = file_of.find(m.hf);
      return Error(dir_str, absl::StrCat("tensor ", m.hf, " missing",
                                         named == file_of.end() ? std::string()
                                                                : absl::StrCat(" from shard ", named->second)));
    }
    used.insert(m.hf);
    const SafetensorsEntry& e = it->second->tensors.at(m.hf);
    const Shape want = HfShape(m, dims);
    if (e.shape != want)
      return Error(dir_str, absl::StrCat("tensor ", m.hf, " is ", ShapeString(e.shape), ", config.json implies ",
                                         ShapeString(want)));
    if (e.dtype != DType::kF32 && e.dtype != DType::kBF16 && e.dtype != DType::kF16 && e.dtype != DType::kF64)
      return Error(dir_str, absl::StrCat("tensor ", m.hf, " has dtype ", DTypeName(e.dtype), " (want a float)"));
    absl::StatusOr<Tensor> raw = ReadTensor(*it->second, e);
    if (!raw.ok()) return Error(dir_str, std::string(raw.status().message()));
    Tensor value = raw->To(DType::kF32);
    if (m.vocab_rows && m.shape[0] != want[0]) {
      Tensor padded = Tensor::Zeros(m.shape, DType::kF32);
      padded.Slice(0, want[0]).CopyFrom(value);
      value = padded;
    }
    model.tensors.push_back({m.loom, value});
  }
  for (const auto& [name, shard] : shard_of) {
    if (used.count(name)) continue;
    if (name.ends_with("rotary_emb.inv_freq")) continue;        // a buffer older checkpoints saved
    if (name == "lm_head.weight" && dims.tie_embeddings) continue;  // tied: a copy of the embedding
    return Error(dir_str, absl::StrCat("tensor ", name, " (", shard->path,
                                       ") has no place in Loom's Llama (an unsupported feature)"));
  }
  return model;
}

absl::Status ImportHf(const std::string& hf_dir, const std::string& ckpt_dir) {
  LOOM_ASSIGN_OR_RETURN(HfModel model, ReadHfModel(hf_dir));
  CheckpointState state;
  state.step = 0;
  state.data_tokens = 0;
  state.config_text = ConfigToText(model.config);
  const size_t n = model.tensors.size();
  for (size_t i = 0; i < n; ++i) {
    const NamedTensor& t = model.tensors[i];
    state.tensors.push_back(t);
  }
  // AdamW moments at zero and no step taken: loom-train resumes from here
  // as from a fresh optimizer.
  for (const char* moment : {"optim.m.", "optim.v."})
    for (size_t i = 0; i < n; ++i)
      state.tensors.push_back({moment + model.tensors[i].name,
                               Tensor::Zeros(model.tensors[i].tensor.shape(), DType::kF32)});
  state.tensors.push_back({"optim.steps", Tensor::FromVector<int64_t>({0}, {1})});
  return SaveCheckpoint(ckpt_dir, state, /*keep=*/0);
}

// ---------------------------------------------------------------- export

namespace {

// config.json of a Loom model config; errors name what HF Llama lacks.
absl::StatusOr<json> HfConfigJson(const config::Config& c, const ModelDims& d, const std::string& where) {
  const config::ModelConfig& m = c.model();
  for (char kind : d.kinds)
    if (kind != 'S')
      return Error(where, absl::StrCat("model.pattern '", m.pattern(),
                                       "' has lightning layers, which a Hugging Face Llama cannot hold"));
  if (d.moe.experts > 0) return Error(where, "MoE layers cannot be exported as a Hugging Face Llama");
  if (d.sigmoid_attention) return Error(where, "sigmoid attention cannot be exported as a Hugging Face Llama");
  json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  j["vocab_size"] = d.vocab;
  j["hidden_size"] = d.hidden;
  j["intermediate_size"] = d.ffn;
  j["num_hidden_layers"] = d.layers;
  j["num_attention_heads"] = d.heads;
  j["num_key_value_heads"] = d.kv_heads;
  j["head_dim"] = d.head_dim;
  j["rms_norm_eps"] = ShortestDouble(m.norm_eps());
  j["tie_word_embeddings"] = d.tie_embeddings;
  j["torch_dtype"] = "float32";
  j["initializer_range"] = ShortestDouble(m.init_std());
  double theta = ShortestDouble(m.rope_theta());
  int64_t max_positions = c.train().seq_len();
  json scaling = nullptr;
  const config::RopeScaling& r = m.rope_scaling();
  const int64_t original = r.original_max_position_embeddings();
  if (r.type() == "linear") {
    scaling = {{"rope_type", "linear"}, {"factor", r.factor()}};
  } else if (r.type() == "dynamic") {
    if (r.dynamic_seq_len() > original) {
      // transformers' dynamic type rescales with each input's length; Loom's
      // is frozen at dynamic_seq_len, which is plain RoPE with the NTK base.
      const double dim = d.head_dim;
      theta = theta * std::pow(r.factor() * r.dynamic_seq_len() / original - (r.factor() - 1), dim / (dim - 2));
      max_positions = r.dynamic_seq_len();
    } else {
      scaling = {{"rope_type", "dynamic"}, {"factor", r.factor()}};
      max_positions = original;  // transformers' dynamic NTK measures from max_position_embeddings
    }
  } else if (r.type() == "yarn") {
    scaling = {{"rope_type", "yarn"},
               {"factor", r.factor()},
               {"original_max_position_embeddings", original},
               {"beta_fast", r.beta_fast()},
               {"beta_slow", r.beta_slow()},
               {"truncate", r.truncate()}};
    if (r.attention_factor() > 0) scaling["attention_factor"] = r.attention_factor();
    if (r.mscale() > 0) scaling["mscale"] = r.mscale();
    if (r.mscale_all_dim() > 0) scaling["mscale_all_dim"] = r.mscale_all_dim();
    max_positions = static_cast<int64_t>(std::llround(original * r.factor()));
  } else if (r.type() == "llama3") {
    scaling = {{"rope_type", "llama3"},
               {"factor", r.factor()},
               {"original_max_position_embeddings", original},
               {"low_freq_factor", r.low_freq_factor()},
               {"high_freq_factor", r.high_freq_factor()}};
    max_positions = static_cast<int64_t>(std::llround(original * r.factor()));
  }
  // The 4.x spelling, which transformers 5 also reads.
  j["rope_theta"] = theta;
  j["rope_scaling"] = scaling;
  j["max_position_embeddings"] = max_positions;
  return j;
}

absl::Status WriteBytes(const fs::path& path, const std::string& head, const std::vector<const Tensor*>& tensors) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out.good()) return Error(path.string(), absl::StrCat("cannot create: ", std::strerror(errno)));
  out.write(head.data(), static_cast<std::streamsize>(head.size()));
  for (const Tensor* t : tensors) out.write(static_cast<const char*>(t->raw()), static_cast<std::streamsize>(t->nbytes()));
  out.close();
  if (!out.good()) return Error(path.string(), absl::StrCat("write failed: ", std::strerror(errno)));
  return absl::OkStatus();
}

}  // namespace

absl::Status ExportHf(const std::string& ckpt_path, const std::string& hf_dir, int64_t max_shard_bytes) {
  LOOM_ASSIGN_OR_RETURN(const std::string step_dir, ResolveStepDir(ckpt_path));
  LOOM_ASSIGN_OR_RETURN(CheckpointState state, LoadCheckpoint(step_dir));
  config::Config config;
  if (!google::protobuf::TextFormat::ParseFromString(state.config_text, &config))
    return Error(step_dir, "the saved config does not parse");
  const ModelDims dims = ModelDims::FromConfig(config);
  LOOM_ASSIGN_OR_RETURN(const json config_json, HfConfigJson(config, dims, step_dir));

  std::map<std::string, Tensor> by_name;
  for (NamedTensor& t : state.tensors) by_name[t.name] = t.tensor;
  struct Out {
    std::string name;
    Tensor tensor;
  };
  std::vector<Out> outs;
  for (const Mapping& m : Mappings(dims)) {
    auto it = by_name.find(m.loom);
    if (it == by_name.end()) return Error(step_dir, absl::StrCat("tensor ", m.loom, " missing"));
    if (it->second.shape() != m.shape)
      return Error(step_dir, absl::StrCat("tensor ", m.loom, " is ", ShapeString(it->second.shape()),
                                          ", the config implies ", ShapeString(m.shape)));
    Tensor t = it->second.dtype() == DType::kF32 ? it->second : it->second.To(DType::kF32);
    if (m.vocab_rows) t = t.Slice(0, dims.vocab).Clone();
    outs.push_back({m.hf, t});
  }

  std::error_code ec;
  fs::create_directories(hf_dir, ec);
  if (ec) return Error(hf_dir, absl::StrCat("cannot create: ", ec.message()));
  // Shards of at most max_shard_bytes (a tensor larger than that alone).
  std::vector<std::vector<const Out*>> groups(1);
  int64_t bytes = 0, total = 0;
  for (const Out& o : outs) {
    const int64_t n = static_cast<int64_t>(o.tensor.nbytes());
    if (!groups.back().empty() && bytes + n > max_shard_bytes) {
      groups.emplace_back();
      bytes = 0;
    }
    groups.back().push_back(&o);
    bytes += n;
    total += n;
  }
  json weight_map = json::object();
  for (size_t g = 0; g < groups.size(); ++g) {
    const std::string file = groups.size() == 1 ? "model.safetensors"
                                                : absl::StrFormat("model-%05d-of-%05d.safetensors", g + 1,
                                                                  groups.size());
    std::map<std::string, SafetensorsEntry> entries;
    std::vector<const Tensor*> order;
    uint64_t offset = 0;
    // The data section in the header's (sorted) name order.
    std::map<std::string, const Tensor*> sorted;
    for (const Out* o : groups[g]) sorted[o->name] = &o->tensor;
    for (const auto& [name, t] : sorted) {
      entries[name] = SafetensorsEntry{DType::kF32, t->shape(), offset, offset + t->nbytes()};
      offset += t->nbytes();
      order.push_back(t);
      weight_map[name] = file;
    }
    LOOM_RETURN_IF_ERROR(
        WriteBytes(fs::path(hf_dir) / file, EncodeSafetensorsHeader(entries, {{"format", "pt"}}), order));
  }
  if (groups.size() > 1) {
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    const std::string text = index.dump(2) + "\n";
    std::ofstream out(fs::path(hf_dir) / "model.safetensors.index.json", std::ios::trunc);
    out << text;
    if (!out.good()) return Error(hf_dir, "model.safetensors.index.json: write failed");
  }
  std::ofstream out(fs::path(hf_dir) / "config.json", std::ios::trunc);
  out << config_json.dump(2) << "\n";
  out.close();
  if (!out.good()) return Error(hf_dir, "config.json: write failed");
  return absl::OkStatus();
}

}  // namespace loom::checkpoint
