#include "data/indexed_dataset.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "data/byte_tokenizer.h"

namespace loom {
namespace {

std::string TempPrefix(const std::string& name) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "loom_indexed_dataset_test";
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
void Put(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}

const std::vector<std::vector<int32_t>> kDocuments = {{5, 6, 7}, {}, {0, 1000, 65535, 42}, {9}};

// The .idx of kDocuments in u16, laid out field by field from the format
// description (not through the writer).
std::string HandMadeIdx(uint8_t code, int64_t element_bytes) {
  std::string idx("MMIDIDX\0\0", 9);
  Put<uint64_t>(idx, 1);
  Put<uint8_t>(idx, code);
  Put<uint64_t>(idx, kDocuments.size());
  Put<uint64_t>(idx, kDocuments.size() + 1);
  for (const auto& d : kDocuments) Put<int32_t>(idx, static_cast<int32_t>(d.size()));
  int64_t pointer = 0;
  for (const auto& d : kDocuments) {
    Put<int64_t>(idx, pointer);
    pointer += static_cast<int64_t>(d.size()) * element_bytes;
  }
  for (size_t i = 0; i <= kDocuments.size(); ++i) Put<int64_t>(idx, static_cast<int64_t>(i));
  return idx;
}

std::string HandMadeBinU16() {
  std::string bin;
  for (const auto& d : kDocuments) {
    for (int32_t t : d) Put<uint16_t>(bin, static_cast<uint16_t>(t));
  }
  return bin;
}

void WriteWithWriter(const std::string& prefix, IndexedDType dtype,
                     const std::vector<std::vector<int32_t>>& documents) {
  auto writer = IndexedDatasetWriter::Create(prefix, dtype);
  ASSERT_TRUE(writer.ok()) << writer.status();
  for (const auto& d : documents) ASSERT_TRUE((*writer)->AddDocument(d).ok());
  ASSERT_TRUE((*writer)->Finish().ok());
}

void ExpectRoundTrip(const std::string& prefix, IndexedDType dtype, const std::vector<std::vector<int32_t>>& documents) {
  WriteWithWriter(prefix, dtype, documents);
  EXPECT_FALSE(std::filesystem::exists(prefix + ".bin.tmp"));
  EXPECT_FALSE(std::filesystem::exists(prefix + ".idx.tmp"));
  auto ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ((*ds)->dtype(), dtype);
  ASSERT_EQ((*ds)->num_sequences(), static_cast<int64_t>(documents.size()));
  ASSERT_EQ((*ds)->num_documents(), static_cast<int64_t>(documents.size()));
  for (size_t d = 0; d < documents.size(); ++d) {
    const auto [first, last] = (*ds)->document_range(static_cast<int64_t>(d));
    EXPECT_EQ(first, static_cast<int64_t>(d));
    EXPECT_EQ(last, static_cast<int64_t>(d) + 1);
    const int64_t n = (*ds)->sequence_length(first);
    ASSERT_EQ(n, static_cast<int64_t>(documents[d].size())) << "document " << d;
    std::vector<int32_t> got(n);
    (*ds)->Read(first, 0, n, got.data());
    EXPECT_EQ(got, documents[d]) << "document " << d;
  }
}

TEST(IndexedDataset, WriterReaderRoundTripU16) {
  ExpectRoundTrip(TempPrefix("round_u16"), IndexedDType::kU16, kDocuments);
}

TEST(IndexedDataset, WriterReaderRoundTripI32) {
  ExpectRoundTrip(TempPrefix("round_i32"), IndexedDType::kI32,
                  {{-7, 2147483647, 70000}, {1}, {}, {-2147483647 - 1, 3}});
}

TEST(IndexedDataset, ReadsAPartOfASequence) {
  const std::string prefix = TempPrefix("partial");
  WriteWithWriter(prefix, IndexedDType::kU16, kDocuments);
  auto ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  std::vector<int32_t> got(2);
  (*ds)->Read(2, 1, 2, got.data());
  EXPECT_EQ(got, (std::vector<int32_t>{1000, 65535}));
}

TEST(IndexedDataset, VocabPicksU16BelowMegatronThreshold) {
  EXPECT_EQ(IndexedDTypeForVocab(257), IndexedDType::kU16);
  EXPECT_EQ(IndexedDTypeForVocab(65499), IndexedDType::kU16);
  EXPECT_EQ(IndexedDTypeForVocab(65500), IndexedDType::kI32);
}

TEST(IndexedDataset, WriterRejectsIdsOutsideTheDtype) {
  const std::string prefix = TempPrefix("reject");
  {
    auto writer = IndexedDatasetWriter::Create(prefix, IndexedDType::kU16);
    ASSERT_TRUE(writer.ok());
    absl::Status s = (*writer)->AddDocument({1, 65536});
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find("65536 does not fit u16"), std::string::npos) << s.message();
  }
  // Dropped before Finish: no temporaries and no final files are left.
  EXPECT_FALSE(std::filesystem::exists(prefix + ".bin.tmp"));
  EXPECT_FALSE(std::filesystem::exists(prefix + ".bin"));
}

TEST(IndexedDataset, WriterOutputMatchesHandBuiltFormatByteForByte) {
  const std::string prefix = TempPrefix("bytes");
  WriteWithWriter(prefix, IndexedDType::kU16, kDocuments);
  const std::string want_idx = HandMadeIdx(8, 2), want_bin = HandMadeBinU16();
  EXPECT_EQ(want_idx.size(), 34u + 12u * 4u + 8u * 5u);
  EXPECT_TRUE(ReadBytes(prefix + ".idx") == want_idx) << "idx differs from the hand-built layout";
  EXPECT_TRUE(ReadBytes(prefix + ".bin") == want_bin) << "bin differs from the hand-built layout";
}

// A valid hand-built pair, then one corruption; Open must fail naming the
// file and the problem.
void ExpectOpenError(const std::string& name, std::string idx, std::string bin, const std::string& file_ext,
                     const std::string& problem) {
  const std::string prefix = TempPrefix(name);
  WriteBytes(prefix + ".idx", idx);
  WriteBytes(prefix + ".bin", bin);
  auto ds = IndexedDataset::Open(prefix);
  ASSERT_FALSE(ds.ok()) << name << " opened";
  const std::string message(ds.status().message());
  EXPECT_EQ(message.rfind(prefix + file_ext + ": ", 0), 0u) << message;
  EXPECT_NE(message.find(problem), std::string::npos) << message << "\n(wanted: " << problem << ")";
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
}

TEST(IndexedDataset, HandBuiltPairOpens) {
  const std::string prefix = TempPrefix("hand");
  WriteBytes(prefix + ".idx", HandMadeIdx(8, 2));
  WriteBytes(prefix + ".bin", HandMadeBinU16());
  auto ds = IndexedDataset::Open(prefix);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ((*ds)->num_documents(), 4);
}

TEST(IndexedDataset, RejectsTruncatedBin) {
  std::string bin = HandMadeBinU16();
  bin.resize(bin.size() - 2);
  // The last sequence (index 3, one u16 at byte 14) ends at 16 > 14.
  ExpectOpenError("trunc_bin", HandMadeIdx(8, 2), bin, ".bin", "sequence 3 ends at byte 16 past the file size 14");
}

TEST(IndexedDataset, RejectsWrongMagic) {
  std::string idx = HandMadeIdx(8, 2);
  idx[0] = 'X';
  ExpectOpenError("magic", idx, HandMadeBinU16(), ".idx", "bad magic (not a Megatron MMIDIDX index)");
}

TEST(IndexedDataset, RejectsWrongVersion) {
  std::string idx = HandMadeIdx(8, 2);
  idx[9] = 2;
  ExpectOpenError("version", idx, HandMadeBinU16(), ".idx", "version 2 is not supported");
}

TEST(IndexedDataset, RejectsDtypeCodeOutOfRange) {
  ExpectOpenError("dtype9", HandMadeIdx(9, 2), HandMadeBinU16(), ".idx", "dtype code 9 is not one of 1..8");
  ExpectOpenError("dtype0", HandMadeIdx(0, 2), HandMadeBinU16(), ".idx", "dtype code 0 is not one of 1..8");
}

TEST(IndexedDataset, RejectsTruncatedIdx) {
  std::string idx = HandMadeIdx(8, 2);
  ExpectOpenError("trunc_idx", idx.substr(0, idx.size() - 3), HandMadeBinU16(), ".idx", "does not match 4 sequences");
  ExpectOpenError("trunc_header", idx.substr(0, 20), HandMadeBinU16(), ".idx", "shorter than the 34-byte header");
  ExpectOpenError("empty_idx", "", HandMadeBinU16(), ".idx", "truncated: 0 bytes");
}

TEST(IndexedDataset, RejectsHugeCountsWithoutAllocating) {
  std::string idx = HandMadeIdx(8, 2);
  for (int i = 18; i < 26; ++i) idx[i] = '\xff';  // count = 2^64 - 1
  ExpectOpenError("huge_count", idx, HandMadeBinU16(), ".idx", "does not match 18446744073709551615 sequences");
}

TEST(IndexedDataset, RejectsDocumentIndexNotEndingAtCount) {
  std::string idx = HandMadeIdx(8, 2);
  const int64_t three = 3;
  std::memcpy(&idx[idx.size() - 8], &three, 8);
  ExpectOpenError("doc_end", idx, HandMadeBinU16(), ".idx", "document index ends at 3, not at the sequence count 4");
  idx = HandMadeIdx(8, 2);
  const int64_t backwards = 1;
  std::memcpy(&idx[idx.size() - 16], &backwards, 8);  // 0 1 2 1 4
  ExpectOpenError("doc_order", idx, HandMadeBinU16(), ".idx", "document index 3 = 1 is below the previous 2");
}

TEST(IndexedDataset, RejectsPointerPastTheEnd) {
  std::string idx = HandMadeIdx(8, 2);
  const int64_t far = int64_t{1} << 62;  // pointer + length would overflow if added first
  std::memcpy(&idx[34 + 4 * 4 + 8 * 2], &far, 8);
  ExpectOpenError("pointer", idx, HandMadeBinU16(), ".bin", "sequence 2 starts at byte 4611686018427387904 past the file size 16");
  const int64_t negative = -2;
  std::memcpy(&idx[34 + 4 * 4 + 8 * 2], &negative, 8);
  ExpectOpenError("negative", idx, HandMadeBinU16(), ".idx", "sequence 2 has negative byte pointer -2");
}

TEST(IndexedDataset, RejectsMissingFiles) {
  const std::string prefix = TempPrefix("only_idx");
  WriteBytes(prefix + ".idx", HandMadeIdx(8, 2));
  std::filesystem::remove(prefix + ".bin");
  auto ds = IndexedDataset::Open(prefix);
  ASSERT_FALSE(ds.ok());
  EXPECT_NE(ds.status().message().find(prefix + ".bin: cannot open"), std::string::npos) << ds.status();
}

TEST(IndexedDataset, RejectsBinSizeNotAMultipleOfTheDtype) {
  std::string bin = HandMadeBinU16();
  bin.push_back('\0');
  ExpectOpenError("odd_bin", HandMadeIdx(8, 2), bin, ".bin", "size 17 is not a multiple of the 2-byte u16 element");
}

TEST(ByteTokenizer, RoundTripsEveryByte) {
  std::string text;
  for (int b = 0; b < 256; ++b) text.push_back(static_cast<char>(b));
  text += "héllo, wörld";
  std::vector<int32_t> ids = ByteTokenizer::Encode(text);
  ASSERT_EQ(ids.size(), text.size());
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(ids[255], 255);
  ids.push_back(ByteTokenizer::kEod);
  auto decoded = ByteTokenizer::Decode(ids);
  ASSERT_TRUE(decoded.ok());
  EXPECT_TRUE(*decoded == text);
  EXPECT_EQ(ByteTokenizer::kVocab, 257);
  EXPECT_FALSE(ByteTokenizer::Decode({65, 257}).ok());
  EXPECT_FALSE(ByteTokenizer::Decode({-1}).ok());
}

}  // namespace
}  // namespace loom
