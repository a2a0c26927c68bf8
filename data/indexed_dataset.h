// Megatron-compatible indexed dataset: token ids of many sequences in one
// flat `.bin`, located by an `.idx` (Megatron-LM's MMapIndexedDataset,
// megatron/core/datasets/indexed_dataset.py). All little-endian:
//
//   .idx  offset        field
//         0             magic "MMIDIDX\0\0"           9 bytes
//         9             version = 1                    u64
//         17            dtype code (table below)       u8
//         18            sequence count N               u64
//         26            document-index length D        u64 (documents + 1)
//         34            sequence lengths               int32[N]   (tokens)
//         34 + 4N       sequence pointers              int64[N]   (byte offset in .bin)
//         34 + 12N      document indices               int64[D]   (0, ..., N; into sequences)
//         34 + 12N + 8D end of file (exactly)
//   .bin  the token ids of all sequences back to back, in the dtype.
//
// Dtype codes: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16.
// Document d is sequences [doc[d], doc[d+1]); the writer makes one sequence
// per document, as Megatron's preprocess_data does by default.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "runtime/status.h"

namespace loom {

enum class IndexedDType : uint8_t { kU8 = 1, kI8 = 2, kI16 = 3, kI32 = 4, kI64 = 5, kF64 = 6, kF32 = 7, kU16 = 8 };

// Bytes of one element of a valid code.
int64_t IndexedDTypeSize(IndexedDType dtype);
const char* IndexedDTypeName(IndexedDType dtype);
// Megatron's rule: u16 when every id fits below 65,500, else i32.
IndexedDType IndexedDTypeForVocab(int64_t vocab);

inline constexpr char kIndexedMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
inline constexpr uint64_t kIndexedVersion = 1;
inline constexpr int64_t kIndexedHeaderBytes = 9 + 8 + 1 + 8 + 8;
static_assert(kIndexedHeaderBytes == 34);

// Streams documents into `prefix.bin.tmp` as they arrive (only the 12 bytes
// per sequence of the index stay in memory), then Finish() writes
// `prefix.idx.tmp` and renames both: a crash never leaves a half-written
// file under the final names. Dropped before Finish(), it deletes the temps.
class IndexedDatasetWriter {
 public:
  // `dtype` must be an integer code.
  static absl::StatusOr<std::unique_ptr<IndexedDatasetWriter>> Create(const std::string& prefix,
                                                                      IndexedDType dtype);
  ~IndexedDatasetWriter();
  IndexedDatasetWriter(const IndexedDatasetWriter&) = delete;
  IndexedDatasetWriter& operator=(const IndexedDatasetWriter&) = delete;

  // One document = one sequence. Fails if an id does not fit the dtype.
  absl::Status AddDocument(std::span<const int32_t> tokens);
  absl::Status AddDocument(const std::vector<int32_t>& tokens) { return AddDocument(std::span<const int32_t>(tokens)); }
  absl::Status Finish();

  int64_t num_documents() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t bytes_written() const { return bin_bytes_; }

 private:
  IndexedDatasetWriter(std::string prefix, IndexedDType dtype, std::FILE* bin);
  void RemoveTemporaries();

  std::string prefix_;
  IndexedDType dtype_;
  std::FILE* bin_ = nullptr;
  int64_t bin_bytes_ = 0;
  bool finished_ = false;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> pointers_;
  std::vector<char> buffer_;  // one document in the dtype, reused
};

// A read-only memory map of `prefix.idx` and `prefix.bin`, validated whole
// before Open returns: a hostile file gives an error naming the file, never
// a crash or an out-of-bounds read.
class IndexedDataset {
 public:
  static absl::StatusOr<std::unique_ptr<IndexedDataset>> Open(const std::string& prefix);
  ~IndexedDataset();
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;

  IndexedDType dtype() const { return dtype_; }
  int64_t num_sequences() const { return num_sequences_; }
  int64_t num_documents() const { return doc_len_ - 1; }
  int64_t sequence_length(int64_t seq) const;
  int64_t sequence_pointer(int64_t seq) const;
  // Sequences [first, second) of document `doc`.
  std::pair<int64_t, int64_t> document_range(int64_t doc) const;
  // Tokens [offset, offset + length) of sequence `seq`, converted to int32
  // (i64 and u-types wider than int32 are truncated by the cast). The range
  // must lie in the sequence: checked, an error is a bug in the caller.
  void Read(int64_t seq, int64_t offset, int64_t length, int32_t* out) const;

 private:
  IndexedDataset() = default;
  absl::Status Validate(const std::string& idx_path, const std::string& bin_path);

  struct Mapping {
    const unsigned char* data = nullptr;
    int64_t size = 0;
  };
  static absl::StatusOr<Mapping> Map(const std::string& path);

  Mapping idx_, bin_;
  IndexedDType dtype_ = IndexedDType::kU16;
  int64_t element_bytes_ = 2;
  int64_t num_sequences_ = 0;
  int64_t doc_len_ = 1;
  // Offsets in the .idx of the three arrays (unaligned: read with memcpy).
  int64_t lengths_at_ = 0, pointers_at_ = 0, documents_at_ = 0;
};

}  // namespace loom
