#include "runtime/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/reflection.h>
#include <google/protobuf/text_format.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "runtime/text_proto.h"

namespace loom {
namespace {

namespace pb = google::protobuf;

// Sets a scalar field (or element `index` of a repeated one) from text.
absl::Status SetScalar(pb::Message& msg, const pb::FieldDescriptor* field, int index, const std::string& text,
                       const std::string& path) {
  const pb::Reflection* r = msg.GetReflection();
  const bool rep = field->is_repeated();
  auto bad = [&](const std::string& kind) {
    return absl::InvalidArgumentError(absl::StrCat("--set ", path, ": '", text, "' is not ", kind));
  };
  switch (field->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32: {
      int32_t v;
      if (!absl::SimpleAtoi(text, &v)) return bad("an int32");
      rep ? r->SetRepeatedInt32(&msg, field, index, v) : r->SetInt32(&msg, field, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_INT64: {
      int64_t v;
      if (!absl::SimpleAtoi(text, &v)) return bad("an int64");
      rep ? r->SetRepeatedInt64(&msg, field, index, v) : r->SetInt64(&msg, field, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_UINT32: {
      uint32_t v;
      if (!absl::SimpleAtoi(text, &v)) return bad("a uint32");
      rep ? r->SetRepeatedUInt32(&msg, field, index, v) : r->SetUInt32(&msg, field, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_UINT64: {
      uint64_t v;
      if (!absl::SimpleAtoi(text, &v)) return bad("a uint64");
      rep ? r->SetRepeatedUInt64(&msg, field, index, v) : r->SetUInt64(&msg, field, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_FLOAT: {
      float v;
      if (!absl::SimpleAtof(text, &v)) return bad("a number");
      rep ? r->SetRepeatedFloat(&msg, field, index, v) : r->SetFloat(&msg, field, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_DOUBLE: {
      double v;
      if (!absl::SimpleAtod(text, &v)) return bad("a number");
      rep ? r->SetRepeatedDouble(&msg, field, index, v) : r->SetDouble(&msg, field, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_BOOL: {
      bool v;
      if (!absl::SimpleAtob(text, &v)) return bad("a bool (true/false)");
      rep ? r->SetRepeatedBool(&msg, field, index, v) : r->SetBool(&msg, field, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_STRING:
      rep ? r->SetRepeatedString(&msg, field, index, text) : r->SetString(&msg, field, text);
      break;
    case pb::FieldDescriptor::CPPTYPE_ENUM: {
      const pb::EnumValueDescriptor* v = field->enum_type()->FindValueByName(text);
      if (!v) return bad(absl::StrCat("a value of ", field->enum_type()->name()));
      rep ? r->SetRepeatedEnum(&msg, field, index, v) : r->SetEnum(&msg, field, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_MESSAGE:
      return absl::InvalidArgumentError(absl::StrCat("--set ", path, ": is a message, name one of its fields"));
  }
  return absl::OkStatus();
}

// Fills in every optional scalar with its default so the saved config is
// complete (defaults can change between versions; the run should not).
void FillDefaults(pb::Message& msg) {
  const pb::Descriptor* d = msg.GetDescriptor();
  const pb::Reflection* r = msg.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    if (f->is_repeated()) {
      if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE)
        for (int j = 0; j < r->FieldSize(msg, f); ++j) FillDefaults(*r->MutableRepeatedMessage(&msg, f, j));
      continue;
    }
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      FillDefaults(*r->MutableMessage(&msg, f));
    } else if (!r->HasField(msg, f)) {
      std::string text;
      pb::TextFormat::PrintFieldValueToString(msg, f, -1, &text);
      if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING) {
        r->SetString(&msg, f, r->GetString(msg, f));
      } else {
        pb::TextFormat::ParseFieldValueFromString(text, f, &msg);
      }
    }
  }
}

absl::Status Range(bool ok, const std::string& field, const std::string& why) {
  return ok ? absl::OkStatus() : absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

// model.moh (configs/loom.proto MohConfig), checked only when the pattern has
// an H or R layer. Under TP every rank computes all gates from the replicated
// router and keeps its heads' (model/moh.h); under PP each stage adds its
// layers' router losses (model/pipeline.h). Both devices run it (docs/moh.md).
absl::Status ValidateMoh(const config::Config& c) {
  const config::ModelConfig& m = c.model();
  if (m.pattern().find_first_of("HR") == std::string::npos) return absl::OkStatus();
  const config::MohConfig& moh = m.moh();
  const int routed = m.heads() - moh.shared_heads();
  LOOM_RETURN_IF_ERROR(Range(moh.shared_heads() >= 0 && routed >= 0, "model.moh.shared_heads",
                             absl::StrCat(moh.shared_heads(), " is outside [0, model.heads = ", m.heads(), "]")));
  if (routed > 0)
    LOOM_RETURN_IF_ERROR(Range(moh.top_k() >= 1 && moh.top_k() <= routed, "model.moh.top_k",
                               absl::StrCat(moh.top_k(), " is outside [1, routed heads = ", routed, "] (model.heads ",
                                            m.heads(), " − model.moh.shared_heads ", moh.shared_heads(), ")")));
  LOOM_RETURN_IF_ERROR(Range(moh.aux_loss_coef() >= 0 && moh.aux_loss_coef() <= 10, "model.moh.aux_loss_coef",
                             absl::StrCat(moh.aux_loss_coef(), " is outside [0, 10]")));
  return absl::OkStatus();
}

// model.rope_scaling (configs/loom.proto RopeScaling).
absl::Status ValidateRopeScaling(const config::ModelConfig& m) {
  const config::RopeScaling& r = m.rope_scaling();
  const std::string& type = r.type();
  LOOM_RETURN_IF_ERROR(Range(type == "default" || type == "linear" || type == "dynamic" || type == "yarn" ||
                                 type == "llama3",
                             "model.rope_scaling.type",
                             absl::StrCat("'", type, "' is not default, linear, dynamic, yarn or llama3")));
  LOOM_RETURN_IF_ERROR(Range(r.factor() >= 1 && r.factor() <= 1024, "model.rope_scaling.factor",
                             absl::StrCat(r.factor(), " is outside [1, 1024]")));
  LOOM_RETURN_IF_ERROR(Range(r.original_max_position_embeddings() >= 1,
                             "model.rope_scaling.original_max_position_embeddings",
                             absl::StrCat(r.original_max_position_embeddings(), " is below 1")));
  LOOM_RETURN_IF_ERROR(Range(r.dynamic_seq_len() >= 0, "model.rope_scaling.dynamic_seq_len",
                             absl::StrCat(r.dynamic_seq_len(), " is below 0")));
  LOOM_RETURN_IF_ERROR(Range(r.attention_factor() >= 0, "model.rope_scaling.attention_factor",
                             absl::StrCat(r.attention_factor(), " is below 0 (0: derived from factor)")));
  LOOM_RETURN_IF_ERROR(Range(r.beta_slow() > 0 && r.beta_fast() > r.beta_slow(), "model.rope_scaling.beta_fast",
                             absl::StrCat("beta_fast ", r.beta_fast(), " and beta_slow ", r.beta_slow(),
                                          " must satisfy beta_fast > beta_slow > 0")));
  LOOM_RETURN_IF_ERROR(Range(r.mscale() >= 0 && r.mscale_all_dim() >= 0, "model.rope_scaling.mscale",
                             "mscale and mscale_all_dim must be >= 0"));
  LOOM_RETURN_IF_ERROR(Range(r.low_freq_factor() > 0 && r.high_freq_factor() > r.low_freq_factor(),
                             "model.rope_scaling.high_freq_factor",
                             absl::StrCat("high_freq_factor ", r.high_freq_factor(), " and low_freq_factor ",
                                          r.low_freq_factor(), " must satisfy high > low > 0")));
  const int head_dim = m.hidden() / m.heads();
  LOOM_RETURN_IF_ERROR(Range(type != "dynamic" || head_dim > 2, "model.rope_scaling.type",
                             "dynamic needs head dim > 2 (its exponent is D/(D−2))"));
  return absl::OkStatus();
}

// data.needle (configs/loom.proto NeedleConfig; data/needle.h).
absl::Status ValidateNeedle(const config::Config& c) {
  const config::NeedleConfig& n = c.data().needle();
  LOOM_RETURN_IF_ERROR(Range(n.needles() >= 1 && n.needles() <= 64, "data.needle.needles",
                             absl::StrCat(n.needles(), " is outside [1, 64]")));
  LOOM_RETURN_IF_ERROR(Range(n.key_vocab() >= n.needles(), "data.needle.key_vocab",
                             absl::StrCat(n.key_vocab(), " is below data.needle.needles = ", n.needles(),
                                          " (the needles' keys are distinct)")));
  LOOM_RETURN_IF_ERROR(Range(n.value_vocab() >= 2, "data.needle.value_vocab", "must be >= 2"));
  LOOM_RETURN_IF_ERROR(Range(n.filler_vocab() >= 1, "data.needle.filler_vocab", "must be >= 1"));
  LOOM_RETURN_IF_ERROR(Range(n.depth() == -1 || (n.depth() >= 0 && n.depth() <= 1), "data.needle.depth",
                             absl::StrCat(n.depth(), " is neither -1 (uniform) nor in [0, 1]")));
  if (c.data().task() != "needle") return absl::OkStatus();
  const int64_t vocab = 2 + int64_t{n.key_vocab()} + n.value_vocab() + n.filler_vocab();
  LOOM_RETURN_IF_ERROR(Range(vocab <= c.model().vocab(), "model.vocab",
                             absl::StrCat(c.model().vocab(), " is below the needle task's 2 + key_vocab + value_vocab",
                                          " + filler_vocab = ", vocab)));
  // The needles fill at most half of the haystack, so distractors find room.
  const int64_t need = 6 * int64_t{n.needles()} + 5;
  LOOM_RETURN_IF_ERROR(Range(c.train().seq_len() >= need, "train.seq_len",
                             absl::StrCat(c.train().seq_len(), " cannot hold ", n.needles(),
                                          " needles and the question (needs 6·needles + 5 = ", need, ")")));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ConfigArgs> ExtractConfigArgs(int& argc, char** argv) {
  ConfigArgs args;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto take = [&](const std::string& flag, std::string* value) -> absl::StatusOr<bool> {
      if (a == flag) {
        if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(flag, " needs a value"));
        *value = argv[++i];
        return true;
      }
      if (absl::StartsWith(a, absl::StrCat(flag, "="))) {
        *value = std::string(a.substr(flag.size() + 1));
        return true;
      }
      return false;
    };
    std::string value;
    LOOM_ASSIGN_OR_RETURN(bool is_config, take("--config", &value));
    if (is_config) {
      args.config_path = value;
      continue;
    }
    LOOM_ASSIGN_OR_RETURN(bool is_set, take("--set", &value));
    if (is_set) {
      args.sets.push_back(value);
      continue;
    }
    argv[out++] = argv[i];
  }
  argc = out;
  argv[argc] = nullptr;
  return args;
}

absl::Status ApplyOverride(config::Config& config, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    return absl::InvalidArgumentError(absl::StrCat("--set ", assignment, ": expected path.to.field=value"));
  const std::string path = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  pb::Message* msg = &config;
  std::vector<std::string> parts = absl::StrSplit(path, '.');
  for (size_t p = 0; p < parts.size(); ++p) {
    std::string name = parts[p];
    int index = -1;
    if (const size_t lb = name.find('['); lb != std::string::npos) {
      if (name.back() != ']' || !absl::SimpleAtoi(name.substr(lb + 1, name.size() - lb - 2), &index) || index < 0)
        return absl::InvalidArgumentError(absl::StrCat("--set ", path, ": bad index in '", name, "'"));
      name = name.substr(0, lb);
    }
    const pb::Descriptor* d = msg->GetDescriptor();
    const pb::FieldDescriptor* f = d->FindFieldByName(name);
    if (!f)
      return absl::InvalidArgumentError(
          absl::StrCat("--set ", path, ": ", d->name(), " has no field '", name, "'", NearestFieldHint(*d, name)));
    const pb::Reflection* r = msg->GetReflection();
    if (f->is_repeated() != (index >= 0))
      return absl::InvalidArgumentError(absl::StrCat("--set ", path, ": '", name, "' ",
                                                     f->is_repeated() ? "is repeated: give an index, e.g. "
                                                                      : "is not repeated, drop the index: ",
                                                     f->is_repeated() ? name + "[0]" : name));
    if (index >= 0 && index > r->FieldSize(*msg, f))
      return absl::InvalidArgumentError(absl::StrCat("--set ", path, ": index ", index, " past the end (",
                                                     name, " has ", r->FieldSize(*msg, f), " elements)"));
    const bool last = p + 1 == parts.size();
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      if (last) return SetScalar(*msg, f, index, value, path);  // reports "is a message"
      if (index < 0) {
        msg = r->MutableMessage(msg, f);
      } else {
        msg = index == r->FieldSize(*msg, f) ? r->AddMessage(msg, f) : r->MutableRepeatedMessage(msg, f, index);
      }
      continue;
    }
    if (!last)
      return absl::InvalidArgumentError(absl::StrCat("--set ", path, ": '", name, "' is not a message"));
    if (index >= 0 && index == r->FieldSize(*msg, f)) {
      // Appending: add a default element, then set it.
      pb::TextFormat::ParseFieldValueFromString(
          f->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING ? "\"\"" : "0", f, msg);
    }
    return SetScalar(*msg, f, index, value, path);
  }
  return absl::OkStatus();
}

absl::StatusOr<config::Config> LoadConfig(const std::string& path, const std::vector<std::string>& sets) {
  config::Config config;
  if (!path.empty()) {
    std::ifstream in(path);
    if (!in.good()) return absl::NotFoundError(absl::StrCat(path, ": cannot open config file"));
    std::stringstream text;
    text << in.rdbuf();
    LOOM_RETURN_IF_ERROR(ParseTextProto(text.str(), path, &config));
  }
  for (const std::string& s : sets) LOOM_RETURN_IF_ERROR(ApplyOverride(config, s));
  FillDefaults(config);
  LOOM_RETURN_IF_ERROR(ValidateConfig(config));
  return config;
}

absl::Status ValidateConfig(const config::Config& c) {
  const auto& m = c.model();
  const auto& t = c.train();
  const auto& o = c.optim();
  LOOM_RETURN_IF_ERROR(Range(!m.pattern().empty(), "model.pattern", "must not be empty"));
  for (char ch : m.pattern())
    LOOM_RETURN_IF_ERROR(Range(ch == 'S' || ch == 'L' || ch == 'H' || ch == 'R', "model.pattern",
                               absl::StrCat("'", std::string(1, ch),
                                            "' is not a layer kind (S softmax, L lightning, H / R MoH over them)")));
  LOOM_RETURN_IF_ERROR(Range(m.layers() >= 1 && m.layers() <= 1024, "model.layers",
                             absl::StrCat(m.layers(), " is outside [1, 1024]")));
  LOOM_RETURN_IF_ERROR(Range(m.hidden() >= 8 && m.hidden() <= 65536, "model.hidden",
                             absl::StrCat(m.hidden(), " is outside [8, 65536]")));
  LOOM_RETURN_IF_ERROR(Range(m.heads() >= 1 && m.heads() <= 1024, "model.heads",
                             absl::StrCat(m.heads(), " is outside [1, 1024]")));
  LOOM_RETURN_IF_ERROR(Range(m.hidden() % m.heads() == 0, "model.heads",
                             absl::StrCat(m.heads(), " does not divide model.hidden = ", m.hidden())));
  LOOM_RETURN_IF_ERROR(Range(m.kv_heads() >= 1 && m.kv_heads() <= m.heads(), "model.kv_heads",
                             absl::StrCat(m.kv_heads(), " is outside [1, model.heads = ", m.heads(), "]")));
  LOOM_RETURN_IF_ERROR(Range(m.heads() % m.kv_heads() == 0, "model.kv_heads",
                             absl::StrCat(m.kv_heads(), " does not divide model.heads = ", m.heads())));
  LOOM_RETURN_IF_ERROR(Range((m.hidden() / m.heads()) % 2 == 0, "model.heads",
                             absl::StrCat("head dim ", m.hidden() / m.heads(), " is odd (RoPE needs pairs)")));
  LOOM_RETURN_IF_ERROR(Range(m.vocab() >= 2, "model.vocab", absl::StrCat(m.vocab(), " is below 2")));
  LOOM_RETURN_IF_ERROR(Range(m.ffn_hidden() >= 0, "model.ffn_hidden", "must be >= 0 (0: 8/3·hidden)"));
  LOOM_RETURN_IF_ERROR(Range(m.norm_eps() > 0 && m.norm_eps() <= 1e-2, "model.norm_eps",
                             absl::StrCat(m.norm_eps(), " is outside (0, 1e-2]")));
  LOOM_RETURN_IF_ERROR(Range(m.lightning_norm_eps() >= 0 && m.lightning_norm_eps() <= 1e-2, "model.lightning_norm_eps",
                             absl::StrCat(m.lightning_norm_eps(), " is outside (0, 1e-2] (or 0: norm_eps)")));
  LOOM_RETURN_IF_ERROR(Range(m.rope_theta() > 1, "model.rope_theta", "must be > 1"));
  LOOM_RETURN_IF_ERROR(ValidateRopeScaling(m));
  LOOM_RETURN_IF_ERROR(Range(m.attention() == "softmax" || m.attention() == "sigmoid", "model.attention",
                             absl::StrCat("'", m.attention(), "' is not softmax or sigmoid")));
  LOOM_RETURN_IF_ERROR(Range(m.attention_backend() == "loom" || m.attention_backend() == "cudnn",
                             "model.attention_backend",
                             absl::StrCat("'", m.attention_backend(), "' is not loom or cudnn")));
  LOOM_RETURN_IF_ERROR(Range(m.lightning_block() >= 1 && m.lightning_block() <= 4096, "model.lightning_block",
                             absl::StrCat(m.lightning_block(), " is outside [1, 4096]")));
  LOOM_RETURN_IF_ERROR(Range(m.init_std() > 0 && m.init_std() <= 1, "model.init_std",
                             absl::StrCat(m.init_std(), " is outside (0, 1]")));
  if (!m.recompute().empty() && m.recompute() != "all") {
    for (const std::string& part : std::vector<std::string>(absl::StrSplit(m.recompute(), ','))) {
      int layer;
      LOOM_RETURN_IF_ERROR(Range(absl::SimpleAtoi(part, &layer) && layer >= 0 && layer < m.layers(),
                                 "model.recompute",
                                 absl::StrCat("'", part, "' is not a layer index in [0, ", m.layers(), ")")));
    }
  }
  const auto& moe = m.moe();
  LOOM_RETURN_IF_ERROR(Range(moe.experts() >= 0 && moe.experts() <= 1024, "model.moe.experts",
                             absl::StrCat(moe.experts(), " is outside [0, 1024] (0: dense MLP)")));
  if (moe.experts() > 0) {
    LOOM_RETURN_IF_ERROR(Range(moe.top_k() >= 1 && moe.top_k() <= moe.experts(), "model.moe.top_k",
                               absl::StrCat(moe.top_k(), " is outside [1, model.moe.experts = ", moe.experts(), "]")));
    LOOM_RETURN_IF_ERROR(Range(moe.moe_ffn() >= 0, "model.moe.moe_ffn", "must be >= 0 (0: the dense SwiGLU width)"));
    LOOM_RETURN_IF_ERROR(Range(moe.shared_experts() >= 0 && moe.shared_experts() <= 64, "model.moe.shared_experts",
                               absl::StrCat(moe.shared_experts(), " is outside [0, 64]")));
    LOOM_RETURN_IF_ERROR(Range(moe.router() == "softmax" || moe.router() == "sigmoid", "model.moe.router",
                               absl::StrCat("'", moe.router(), "' is not softmax or sigmoid")));
    LOOM_RETURN_IF_ERROR(Range(moe.aux_loss_coef() >= 0 && moe.aux_loss_coef() <= 10, "model.moe.aux_loss_coef",
                               absl::StrCat(moe.aux_loss_coef(), " is outside [0, 10]")));
    LOOM_RETURN_IF_ERROR(Range(moe.z_loss_coef() >= 0 && moe.z_loss_coef() <= 10, "model.moe.z_loss_coef",
                               absl::StrCat(moe.z_loss_coef(), " is outside [0, 10]")));
    LOOM_RETURN_IF_ERROR(Range(moe.bias_update_rate() >= 0 && moe.bias_update_rate() <= 1,
                               "model.moe.bias_update_rate",
                               absl::StrCat(moe.bias_update_rate(), " is outside [0, 1]")));
    LOOM_RETURN_IF_ERROR(Range(moe.capacity_factor() == 0 ||
                                   (moe.capacity_factor() >= 1e-3 && moe.capacity_factor() <= 64),
                               "model.moe.capacity_factor",
                               absl::StrCat(moe.capacity_factor(), " is neither 0 (dropless) nor in [1e-3, 64]")));
    // Router statistics are reduced over dp × cp, and experts split over ep
    // ranks of the DP group (model/moe.h); each pipeline stage adds its
    // layers' router losses (model/pipeline.h). The MoE layer has no TP split
    // yet.
    const auto& p = c.parallel();
    LOOM_RETURN_IF_ERROR(Range(p.tp() == 1, "parallel.tp",
                               absl::StrCat(p.tp(), ": MoE layers (model.moe.experts = ", moe.experts(),
                                            ") run without tensor parallelism yet; set it to 1")));
    // Capacity drops follow the global token order, which the zig-zag CP
    // split does not keep in rank order.
    LOOM_RETURN_IF_ERROR(Range(p.cp() == 1 || moe.capacity_factor() == 0, "parallel.cp",
                               absl::StrCat(p.cp(), ": MoE layers with a capacity (model.moe.capacity_factor = ",
                                            moe.capacity_factor(), ") need parallel.cp = 1; dropless routing "
                                            "(capacity_factor 0) runs under context parallelism")));
    LOOM_RETURN_IF_ERROR(Range(p.ep() >= 1 && moe.experts() % p.ep() == 0, "parallel.ep",
                               absl::StrCat(p.ep(), " does not divide model.moe.experts = ", moe.experts())));
  }

  LOOM_RETURN_IF_ERROR(ValidateMoh(c));

  LOOM_RETURN_IF_ERROR(Range(t.steps() >= 1, "train.steps", absl::StrCat(t.steps(), " is below 1")));
  LOOM_RETURN_IF_ERROR(Range(!t.deterministic() || m.attention_backend() != "cudnn", "train.deterministic",
                             "needs model.attention_backend = loom (cuDNN's SDPA backward is not known to repeat "
                             "bit for bit)"));
  LOOM_RETURN_IF_ERROR(Range(t.seq_len() >= 2, "train.seq_len", absl::StrCat(t.seq_len(), " is below 2")));
  LOOM_RETURN_IF_ERROR(Range(t.micro_batch() >= 1, "train.micro_batch", absl::StrCat(t.micro_batch(), " is below 1")));
  LOOM_RETURN_IF_ERROR(Range(t.global_batch() >= 1 && t.global_batch() % t.micro_batch() == 0, "train.global_batch",
                             absl::StrCat(t.global_batch(), " is not a positive multiple of train.micro_batch = ",
                                          t.micro_batch())));
  LOOM_RETURN_IF_ERROR(Range(!t.run_dir().empty(), "train.run_dir", "must not be empty"));
  LOOM_RETURN_IF_ERROR(Range(t.log_every() >= 1, "train.log_every", absl::StrCat(t.log_every(), " is below 1")));
  LOOM_RETURN_IF_ERROR(Range(t.eval_every() >= 0, "train.eval_every", "must be >= 0"));
  LOOM_RETURN_IF_ERROR(Range(t.eval_sequences() >= 1 && t.eval_sequences() <= (1 << 20), "train.eval_sequences",
                             absl::StrCat(t.eval_sequences(), " is outside [1, 2^20]")));
  LOOM_RETURN_IF_ERROR(Range(t.dtype() == "f32" || t.dtype() == "f64" || t.dtype() == "bf16", "train.dtype",
                             absl::StrCat("'", t.dtype(), "' is not f32, f64 or bf16")));
  LOOM_RETURN_IF_ERROR(Range(t.device() == "auto" || t.device() == "cpu" || t.device() == "cuda", "train.device",
                             absl::StrCat("'", t.device(), "' is not auto, cpu or cuda")));
  LOOM_RETURN_IF_ERROR(Range(t.dtype() != "bf16" || t.device() != "cpu", "train.dtype",
                             "bf16 trains on the GPU only, and train.device is cpu"));

  LOOM_RETURN_IF_ERROR(Range(o.lr() > 0 && o.lr() <= 10, "optim.lr", absl::StrCat(o.lr(), " is outside (0, 10]")));
  LOOM_RETURN_IF_ERROR(Range(o.min_lr_ratio() >= 0 && o.min_lr_ratio() <= 1, "optim.min_lr_ratio",
                             absl::StrCat(o.min_lr_ratio(), " is outside [0, 1]")));
  LOOM_RETURN_IF_ERROR(Range(o.warmup_steps() >= 0 && o.warmup_steps() <= t.steps(), "optim.warmup_steps",
                             absl::StrCat(o.warmup_steps(), " is outside [0, train.steps = ", t.steps(), "]")));
  LOOM_RETURN_IF_ERROR(Range(o.schedule() == "cosine" || o.schedule() == "linear" || o.schedule() == "wsd" ||
                                 o.schedule() == "constant",
                             "optim.schedule",
                             absl::StrCat("'", o.schedule(), "' is not cosine, linear, wsd or constant")));
  LOOM_RETURN_IF_ERROR(Range(o.decay_fraction() > 0 && o.decay_fraction() <= 1, "optim.decay_fraction",
                             absl::StrCat(o.decay_fraction(), " is outside (0, 1]")));
  LOOM_RETURN_IF_ERROR(Range(o.beta1() >= 0 && o.beta1() < 1, "optim.beta1", absl::StrCat(o.beta1(), " is outside [0, 1)")));
  LOOM_RETURN_IF_ERROR(Range(o.beta2() >= 0 && o.beta2() < 1, "optim.beta2", absl::StrCat(o.beta2(), " is outside [0, 1)")));
  LOOM_RETURN_IF_ERROR(Range(o.eps() > 0 && o.eps() < 1, "optim.eps", absl::StrCat(o.eps(), " is outside (0, 1)")));
  LOOM_RETURN_IF_ERROR(Range(o.weight_decay() >= 0 && o.weight_decay() <= 10, "optim.weight_decay",
                             absl::StrCat(o.weight_decay(), " is outside [0, 10]")));
  LOOM_RETURN_IF_ERROR(Range(o.grad_clip() >= 0, "optim.grad_clip", "must be >= 0 (0 disables)"));

  const auto& d = c.data();
  LOOM_RETURN_IF_ERROR(Range(d.task() == "recall" || d.task() == "needle" || d.task() == "files", "data.task",
                             absl::StrCat("'", d.task(), "' is not recall, needle or files")));
  LOOM_RETURN_IF_ERROR(ValidateNeedle(c));
  if (d.task() == "files") {
    LOOM_RETURN_IF_ERROR(Range(d.paths_size() > 0, "data.paths", "task files needs at least one dataset prefix"));
    for (int i = 0; i < d.paths_size(); ++i) {
      const std::string field = absl::StrCat("data.paths[", i, "]");
      LOOM_RETURN_IF_ERROR(Range(!d.paths(i).prefix().empty(), field + ".prefix", "must not be empty"));
      LOOM_RETURN_IF_ERROR(Range(d.paths(i).weight() > 0, field + ".weight",
                                 absl::StrCat(d.paths(i).weight(), " is not positive")));
    }
    LOOM_RETURN_IF_ERROR(Range(d.eod_token() >= 0 && d.eod_token() < m.vocab(), "data.eod_token",
                               absl::StrCat(d.eod_token(), " is outside [0, model.vocab = ", m.vocab(), ")")));
  }
  const auto& a = d.recall();
  LOOM_RETURN_IF_ERROR(Range(a.pairs() >= 1 && a.pairs() <= 4096, "data.recall.pairs",
                             absl::StrCat(a.pairs(), " is outside [1, 4096]")));
  LOOM_RETURN_IF_ERROR(Range(a.queries() >= 1 && a.queries() <= a.pairs(), "data.recall.queries",
                             absl::StrCat(a.queries(), " is outside [1, data.recall.pairs = ", a.pairs(), "]")));
  LOOM_RETURN_IF_ERROR(Range(a.key_vocab() >= a.pairs(), "data.recall.key_vocab",
                             absl::StrCat(a.key_vocab(), " is below data.recall.pairs = ", a.pairs())));
  LOOM_RETURN_IF_ERROR(Range(a.value_vocab() >= 2, "data.recall.value_vocab", "must be >= 2"));
  if (d.task() == "recall") {
    LOOM_RETURN_IF_ERROR(Range(1 + a.key_vocab() + a.value_vocab() <= m.vocab(), "model.vocab",
                               absl::StrCat(m.vocab(), " is below the task's 1 + key_vocab + value_vocab = ",
                                            1 + a.key_vocab() + a.value_vocab())));
    LOOM_RETURN_IF_ERROR(Range(2 * a.pairs() + 2 * a.queries() <= t.seq_len(), "train.seq_len",
                               absl::StrCat(t.seq_len(), " cannot hold ", a.pairs(), " pairs and ", a.queries(),
                                            " queries (needs 2·pairs + 2·queries)")));
  }

  const auto& p = c.parallel();
  LOOM_RETURN_IF_ERROR(Range(p.tp() >= 1, "parallel.tp", absl::StrCat(p.tp(), " is below 1")));
  LOOM_RETURN_IF_ERROR(Range(p.cp() >= 1, "parallel.cp", absl::StrCat(p.cp(), " is below 1")));
  LOOM_RETURN_IF_ERROR(Range(p.pp() >= 1, "parallel.pp", absl::StrCat(p.pp(), " is below 1")));
  LOOM_RETURN_IF_ERROR(Range(p.vpp() >= 1, "parallel.vpp", absl::StrCat(p.vpp(), " is below 1")));
  LOOM_RETURN_IF_ERROR(Range(p.ep() >= 1, "parallel.ep", absl::StrCat(p.ep(), " is below 1")));
  LOOM_RETURN_IF_ERROR(Range(p.zero() == 0 || p.zero() == 1, "parallel.zero", absl::StrCat(p.zero(), " is not 0 or 1")));
  LOOM_RETURN_IF_ERROR(Range(p.backend() == "auto" || p.backend() == "mpi" || p.backend() == "nccl",
                             "parallel.backend", absl::StrCat("'", p.backend(), "' is not auto, mpi or nccl")));
  LOOM_RETURN_IF_ERROR(Range(p.timeout_s() >= 1 && p.timeout_s() <= 86400, "parallel.timeout_s",
                             absl::StrCat(p.timeout_s(), " is outside [1, 86400]")));
  LOOM_RETURN_IF_ERROR(Range(p.bucket_mb() > 0 && p.bucket_mb() <= 4096, "parallel.bucket_mb",
                             absl::StrCat(p.bucket_mb(), " is outside (0, 4096]")));
  LOOM_RETURN_IF_ERROR(Range(p.cp_softmax() == "ring" || p.cp_softmax() == "allgather" || p.cp_softmax() == "ulysses",
                             "parallel.cp_softmax",
                             absl::StrCat("'", p.cp_softmax(), "' is not ring, allgather or ulysses")));
  LOOM_RETURN_IF_ERROR(Range(p.cp_linear() == "lasp1" || p.cp_linear() == "lasp2", "parallel.cp_linear",
                             absl::StrCat("'", p.cp_linear(), "' is not lasp1 or lasp2")));
  const auto& k = c.checkpoint();
  LOOM_RETURN_IF_ERROR(Range(k.every() >= 0, "checkpoint.every", absl::StrCat(k.every(), " is negative")));
  LOOM_RETURN_IF_ERROR(Range(k.keep() >= 0, "checkpoint.keep", absl::StrCat(k.keep(), " is negative")));
  LOOM_RETURN_IF_ERROR(Range(!k.resume().empty(), "checkpoint.resume", "must be auto, none or a step directory"));
  return absl::OkStatus();
}

std::string ConfigToText(const config::Config& config) {
  std::string text;
  pb::TextFormat::PrintToString(config, &text);
  return text;
}

}  // namespace loom
