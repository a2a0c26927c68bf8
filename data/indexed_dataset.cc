#include "data/indexed_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>

namespace loom {

// The file format is little-endian and both sides copy memory as is.
static_assert(std::endian::native == std::endian::little, "indexed datasets assume a little-endian host");

namespace {

bool IsValidCode(uint8_t code) { return code >= 1 && code <= 8; }
bool IsIntegerCode(IndexedDType dtype) { return dtype != IndexedDType::kF32 && dtype != IndexedDType::kF64; }

// The range of ids a dtype holds (as int64: every int32 token id compares).
std::pair<int64_t, int64_t> IdRange(IndexedDType dtype) {
  switch (dtype) {
    case IndexedDType::kU8: return {0, 255};
    case IndexedDType::kI8: return {-128, 127};
    case IndexedDType::kI16: return {-32768, 32767};
    case IndexedDType::kU16: return {0, 65535};
    default: return {std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()};
  }
}

template <typename T>
T Load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <typename T>
void Store(std::vector<char>& out, const T& v) {
  const char* p = reinterpret_cast<const char*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

// Narrows int32 ids into `out` as the dtype's element type.
template <typename T>
void Narrow(std::span<const int32_t> tokens, std::vector<char>& out) {
  out.resize(tokens.size() * sizeof(T));
  for (size_t i = 0; i < tokens.size(); ++i) {
    const T v = static_cast<T>(tokens[i]);
    std::memcpy(out.data() + i * sizeof(T), &v, sizeof(T));
  }
}

template <typename T>
void Widen(const unsigned char* src, int64_t n, int32_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(Load<T>(src + i * sizeof(T)));
}

std::string ErrnoText() { return std::strerror(errno); }

}  // namespace

int64_t IndexedDTypeSize(IndexedDType dtype) {
  switch (dtype) {
    case IndexedDType::kU8: case IndexedDType::kI8: return 1;
    case IndexedDType::kI16: case IndexedDType::kU16: return 2;
    case IndexedDType::kI32: case IndexedDType::kF32: return 4;
    case IndexedDType::kI64: case IndexedDType::kF64: return 8;
  }
  return 0;
}

const char* IndexedDTypeName(IndexedDType dtype) {
  switch (dtype) {
    case IndexedDType::kU8: return "u8";
    case IndexedDType::kI8: return "i8";
    case IndexedDType::kI16: return "i16";
    case IndexedDType::kI32: return "i32";
    case IndexedDType::kI64: return "i64";
    case IndexedDType::kF64: return "f64";
    case IndexedDType::kF32: return "f32";
    case IndexedDType::kU16: return "u16";
  }
  return "?";
}

IndexedDType IndexedDTypeForVocab(int64_t vocab) {
  return vocab < 65500 ? IndexedDType::kU16 : IndexedDType::kI32;
}

// ---------------------------------------------------------------- writer

IndexedDatasetWriter::IndexedDatasetWriter(std::string prefix, IndexedDType dtype, std::FILE* bin)
    : prefix_(std::move(prefix)), dtype_(dtype), bin_(bin) {}

IndexedDatasetWriter::~IndexedDatasetWriter() {
  if (!finished_) RemoveTemporaries();
}

void IndexedDatasetWriter::RemoveTemporaries() {
  if (bin_ != nullptr) std::fclose(bin_);
  bin_ = nullptr;
  std::remove((prefix_ + ".bin.tmp").c_str());
  std::remove((prefix_ + ".idx.tmp").c_str());
}

absl::StatusOr<std::unique_ptr<IndexedDatasetWriter>> IndexedDatasetWriter::Create(const std::string& prefix,
                                                                                   IndexedDType dtype) {
  if (!IsValidCode(static_cast<uint8_t>(dtype)) || !IsIntegerCode(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("[indexed_dataset] ", prefix, ": dtype code ",
                                                   static_cast<int>(dtype), " is not an integer token dtype"));
  }
  const std::string tmp = prefix + ".bin.tmp";
  std::FILE* bin = std::fopen(tmp.c_str(), "wb");
  if (bin == nullptr) return absl::InvalidArgumentError(absl::StrCat(tmp, ": cannot create (", ErrnoText(), ")"));
  return std::unique_ptr<IndexedDatasetWriter>(new IndexedDatasetWriter(prefix, dtype, bin));
}

absl::Status IndexedDatasetWriter::AddDocument(std::span<const int32_t> tokens) {
  LOOM_CHECK(!finished_, "[indexed_dataset] AddDocument after Finish");
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("[indexed_dataset] document ", lengths_.size(), " has ",
                                                   tokens.size(), " tokens, more than an int32 length holds"));
  }
  const auto [lo, hi] = IdRange(dtype_);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < lo || tokens[i] > hi) {
      return absl::InvalidArgumentError(absl::StrCat("[indexed_dataset] document ", lengths_.size(), " token ", i,
                                                     ": id ", tokens[i], " does not fit ", IndexedDTypeName(dtype_)));
    }
  }
  switch (dtype_) {
    case IndexedDType::kU8: Narrow<uint8_t>(tokens, buffer_); break;
    case IndexedDType::kI8: Narrow<int8_t>(tokens, buffer_); break;
    case IndexedDType::kI16: Narrow<int16_t>(tokens, buffer_); break;
    case IndexedDType::kU16: Narrow<uint16_t>(tokens, buffer_); break;
    case IndexedDType::kI32: Narrow<int32_t>(tokens, buffer_); break;
    case IndexedDType::kI64: Narrow<int64_t>(tokens, buffer_); break;
    default: LOOM_CHECK(false, "[indexed_dataset] float dtype in the writer");
  }
  if (!buffer_.empty() && std::fwrite(buffer_.data(), 1, buffer_.size(), bin_) != buffer_.size()) {
    return absl::InternalError(absl::StrCat(prefix_, ".bin.tmp: write failed (", ErrnoText(), ")"));
  }
  lengths_.push_back(static_cast<int32_t>(tokens.size()));
  pointers_.push_back(bin_bytes_);
  bin_bytes_ += static_cast<int64_t>(buffer_.size());
  return absl::OkStatus();
}

absl::Status IndexedDatasetWriter::Finish() {
  LOOM_CHECK(!finished_, "[indexed_dataset] Finish twice");
  const std::string bin_tmp = prefix_ + ".bin.tmp", idx_tmp = prefix_ + ".idx.tmp";
  const int close_rc = std::fclose(bin_);
  bin_ = nullptr;
  if (close_rc != 0) return absl::InternalError(absl::StrCat(bin_tmp, ": write failed (", ErrnoText(), ")"));

  const uint64_t count = lengths_.size();
  std::vector<char> idx;
  idx.reserve(kIndexedHeaderBytes + 12 * count + 8 * (count + 1));
  idx.insert(idx.end(), kIndexedMagic, kIndexedMagic + sizeof(kIndexedMagic));
  Store(idx, kIndexedVersion);
  Store(idx, static_cast<uint8_t>(dtype_));
  Store(idx, count);
  Store(idx, count + 1);  // one sequence per document: indices 0, 1, ..., count
  for (int32_t n : lengths_) Store(idx, n);
  for (int64_t p : pointers_) Store(idx, p);
  for (uint64_t d = 0; d <= count; ++d) Store(idx, static_cast<int64_t>(d));

  std::FILE* f = std::fopen(idx_tmp.c_str(), "wb");
  if (f == nullptr) return absl::InternalError(absl::StrCat(idx_tmp, ": cannot create (", ErrnoText(), ")"));
  const bool wrote = std::fwrite(idx.data(), 1, idx.size(), f) == idx.size();
  if (std::fclose(f) != 0 || !wrote) {
    return absl::InternalError(absl::StrCat(idx_tmp, ": write failed (", ErrnoText(), ")"));
  }
  // .bin first: a crash between the renames leaves a .bin without an .idx,
  // which Open reports, never an .idx pointing into a missing file.
  for (const char* ext : {".bin", ".idx"}) {
    const std::string from = prefix_ + ext + ".tmp", to = prefix_ + ext;
    if (std::rename(from.c_str(), to.c_str()) != 0) {
      return absl::InternalError(absl::StrCat(to, ": cannot rename from ", from, " (", ErrnoText(), ")"));
    }
  }
  finished_ = true;
  return absl::OkStatus();
}

// ---------------------------------------------------------------- reader

IndexedDataset::~IndexedDataset() {
  for (const Mapping& m : {idx_, bin_}) {
    if (m.data != nullptr) munmap(const_cast<unsigned char*>(m.data), static_cast<size_t>(m.size));
  }
}

absl::StatusOr<IndexedDataset::Mapping> IndexedDataset::Map(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open (", ErrnoText(), ")"));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  Mapping m;
  m.size = static_cast<int64_t>(st.st_size);
  if (m.size > 0) {  // mmap of zero bytes fails; an empty .bin is valid
    void* p = mmap(nullptr, static_cast<size_t>(m.size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const std::string why = ErrnoText();
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": cannot mmap (", why, ")"));
    }
    m.data = static_cast<const unsigned char*>(p);
  }
  ::close(fd);  // the mapping stays valid
  return m;
}

absl::StatusOr<std::unique_ptr<IndexedDataset>> IndexedDataset::Open(const std::string& prefix) {
  const std::string idx_path = prefix + ".idx", bin_path = prefix + ".bin";
  std::unique_ptr<IndexedDataset> ds(new IndexedDataset());
  LOOM_ASSIGN_OR_RETURN(ds->idx_, Map(idx_path));
  LOOM_ASSIGN_OR_RETURN(ds->bin_, Map(bin_path));
  LOOM_RETURN_IF_ERROR(ds->Validate(idx_path, bin_path));
  return ds;
}

// Every check reads only bytes already known to lie inside the mapping, and
// compares sizes by division or subtraction so no product can overflow.
absl::Status IndexedDataset::Validate(const std::string& idx_path, const std::string& bin_path) {
  const unsigned char* idx = idx_.data;
  const int64_t idx_size = idx_.size;
  auto idx_error = [&](const auto&... parts) { return absl::InvalidArgumentError(absl::StrCat(idx_path, ": ", parts...)); };
  auto bin_error = [&](const auto&... parts) { return absl::InvalidArgumentError(absl::StrCat(bin_path, ": ", parts...)); };

  if (idx_size < kIndexedHeaderBytes) {
    return idx_error("truncated: ", idx_size, " bytes, shorter than the ", kIndexedHeaderBytes, "-byte header");
  }
  if (std::memcmp(idx, kIndexedMagic, sizeof(kIndexedMagic)) != 0) {
    return idx_error("bad magic (not a Megatron MMIDIDX index)");
  }
  const uint64_t version = Load<uint64_t>(idx + 9);
  if (version != kIndexedVersion) return idx_error("version ", version, " is not supported (only 1)");
  const uint8_t code = idx[17];
  if (!IsValidCode(code)) return idx_error("dtype code ", static_cast<int>(code), " is not one of 1..8");
  dtype_ = static_cast<IndexedDType>(code);
  if (!IsIntegerCode(dtype_)) {
    return idx_error("dtype ", IndexedDTypeName(dtype_), " holds no token ids (integer dtypes only)");
  }
  element_bytes_ = IndexedDTypeSize(dtype_);
  const uint64_t count = Load<uint64_t>(idx + 18), doc_len = Load<uint64_t>(idx + 26);

  // The arrays must fill the rest of the file exactly: 12 bytes a sequence
  // and 8 a document index.
  const uint64_t body = static_cast<uint64_t>(idx_size - kIndexedHeaderBytes);
  if (count > body / 12 || doc_len > (body - 12 * count) / 8 || body - 12 * count - 8 * doc_len != 0) {
    return idx_error("size ", idx_size, " bytes does not match ", count, " sequences and ", doc_len,
                     " document indices (wants 34 + 12·sequences + 8·indices bytes; truncated or corrupt)");
  }
  if (doc_len < 1) return idx_error("document index is empty (it must start with 0)");
  num_sequences_ = static_cast<int64_t>(count);
  doc_len_ = static_cast<int64_t>(doc_len);
  lengths_at_ = kIndexedHeaderBytes;
  pointers_at_ = lengths_at_ + 4 * num_sequences_;
  documents_at_ = pointers_at_ + 8 * num_sequences_;

  int64_t previous = 0;
  for (int64_t d = 0; d < doc_len_; ++d) {
    const int64_t v = Load<int64_t>(idx + documents_at_ + 8 * d);
    if (d == 0 && v != 0) return idx_error("document index starts at ", v, ", not 0");
    if (v < previous) return idx_error("document index ", d, " = ", v, " is below the previous ", previous);
    if (v > num_sequences_) return idx_error("document index ", d, " = ", v, " is past the sequence count ", num_sequences_);
    previous = v;
  }
  if (previous != num_sequences_) {
    return idx_error("document index ends at ", previous, ", not at the sequence count ", num_sequences_);
  }

  const int64_t bin_size = bin_.size;
  if (bin_size % element_bytes_ != 0) {
    return bin_error("size ", bin_size, " is not a multiple of the ", element_bytes_, "-byte ",
                     IndexedDTypeName(dtype_), " element");
  }
  for (int64_t s = 0; s < num_sequences_; ++s) {
    const int64_t length = sequence_length(s), pointer = sequence_pointer(s);
    if (length < 0) return idx_error("sequence ", s, " has negative length ", length);
    if (pointer < 0) return idx_error("sequence ", s, " has negative byte pointer ", pointer);
    if (pointer % element_bytes_ != 0) {
      return idx_error("sequence ", s, " byte pointer ", pointer, " is not aligned to the ", element_bytes_,
                       "-byte ", IndexedDTypeName(dtype_), " element");
    }
    if (pointer > bin_size) {
      return bin_error("sequence ", s, " starts at byte ", pointer, " past the file size ", bin_size);
    }
    // length < 2^31 and element_bytes_ <= 8: the product fits, and so does
    // the sum once pointer <= bin_size is known.
    const int64_t end = pointer + length * element_bytes_;
    if (end > bin_size) return bin_error("sequence ", s, " ends at byte ", end, " past the file size ", bin_size);
  }
  return absl::OkStatus();
}

int64_t IndexedDataset::sequence_length(int64_t seq) const {
  LOOM_CHECK(seq >= 0 && seq < num_sequences_, "[indexed_dataset] sequence ", seq, " of ", num_sequences_);
  return Load<int32_t>(idx_.data + lengths_at_ + 4 * seq);
}

int64_t IndexedDataset::sequence_pointer(int64_t seq) const {
  LOOM_CHECK(seq >= 0 && seq < num_sequences_, "[indexed_dataset] sequence ", seq, " of ", num_sequences_);
  return Load<int64_t>(idx_.data + pointers_at_ + 8 * seq);
}

std::pair<int64_t, int64_t> IndexedDataset::document_range(int64_t doc) const {
  LOOM_CHECK(doc >= 0 && doc < num_documents(), "[indexed_dataset] document ", doc, " of ", num_documents());
  const unsigned char* d = idx_.data + documents_at_ + 8 * doc;
  return {Load<int64_t>(d), Load<int64_t>(d + 8)};
}

void IndexedDataset::Read(int64_t seq, int64_t offset, int64_t length, int32_t* out) const {
  const int64_t n = sequence_length(seq);
  LOOM_CHECK(offset >= 0 && length >= 0 && offset <= n && length <= n - offset, "[indexed_dataset] tokens [",
             offset, ", ", offset + length, ") of sequence ", seq, " with ", n, " tokens");
  if (length == 0) return;
  const unsigned char* src = bin_.data + sequence_pointer(seq) + offset * element_bytes_;
  switch (dtype_) {
    case IndexedDType::kU8: Widen<uint8_t>(src, length, out); break;
    case IndexedDType::kI8: Widen<int8_t>(src, length, out); break;
    case IndexedDType::kI16: Widen<int16_t>(src, length, out); break;
    case IndexedDType::kU16: Widen<uint16_t>(src, length, out); break;
    case IndexedDType::kI32: Widen<int32_t>(src, length, out); break;
    case IndexedDType::kI64: Widen<int64_t>(src, length, out); break;
    default: LOOM_CHECK(false, "[indexed_dataset] float dtype passed validation");
  }
}

}  // namespace loom
