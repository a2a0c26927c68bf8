// The loom-prepare pipeline (data/prepare.h): the same bytes for any number
// of workers, documents that read back as the input lines, errors that name
// the first bad line in input order.
#include "data/prepare.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "data/indexed_dataset.h"
#include "tests/testing.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

using testing::TempPath;

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Lines of 0..300 random bytes (no '\n'), some empty, one longer than any
// batch, with UTF-8 and every other byte value in them.
std::vector<std::string> RandomLines(int count, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<std::string> lines;
  for (int i = 0; i < count; ++i) {
    const int length = i % 17 == 0 ? 0 : static_cast<int>(gen() % 300);
    std::string line;
    for (int j = 0; j < length; ++j) {
      char c = static_cast<char>(gen() % 256);
      line.push_back(c == '\n' ? 'x' : c);
    }
    if (i % 5 == 0) line += "h\xc3\xa9llo w\xc3\xb6rld";
    lines.push_back(line);
  }
  lines[count / 2] = std::string(5000, 'L');
  return lines;
}

std::string Join(const std::vector<std::string>& lines, bool final_newline) {
  std::string text;
  for (size_t i = 0; i < lines.size(); ++i) {
    text += lines[i];
    if (i + 1 < lines.size() || final_newline) text += '\n';
  }
  return text;
}

PrepareOptions Options(const std::string& input, const std::string& prefix, int workers) {
  PrepareOptions o;
  o.inputs = {input};
  o.output_prefix = prefix;
  o.workers = workers;
  o.batch_bytes = 700;  // many small batches, so workers finish out of order
  return o;
}

TEST(Prepare, AnyNumberOfWorkersWritesTheSameBytes) {
  const std::vector<std::string> lines = RandomLines(600, 7);
  const std::string input = TempPath("random.txt");
  WriteBytes(input, Join(lines, /*final_newline=*/false));
  auto tokenizer = MakeTokenizer("byte");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();

  std::string reference_bin, reference_idx;
  for (int workers : {1, 2, 3, 8}) {
    const std::string prefix = TempPath("random_w" + std::to_string(workers));
    auto stats = PrepareDataset(Options(input, prefix, workers), **tokenizer);
    ASSERT_TRUE(stats.ok()) << stats.status();
    const std::string bin = ReadBytes(prefix + ".bin"), idx = ReadBytes(prefix + ".idx");
    if (workers == 1) {
      reference_bin = bin;
      reference_idx = idx;
      continue;
    }
    EXPECT_TRUE(bin == reference_bin) << workers << " workers: .bin differs from 1 worker's (" << bin.size()
                                      << " vs " << reference_bin.size() << " bytes)";
    EXPECT_TRUE(idx == reference_idx) << workers << " workers: .idx differs from 1 worker's";
  }

  // And the documents are the non-empty lines, in order, each with EOD.
  std::vector<std::string> documents;
  for (const std::string& l : lines)
    if (!l.empty()) documents.push_back(l);
  auto ds = IndexedDataset::Open(TempPath("random_w8"));
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ((*ds)->dtype(), IndexedDType::kU16);
  ASSERT_EQ((*ds)->num_documents(), static_cast<int64_t>(documents.size()));
  for (int64_t d = 0; d < (*ds)->num_documents(); ++d) {
    const int64_t n = (*ds)->sequence_length(d);
    std::vector<int32_t> ids(n);
    (*ds)->Read(d, 0, n, ids.data());
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids.back(), (*tokenizer)->eod()) << "document " << d;
    auto text = (*tokenizer)->Decode(ids);
    ASSERT_TRUE(text.ok()) << text.status();
    EXPECT_EQ(*text, documents[d]) << "document " << d;
  }
}

TEST(Prepare, StatsCountDocumentsTokensAndBytes) {
  const std::string input = TempPath("small.txt");
  WriteBytes(input, "hello\n\nworld!\n");
  auto tokenizer = MakeTokenizer("byte");
  ASSERT_TRUE(tokenizer.ok());
  auto stats = PrepareDataset(Options(input, TempPath("small"), 2), **tokenizer);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->documents, 2);
  EXPECT_EQ(stats->tokens, 5 + 1 + 6 + 1);
  EXPECT_EQ(stats->input_bytes, 14);
}

TEST(Prepare, FirstBadJsonLineIsReportedWhateverTheWorkers) {
  std::string text;
  for (int i = 1; i <= 400; ++i) {
    if (i == 123) text += "{\"text\": oops}\n";
    else if (i == 300) text += "{\"other\": \"x\"}\n";
    else text += "{\"text\": \"document number " + std::to_string(i) + "\"}\n";
  }
  const std::string input = TempPath("bad.jsonl");
  WriteBytes(input, text);
  auto tokenizer = MakeTokenizer("byte");
  ASSERT_TRUE(tokenizer.ok());
  for (int workers : {1, 4}) {
    const std::string prefix = TempPath("bad_w" + std::to_string(workers));
    auto stats = PrepareDataset(Options(input, prefix, workers), **tokenizer);
    ASSERT_FALSE(stats.ok());
    EXPECT_EQ(stats.status().message(), input + ":123: bad JSON line (does not parse)") << workers << " workers";
    for (const char* ext : {".bin", ".idx", ".bin.tmp", ".idx.tmp"})
      EXPECT_FALSE(fs::exists(prefix + ext)) << prefix << ext << " left behind";
  }
}

TEST(Prepare, RejectsBadOptions) {
  auto tokenizer = MakeTokenizer("byte");
  ASSERT_TRUE(tokenizer.ok());
  PrepareOptions o = Options(TempPath("small.txt"), TempPath("opts"), 0);
  EXPECT_EQ(PrepareDataset(o, **tokenizer).status().message(), "--workers: 0 is not in 1..256");
  o.workers = 1;
  o.input_format = "csv";
  EXPECT_EQ(PrepareDataset(o, **tokenizer).status().message(), "--input-format: 'csv' is not auto, text or jsonl");
  EXPECT_EQ(MakeTokenizer("bpe").status().message(),
            "--tokenizer: unknown tokenizer 'bpe' (want byte or sentencepiece:MODEL)");
}

}  // namespace
}  // namespace loom
