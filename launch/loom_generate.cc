// loom-generate --checkpoint DIR (--prompt TEXT | --prompt_ids 1,2,3)
//               [--max_new_tokens N] [--temperature T] [--top_p P] [--seed S]
//               [--tokenizer byte|sentencepiece:MODEL] [--max_context N]
//               [--stop_at_eod] [--print_ids]
// Continues a prompt with a trained checkpoint (its model config is in the
// manifest) on the CPU in f32, through model/decode.h: the prompt is one
// prefill chunk, then one token per step, lightning layers carrying only
// their recurrent state. Greedy when --temperature is 0, else temperature
// and nucleus (top-p) sampling from a Philox stream of --seed.
// The continuation goes to stdout (then its ids with --print_ids); a line of
// timings (tokens/s) to stderr. Bad usage exits 2, a bad checkpoint or model
// 1, each with one line on stderr.
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "checkpoint/checkpoint.h"
#include "data/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "model/decode.h"
#include "runtime/rng.h"
#include "runtime/timer.h"
#include "runtime/tool_flags.h"

ABSL_FLAG(std::string, checkpoint, "", "a checkpoint directory (through its `latest`) or one step_<N>/ directory");
ABSL_FLAG(std::string, prompt, "", "the prompt text, encoded with --tokenizer");
ABSL_FLAG(std::string, prompt_ids, "", "the prompt as comma-separated token ids (instead of --prompt)");
ABSL_FLAG(int, max_new_tokens, 64, "tokens to generate (fewer at EOD or at --max_context)");
ABSL_FLAG(double, temperature, 0, "0: greedy; else softmax(logits / T) sampling");
ABSL_FLAG(double, top_p, 1.0, "nucleus: sample among the most probable tokens holding this much probability, (0, 1]");
ABSL_FLAG(uint64_t, seed, 0, "sampling stream");
ABSL_FLAG(std::string, tokenizer, "byte", "byte, or sentencepiece:MODEL (the tokenizer the data was prepared with)");
ABSL_FLAG(int64_t, max_context, 0, "most positions (prompt + new tokens); 0: the checkpoint's train.seq_len");
ABSL_FLAG(bool, stop_at_eod, true, "stop when the tokenizer's end-of-document token is generated");
ABSL_FLAG(bool, print_ids, false, "also print the generated ids on a second line");

namespace loom {
namespace {

constexpr int kUsageError = 2, kModelError = 1;

int Fail(int code, const std::string& message) {
  std::fprintf(stderr, "loom-generate: %s\n", message.c_str());
  return code;
}

// The checkpoint's config and its weights in a CPU f32 model.
struct Loaded {
  config::Config config;
  int64_t step = 0;
  std::unique_ptr<Model> model;
};

absl::StatusOr<Loaded> LoadModel(const std::string& path) {
  LOOM_ASSIGN_OR_RETURN(const std::string step_dir, checkpoint::ResolveStepDir(path));
  LOOM_ASSIGN_OR_RETURN(checkpoint::CheckpointState state, checkpoint::LoadCheckpoint(step_dir));
  Loaded out;
  out.step = state.step;
  if (!google::protobuf::TextFormat::ParseFromString(state.config_text, &out.config))
    return absl::InvalidArgumentError(absl::StrCat(step_dir, ": the saved config does not parse"));
  ModelDims dims = ModelDims::FromConfig(out.config);
  dims.dtype = DType::kF32;  // generation runs in f32 whatever the training precision
  dims.mixed_bf16 = false;
  dims.device = Device::Cpu();
  out.model = std::make_unique<Model>(dims);
  std::map<std::string, const Tensor*> by_name;
  for (const auto& t : state.tensors) by_name[t.name] = &t.tensor;
  for (Param* p : out.model->params()) {
    auto it = by_name.find(p->name);
    if (it == by_name.end()) return absl::InvalidArgumentError(absl::StrCat(step_dir, ": tensor ", p->name, " missing"));
    if (it->second->shape() != p->value.shape())
      return absl::InvalidArgumentError(absl::StrCat(step_dir, ": tensor ", p->name, " is ",
                                                     ShapeString(it->second->shape()), ", the config makes it ",
                                                     ShapeString(p->value.shape())));
    p->value.CopyFrom(it->second->dtype() == DType::kF32 ? *it->second : it->second->To(DType::kF32));
  }
  return out;
}

int Main() {
  const std::string ckpt = absl::GetFlag(FLAGS_checkpoint), text = absl::GetFlag(FLAGS_prompt),
                    ids_flag = absl::GetFlag(FLAGS_prompt_ids);
  const int max_new = absl::GetFlag(FLAGS_max_new_tokens);
  const double temperature = absl::GetFlag(FLAGS_temperature), top_p = absl::GetFlag(FLAGS_top_p);
  if (ckpt.empty()) return Fail(kUsageError, "--checkpoint DIR is required");
  if (text.empty() == ids_flag.empty()) return Fail(kUsageError, "give exactly one of --prompt TEXT and --prompt_ids");
  if (max_new < 0) return Fail(kUsageError, absl::StrCat("--max_new_tokens must be >= 0, got ", max_new));
  if (!(temperature >= 0)) return Fail(kUsageError, absl::StrCat("--temperature must be >= 0, got ", temperature));
  if (!(top_p > 0 && top_p <= 1)) return Fail(kUsageError, absl::StrCat("--top_p must be in (0, 1], got ", top_p));
  if (absl::GetFlag(FLAGS_max_context) < 0)
    return Fail(kUsageError, absl::StrCat("--max_context must be >= 0, got ", absl::GetFlag(FLAGS_max_context)));
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = MakeTokenizer(absl::GetFlag(FLAGS_tokenizer));
  if (!tokenizer.ok()) return Fail(kUsageError, std::string(tokenizer.status().message()));
  std::vector<int32_t> prompt;
  if (!ids_flag.empty()) {
    for (absl::string_view part : absl::StrSplit(ids_flag, ',')) {
      int32_t id = 0;
      if (!absl::SimpleAtoi(part, &id) || id < 0)
        return Fail(kUsageError, absl::StrCat("--prompt_ids: '", part, "' is not a token id"));
      prompt.push_back(id);
    }
  } else if (absl::Status s = (*tokenizer)->EncodeInto(text, &prompt); !s.ok()) {
    return Fail(kUsageError, absl::StrCat("--prompt: ", s.message()));
  }
  if (prompt.empty()) return Fail(kUsageError, "the prompt encodes to no tokens");

  absl::StatusOr<Loaded> loaded = LoadModel(ckpt);
  if (!loaded.ok()) return Fail(kModelError, std::string(loaded.status().message()));
  Model& model = *loaded->model;
  const ModelDims& dims = model.dims();
  for (int32_t id : prompt)
    if (id >= dims.vocab)
      return Fail(kUsageError, absl::StrCat("prompt token ", id, " is outside the model's vocabulary of ", dims.vocab));
  const int64_t context =
      absl::GetFlag(FLAGS_max_context) > 0 ? absl::GetFlag(FLAGS_max_context) : loaded->config.train().seq_len();
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  if (n_prompt > context)
    return Fail(kUsageError, absl::StrCat("the prompt is ", n_prompt, " tokens, longer than the ", context,
                                          " allowed (--max_context; default: the checkpoint's train.seq_len)"));
  absl::StatusOr<Decoder> decoder = Decoder::Create(model);
  if (!decoder.ok()) return Fail(kModelError, std::string(decoder.status().message()));

  // Prefill: the whole prompt as one chunk; then one token a step. The
  // token at position `context` would need a position never allowed.
  DecodeCache cache = decoder->NewCache(context);
  const int64_t budget = std::min<int64_t>(max_new, context - n_prompt + 1);
  const uint64_t key = RngKey(absl::GetFlag(FLAGS_seed), "generate");
  const int32_t eod = (*tokenizer)->eod();
  std::vector<int32_t> generated;
  Timer prefill_timer;
  absl::StatusOr<Tensor> logits = decoder->Extend(cache, prompt);
  const double prefill_s = prefill_timer.Seconds();
  Timer decode_timer;
  while (logits.ok() && static_cast<int64_t>(generated.size()) < budget) {
    const Tensor last = logits->Slice(logits->dim(0) - 1, 1);
    const int32_t next = SampleToken(last, temperature, top_p, RngUniform(key, generated.size()));
    generated.push_back(next);
    if ((absl::GetFlag(FLAGS_stop_at_eod) && next == eod) || static_cast<int64_t>(generated.size()) == budget) break;
    logits = decoder->Extend(cache, {next});
  }
  const double decode_s = decode_timer.Seconds();
  if (!logits.ok()) return Fail(kModelError, std::string(logits.status().message()));

  absl::StatusOr<std::string> out = (*tokenizer)->Decode(generated);
  if (!out.ok())
    return Fail(kModelError, absl::StrCat("the model generated ids the tokenizer cannot decode (",
                                          out.status().message(), "): is --tokenizer the one it was trained with?"));
  std::printf("%s\n", out->c_str());
  if (absl::GetFlag(FLAGS_print_ids)) std::printf("%s\n", absl::StrJoin(generated, ",").c_str());
  std::fflush(stdout);
  const int64_t n_new = static_cast<int64_t>(generated.size());
  std::fprintf(stderr,
               "loom-generate: %lld prompt tokens in %.3f s (%.0f tokens/s), %lld new tokens in %.3f s (%.1f tokens/s)"
               " | model %s, step %lld, cache %.1f KB%s\n",
               static_cast<long long>(n_prompt), prefill_s, n_prompt / std::max(prefill_s, 1e-9),
               static_cast<long long>(n_new), decode_s, n_new / std::max(decode_s, 1e-9), dims.kinds.c_str(),
               static_cast<long long>(loaded->step), cache.bytes() / 1e3,
               n_new < max_new && (n_new == 0 || generated.back() != eod)
                   ? absl::StrCat(" | stopped at --max_context ", context).c_str()
                   : "");
  return 0;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::ParseToolFlags(argc, argv,
      "loom-generate --checkpoint DIR (--prompt TEXT | --prompt_ids 1,2,3) [--max_new_tokens N] "
      "[--temperature T] [--top_p P] [--seed S] [--tokenizer byte|sentencepiece:MODEL] [--max_context N]");
  return loom::Main();
}
