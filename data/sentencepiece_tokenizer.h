// SentencePiece models (Kudo & Richardson, 2018) through Debian's
// libsentencepiece, reached only through libloom_sentencepiece.so, a small
// wrapper with a C interface that is dlopen()ed with RTLD_LOCAL |
// RTLD_DEEPBIND on first use (data/sentencepiece/loom_sentencepiece.h says
// why it may not be linked into a Loom binary). The wrapper is looked for, in
// order, at $LOOM_SENTENCEPIECE_LIBRARY, at <dir of the running
// executable>/../lib/, then by the dynamic loader's search path.
#pragma once

#include <string>
#include <vector>

#include "data/tokenizer.h"

struct LoomSentencePiece;

namespace loom {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Errors name the model file (missing, unreadable, not a model, no </s>)
  // or the wrapper library (not built, not found, of another ABI).
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> Load(const std::string& model_path);
  ~SentencePieceTokenizer() override;

  absl::Status EncodeInto(std::string_view text, std::vector<int32_t>* out) const override;
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  int32_t eod() const override { return eos_id_; }
  std::string description() const override;

  struct Api;  // the wrapper's entry points

 private:
  SentencePieceTokenizer() = default;

  const Api* api_ = nullptr;
  LoomSentencePiece* model_ = nullptr;
  std::string path_;
  int64_t vocab_size_ = 0;
  int32_t eos_id_ = -1;
};

// The paths tried for libloom_sentencepiece.so, in order (see above).
std::vector<std::string> SentencePieceLibraryCandidates();

}  // namespace loom
