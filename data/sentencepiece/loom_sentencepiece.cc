// libloom_sentencepiece.so: the C interface of loom_sentencepiece.h over
// sentencepiece::SentencePieceProcessor. Built only against
// sentencepiece_processor.h, never against Loom's Abseil (see the header for
// why the two must not meet).
#include "data/sentencepiece/loom_sentencepiece.h"

#include <sentencepiece_processor.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

struct LoomSentencePiece {
  sentencepiece::SentencePieceProcessor processor;
};

namespace {

void SetError(char* error, size_t error_size, const std::string& text) {
  if (error == nullptr || error_size == 0) return;
  std::snprintf(error, error_size, "%s", text.c_str());
}

}  // namespace

extern "C" {

int loom_sentencepiece_abi(void) { return LOOM_SENTENCEPIECE_ABI; }

LoomSentencePiece* loom_sentencepiece_load(const char* model_path, char* error, size_t error_size) {
  try {
    auto* model = new LoomSentencePiece;
    const sentencepiece::util::Status status = model->processor.Load(model_path);
    if (!status.ok()) {
      SetError(error, error_size, status.ToString());
      delete model;
      return nullptr;
    }
    return model;
  } catch (const std::exception& e) {
    SetError(error, error_size, e.what());
    return nullptr;
  }
}

void loom_sentencepiece_free(LoomSentencePiece* model) { delete model; }

int32_t loom_sentencepiece_vocab_size(const LoomSentencePiece* model) { return model->processor.GetPieceSize(); }

int32_t loom_sentencepiece_eos_id(const LoomSentencePiece* model) { return model->processor.eos_id(); }

int64_t loom_sentencepiece_encode(const LoomSentencePiece* model, const char* text, size_t size, int32_t* ids,
                                  int64_t capacity, char* error, size_t error_size) {
  try {
    std::vector<int> out;
    const sentencepiece::util::Status status = model->processor.Encode(std::string_view(text, size), &out);
    if (!status.ok()) {
      SetError(error, error_size, status.ToString());
      return -1;
    }
    const int64_t n = static_cast<int64_t>(out.size());
    if (n <= capacity) {
      static_assert(sizeof(int) == sizeof(int32_t));
      if (n > 0) std::memcpy(ids, out.data(), out.size() * sizeof(int32_t));
    }
    return n;
  } catch (const std::exception& e) {
    SetError(error, error_size, e.what());
    return -1;
  }
}

int64_t loom_sentencepiece_decode(const LoomSentencePiece* model, const int32_t* ids, size_t count, char* text,
                                  int64_t capacity, char* error, size_t error_size) {
  try {
    const int vocab = model->processor.GetPieceSize();
    std::vector<int> in(ids, ids + count);
    for (size_t i = 0; i < count; ++i) {
      if (in[i] < 0 || in[i] >= vocab) {
        SetError(error, error_size,
                 "id " + std::to_string(in[i]) + " at position " + std::to_string(i) + " is outside the vocabulary of " +
                     std::to_string(vocab));
        return -1;
      }
    }
    std::string out;
    const sentencepiece::util::Status status = model->processor.Decode(in, &out);
    if (!status.ok()) {
      SetError(error, error_size, status.ToString());
      return -1;
    }
    const int64_t n = static_cast<int64_t>(out.size());
    if (n <= capacity && n > 0) std::memcpy(text, out.data(), out.size());
    return n;
  } catch (const std::exception& e) {
    SetError(error, error_size, e.what());
    return -1;
  }
}

}  // extern "C"
