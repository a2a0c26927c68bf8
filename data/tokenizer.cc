#include "data/tokenizer.h"

#include "data/byte_tokenizer.h"
#include "data/sentencepiece_tokenizer.h"

namespace loom {
namespace {

class ByteLevel final : public Tokenizer {
 public:
  absl::Status EncodeInto(std::string_view text, std::vector<int32_t>* out) const override {
    out->reserve(out->size() + text.size());
    for (unsigned char c : text) out->push_back(static_cast<int32_t>(c));
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids) const override {
    return ByteTokenizer::Decode(ids);
  }
  int64_t vocab_size() const override { return ByteTokenizer::kVocab; }
  int32_t eod() const override { return ByteTokenizer::kEod; }
  std::string description() const override { return "byte"; }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(const std::string& spec) {
  if (spec == "byte") return std::unique_ptr<Tokenizer>(new ByteLevel());
  constexpr std::string_view kSentencePiece = "sentencepiece:";
  if (spec.rfind(kSentencePiece, 0) == 0) {
    const std::string model = spec.substr(kSentencePiece.size());
    if (model.empty()) return absl::InvalidArgumentError("--tokenizer sentencepiece:MODEL needs a model file path");
    LOOM_ASSIGN_OR_RETURN(std::unique_ptr<SentencePieceTokenizer> sp, SentencePieceTokenizer::Load(model));
    return std::unique_ptr<Tokenizer>(std::move(sp));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--tokenizer: unknown tokenizer '", spec, "' (want byte or sentencepiece:MODEL)"));
}

}  // namespace loom
