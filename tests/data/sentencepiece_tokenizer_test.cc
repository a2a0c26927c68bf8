// SentencePiece through libloom_sentencepiece.so (data/sentencepiece_tokenizer.h):
// a model trained here with spm_train (Debian's `sentencepiece` package)
// prepares a corpus whose documents decode back to the input lines, with u16
// ids for a small vocabulary and i32 (code 4) from 65,500 pieces; bad model
// files are errors that name them.
#include "data/sentencepiece_tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/indexed_dataset.h"
#include "tests/testing.h"
#include "data/prepare.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

using testing::TempPath;

void WriteLines(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  for (const std::string& l : lines) out << l << '\n';
}

// Skips the test when spm_train or the wrapper library is not there.
#define SKIP_WITHOUT_SENTENCEPIECE()                                                              \
  do {                                                                                            \
    if (std::system("command -v spm_train >/dev/null 2>&1") != 0)                                 \
      GTEST_SKIP() << "spm_train not installed (Debian package sentencepiece)";                    \
    bool found = false;                                                                           \
    for (const std::string& p : SentencePieceLibraryCandidates()) found = found || fs::exists(p); \
    if (!found) GTEST_SKIP() << "libloom_sentencepiece.so not built (needs libsentencepiece-dev)"; \
  } while (0)

// Trains `prefix`.model on `text_path`; identity normalisation and byte
// fallback make every input decode back exactly.
std::string Train(const std::string& text_path, const std::string& prefix, const std::string& extra) {
  const std::string cmd = "spm_train --input=" + text_path + " --model_prefix=" + prefix + " " + extra +
                          " --minloglevel=2 >" + prefix + ".log 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  return prefix + ".model";
}

// Prepares `lines` with `model` on `workers` threads and checks every
// document decodes to its line and ends in EOD; returns the dtype.
IndexedDType PrepareAndCheck(const std::string& model, const std::vector<std::string>& lines,
                             const std::string& name, int workers) {
  auto tokenizer = MakeTokenizer("sentencepiece:" + model);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  if (!tokenizer.ok()) return IndexedDType::kU8;
  const std::string input = TempPath(name + ".txt"), prefix = TempPath(name);
  WriteLines(input, lines);
  PrepareOptions o;
  o.inputs = {input};
  o.output_prefix = prefix;
  o.workers = workers;
  o.batch_bytes = 512;
  auto stats = PrepareDataset(o, **tokenizer);
  EXPECT_TRUE(stats.ok()) << stats.status();
  auto ds = IndexedDataset::Open(prefix);
  EXPECT_TRUE(ds.ok()) << ds.status();
  if (!stats.ok() || !ds.ok()) return IndexedDType::kU8;
  EXPECT_EQ((*ds)->num_documents(), static_cast<int64_t>(lines.size()));
  for (int64_t d = 0; d < std::min<int64_t>((*ds)->num_documents(), lines.size()); ++d) {
    const int64_t n = (*ds)->sequence_length(d);
    std::vector<int32_t> ids(n);
    (*ds)->Read(d, 0, n, ids.data());
    EXPECT_EQ(ids.back(), (*tokenizer)->eod()) << "document " << d;
    for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < (*tokenizer)->vocab_size()) << id;
    auto text = (*tokenizer)->Decode(ids);
    EXPECT_TRUE(text.ok()) << text.status();
    if (text.ok()) {
      EXPECT_EQ(*text, lines[d]) << "document " << d;
    }
  }
  return (*ds)->dtype();
}

TEST(SentencePiece, SmallVocabularyRoundTripsInU16) {
  SKIP_WITHOUT_SENTENCEPIECE();
  std::vector<std::string> corpus;
  for (int i = 0; i < 200; ++i) {
    corpus.push_back("The quick brown fox " + std::to_string(i) + " jumps over the lazy dog; caf\xc3\xa9 na\xc3\xafve " +
                     std::to_string(7 * i) + ".");
  }
  const std::string text = TempPath("small_corpus.txt");
  WriteLines(text, corpus);
  const std::string model = Train(text, TempPath("small"),
                                  "--vocab_size=400 --normalization_rule_name=identity "
                                  "--remove_extra_whitespaces=false --byte_fallback=true --character_coverage=1.0");
  // Unseen text too: double spaces, a trailing space, characters the model
  // never saw (byte fallback).
  std::vector<std::string> lines = {"the lazy fox", "two  spaces and a trailing one ",
                                    "\xe2\x88\x91 \xe6\x97\xa5\xe6\x9c\xac unseen", "x"};
  for (int i = 0; i < 50; ++i) lines.push_back(corpus[i * 3]);
  EXPECT_EQ(PrepareAndCheck(model, lines, "small_w1", 1), IndexedDType::kU16);
  EXPECT_EQ(PrepareAndCheck(model, lines, "small_w4", 4), IndexedDType::kU16);
  // Several threads share one model: the bytes must still be 1 thread's.
  for (const char* ext : {".bin", ".idx"}) {
    std::ifstream a(TempPath("small_w1") + ext, std::ios::binary), b(TempPath("small_w4") + ext, std::ios::binary);
    const std::string sa((std::istreambuf_iterator<char>(a)), {}), sb((std::istreambuf_iterator<char>(b)), {});
    EXPECT_TRUE(sa == sb) << ext << " differs between 1 and 4 workers";
  }
}

TEST(SentencePiece, VocabularyFrom65500UsesI32) {
  SKIP_WITHOUT_SENTENCEPIECE();
  // A word model with all of 66,000 distinct words: one piece each, plus
  // <unk>, <s> and </s>.
  std::vector<std::string> corpus;
  for (int i = 0; i < 66000; i += 10) {
    std::string line;
    for (int j = i; j < i + 10; ++j) line += (j > i ? " w" : "w") + std::to_string(100000 + j);
    corpus.push_back(line);
  }
  const std::string text = TempPath("words.txt");
  WriteLines(text, corpus);
  const std::string model = Train(text, TempPath("words"), "--model_type=word --use_all_vocab=true --vocab_size=66003");
  auto tokenizer = SentencePieceTokenizer::Load(model);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->vocab_size(), 66003);
  const std::vector<std::string> lines(corpus.end() - 30, corpus.end());
  EXPECT_EQ(PrepareAndCheck(model, lines, "words", 2), IndexedDType::kI32);
}

TEST(SentencePiece, BadModelFilesAreNamed) {
  SKIP_WITHOUT_SENTENCEPIECE();
  const std::string missing = TempPath("missing.model");
  EXPECT_EQ(MakeTokenizer("sentencepiece:" + missing).status().message(),
            missing + ": cannot open SentencePiece model (No such file or directory)");
  const std::string junk = TempPath("junk.model");
  WriteLines(junk, {"this is not a protobuf"});
  const std::string message(MakeTokenizer("sentencepiece:" + junk).status().message());
  EXPECT_EQ(message.rfind(junk + ": not a valid SentencePiece model (", 0), 0u) << message;
  EXPECT_EQ(MakeTokenizer("sentencepiece:").status().message(),
            "--tokenizer sentencepiece:MODEL needs a model file path");
}

}  // namespace
}  // namespace loom
