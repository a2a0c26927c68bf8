#include "data/byte_tokenizer.h"

namespace loom {

void ByteTokenizer::EncodeInto(const std::string& text, std::vector<int32_t>* out) {
  out->reserve(out->size() + text.size());
  // Through unsigned char: bytes >= 0x80 must map to 128..255, not negatives.
  for (unsigned char c : text) out->push_back(static_cast<int32_t>(c));
}

std::vector<int32_t> ByteTokenizer::Encode(const std::string& text) {
  std::vector<int32_t> ids;
  EncodeInto(text, &ids);
  return ids;
}

absl::StatusOr<std::string> ByteTokenizer::Decode(const std::vector<int32_t>& ids) {
  std::string text;
  text.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id == kEod) continue;
    if (id < 0 || id > 255) {
      return absl::InvalidArgumentError(
          absl::StrCat("[byte_tokenizer] id ", id, " at position ", i, " is neither a byte (0..255) nor EOD (256)"));
    }
    text.push_back(static_cast<char>(static_cast<unsigned char>(id)));
  }
  return text;
}

}  // namespace loom
