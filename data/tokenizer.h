// The tokenizers loom-prepare can use, behind one interface:
//
//   "byte"                 ByteTokenizer: ids 0..255, EOD 256, vocab 257.
//   "sentencepiece:MODEL"  a SentencePiece model file (SentencePieceTokenizer),
//                          EOD = the model's </s>.
//
// Encode and Decode are const and safe to call from several threads at once:
// loom-prepare's workers share one tokenizer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/status.h"

namespace loom {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Appends the ids of `text` to `out` (no EOD).
  virtual absl::Status EncodeInto(std::string_view text, std::vector<int32_t>* out) const = 0;
  // The text of `ids`; EOD ids decode to nothing.
  virtual absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids) const = 0;

  // Ids are 0..vocab_size()-1; the dataset dtype follows from it
  // (IndexedDTypeForVocab: u16 below 65,500, else i32).
  virtual int64_t vocab_size() const = 0;
  // Appended after each document.
  virtual int32_t eod() const = 0;
  // For logs: "byte", "sentencepiece:/path/m.model (32000 pieces)".
  virtual std::string description() const = 0;
};

// A tokenizer from its spec (table above); an unknown spec or a bad model
// file is an error naming it.
absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(const std::string& spec);

}  // namespace loom
