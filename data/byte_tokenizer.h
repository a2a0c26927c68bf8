// Byte-level tokenizer: each byte of the UTF-8 (or any) text is its own id,
// 0..255, and id 256 marks the end of a document. No merges, no vocabulary
// file: any input round-trips exactly.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/status.h"

namespace loom {

class ByteTokenizer {
 public:
  static constexpr int32_t kEod = 256;
  static constexpr int32_t kVocab = 257;

  // Appends the ids of `text`'s bytes to `out` (reusable across documents).
  static void EncodeInto(const std::string& text, std::vector<int32_t>* out);
  static std::vector<int32_t> Encode(const std::string& text);
  // EOD ids decode to nothing; an id outside 0..256 is an error.
  static absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids);
};

}  // namespace loom
