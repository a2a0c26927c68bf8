#include "runtime/tensorboard.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace loom {
namespace {

constexpr uint32_t kCrc32cPolynomial = 0x82F63B78;  // reflected Castagnoli
constexpr uint32_t kMaskDelta = 0xa282ead8;

constexpr std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kCrc32cPolynomial : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrcTable = MakeCrcTable();

// ---- Protobuf wire format: a key is (field << 3) | wire type.
enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

void PutVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void PutKey(std::string& out, uint32_t field, WireType type) { PutVarint(out, (field << 3) | type); }
template <typename T>
void PutLittleEndian(std::string& out, T v) {
  static_assert(std::endian::native == std::endian::little, "TFRecord/protobuf are little endian");
  char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));
  out.append(bytes, sizeof(T));
}
void PutBytes(std::string& out, uint32_t field, const std::string& bytes) {
  PutKey(out, field, kLengthDelimited);
  PutVarint(out, bytes.size());
  out += bytes;
}

// Event field numbers (event.proto / summary.proto).
constexpr uint32_t kEventWallTime = 1, kEventStep = 2, kEventFileVersion = 3, kEventSummary = 5;
constexpr uint32_t kSummaryValue = 1;
constexpr uint32_t kValueTag = 1, kValueSimpleValue = 2;
constexpr char kFileVersion[] = "brain.Event:2";

double WallTime() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

std::string EventHeader(double wall_time, int64_t step) {
  std::string e;
  PutKey(e, kEventWallTime, kFixed64);
  PutLittleEndian<double>(e, wall_time);
  PutKey(e, kEventStep, kVarint);
  PutVarint(e, static_cast<uint64_t>(step));  // int64: negative values take 10 bytes
  return e;
}

// ---- Reading: a cursor over one message's bytes.
struct Cursor {
  const char* p;
  const char* end;
  bool ok = true;
  bool done() const { return p >= end; }
  uint64_t Varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) break;
      const uint8_t b = static_cast<uint8_t>(*p++);
      v |= uint64_t{b & 0x7fu} << shift;
      if (!(b & 0x80)) return v;
    }
    ok = false;
    return 0;
  }
  template <typename T>
  T Fixed() {
    T v{};
    if (end - p < static_cast<ptrdiff_t>(sizeof(T))) {
      ok = false;
      return v;
    }
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    return v;
  }
  std::string Bytes() {
    const uint64_t n = Varint();
    if (!ok || static_cast<uint64_t>(end - p) < n) {
      ok = false;
      return {};
    }
    std::string s(p, n);
    p += n;
    return s;
  }
  void Skip(uint32_t type) {
    switch (type) {
      case kVarint: Varint(); break;
      case kFixed64: Fixed<uint64_t>(); break;
      case kLengthDelimited: Bytes(); break;
      case kFixed32: Fixed<uint32_t>(); break;
      default: ok = false;
    }
  }
};

absl::Status ParseEvent(const std::string& data, const std::string& where, TensorBoardFile& file, bool first) {
  Cursor c{data.data(), data.data() + data.size()};
  double wall_time = 0;
  int64_t step = 0;
  std::vector<std::pair<std::string, float>> values;
  while (c.ok && !c.done()) {
    const uint64_t key = c.Varint();
    const uint32_t field = static_cast<uint32_t>(key >> 3), type = key & 7;
    if (field == kEventWallTime && type == kFixed64) {
      wall_time = c.Fixed<double>();
    } else if (field == kEventStep && type == kVarint) {
      step = static_cast<int64_t>(c.Varint());
    } else if (field == kEventFileVersion && type == kLengthDelimited) {
      const std::string version = c.Bytes();
      if (first) file.file_version = version;
    } else if (field == kEventSummary && type == kLengthDelimited) {
      const std::string summary = c.Bytes();
      Cursor s{summary.data(), summary.data() + summary.size()};
      while (c.ok && s.ok && !s.done()) {
        const uint64_t skey = s.Varint();
        if ((skey >> 3) != kSummaryValue || (skey & 7) != kLengthDelimited) {
          s.Skip(skey & 7);
          continue;
        }
        const std::string value = s.Bytes();
        Cursor v{value.data(), value.data() + value.size()};
        std::string tag;
        float simple = 0;
        bool has_simple = false;
        while (v.ok && !v.done()) {
          const uint64_t vkey = v.Varint();
          if ((vkey >> 3) == kValueTag && (vkey & 7) == kLengthDelimited) {
            tag = v.Bytes();
          } else if ((vkey >> 3) == kValueSimpleValue && (vkey & 7) == kFixed32) {
            simple = v.Fixed<float>();
            has_simple = true;
          } else {
            v.Skip(vkey & 7);
          }
        }
        if (!v.ok) s.ok = false;
        if (has_simple) values.emplace_back(tag, simple);
      }
      if (!s.ok) c.ok = false;
    } else {
      c.Skip(type);
    }
  }
  if (!c.ok) return absl::DataLossError(absl::StrCat(where, ": malformed Event proto"));
  for (auto& [tag, value] : values) file.scalars.push_back({step, std::move(tag), value, wall_time});
  return absl::OkStatus();
}

}  // namespace

uint32_t Crc32c(const void* data, size_t n, uint32_t crc) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = kCrcTable[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t MaskedCrc32c(const void* data, size_t n) {
  const uint32_t crc = Crc32c(data, n);
  return ((crc >> 15) | (crc << 17)) + kMaskDelta;
}

TensorBoardWriter::~TensorBoardWriter() { (void)Close(); }

absl::Status TensorBoardWriter::Open(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("[tensorboard] cannot create ", dir, ": ", ec.message()));
  char host[256] = "localhost";
  if (gethostname(host, sizeof(host) - 1) != 0) std::strcpy(host, "localhost");
  host[sizeof(host) - 1] = 0;
  const std::string stem = absl::StrCat(dir, "/events.out.tfevents.", static_cast<int64_t>(std::time(nullptr)), ".",
                                        host);
  // "x": never append to (or truncate) another writer's file.
  path_ = stem;
  for (int suffix = 1; (file_ = std::fopen(path_.c_str(), "wbx")) == nullptr && errno == EEXIST; ++suffix)
    path_ = absl::StrCat(stem, ".", suffix);
  if (!file_) return absl::InternalError(absl::StrCat("[tensorboard] cannot create ", path_, ": ", std::strerror(errno)));
  std::string event;
  PutKey(event, kEventWallTime, kFixed64);
  PutLittleEndian<double>(event, WallTime());
  PutBytes(event, kEventFileVersion, kFileVersion);
  return WriteRecord(event);
}

absl::Status TensorBoardWriter::WriteRecord(const std::string& data) {
  if (!file_) return absl::FailedPreconditionError("[tensorboard] writer is not open");
  std::string record;
  const uint64_t length = data.size();
  PutLittleEndian<uint64_t>(record, length);
  PutLittleEndian<uint32_t>(record, MaskedCrc32c(record.data(), sizeof(length)));
  record += data;
  PutLittleEndian<uint32_t>(record, MaskedCrc32c(data.data(), data.size()));
  if (std::fwrite(record.data(), 1, record.size(), file_) != record.size() || std::fflush(file_) != 0)
    return absl::InternalError(absl::StrCat("[tensorboard] ", path_, ": write failed: ", std::strerror(errno)));
  return absl::OkStatus();
}

absl::Status TensorBoardWriter::WriteScalars(int64_t step,
                                             const std::vector<std::pair<std::string, double>>& scalars) {
  std::string summary;
  for (const auto& [tag, value] : scalars) {
    std::string v;
    PutBytes(v, kValueTag, tag);
    PutKey(v, kValueSimpleValue, kFixed32);
    PutLittleEndian<float>(v, static_cast<float>(value));
    PutBytes(summary, kSummaryValue, v);
  }
  std::string event = EventHeader(WallTime(), step);
  PutBytes(event, kEventSummary, summary);
  return WriteRecord(event);
}

absl::Status TensorBoardWriter::Close() {
  if (!file_) return absl::OkStatus();
  absl::Status status;
  if (std::fflush(file_) != 0 || fsync(fileno(file_)) != 0)
    status = absl::InternalError(absl::StrCat("[tensorboard] ", path_, ": fsync failed: ", std::strerror(errno)));
  if (std::fclose(file_) != 0 && status.ok())
    status = absl::InternalError(absl::StrCat("[tensorboard] ", path_, ": close failed: ", std::strerror(errno)));
  file_ = nullptr;
  return status;
}

absl::StatusOr<TensorBoardFile> ReadTensorBoardFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("[tensorboard] cannot open ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string bytes = buffer.str();
  TensorBoardFile file;
  size_t at = 0;
  for (int64_t record = 0; at < bytes.size(); ++record) {
    const std::string where = absl::StrCat(path, " record ", record, " at byte ", at);
    if (bytes.size() - at < 12) return absl::DataLossError(absl::StrCat(where, ": truncated header"));
    uint64_t length;
    uint32_t length_crc;
    std::memcpy(&length, bytes.data() + at, 8);
    std::memcpy(&length_crc, bytes.data() + at + 8, 4);
    if (length_crc != MaskedCrc32c(bytes.data() + at, 8))
      return absl::DataLossError(absl::StrCat(where, ": length CRC mismatch"));
    if (bytes.size() - at - 12 < length + 4) return absl::DataLossError(absl::StrCat(where, ": truncated data"));
    const std::string data = bytes.substr(at + 12, length);
    uint32_t data_crc;
    std::memcpy(&data_crc, bytes.data() + at + 12 + length, 4);
    if (data_crc != MaskedCrc32c(data.data(), data.size()))
      return absl::DataLossError(absl::StrCat(where, ": data CRC mismatch"));
    LOOM_RETURN_IF_ERROR(ParseEvent(data, where, file, record == 0));
    at += 12 + length + 4;
  }
  return file;
}

}  // namespace loom
