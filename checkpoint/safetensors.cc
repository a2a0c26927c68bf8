#include "checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

// Header-only (Debian's libxxhash-dev), as in checkpoint.cc.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <system_error>

#include "nlohmann/json.hpp"

namespace loom::checkpoint {
namespace {

// A header larger than this is corruption, not a model (safetensors' own cap).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

std::string ErrnoText(int err) { return std::error_code(err, std::generic_category()).message(); }

absl::Status Corrupt(const std::string& path, std::string_view what) {
  return absl::DataLossError(absl::StrCat(path, ": ", absl::string_view(what.data(), what.size())));
}

// `n` bytes of the file from `offset` into dst; the file must hold them.
absl::Status ReadAt(const SafetensorsFile& f, uint64_t offset, void* dst, uint64_t n) {
  uint64_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(*f.fd, static_cast<char*>(dst) + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0)
      return absl::InternalError(absl::StrCat(f.path, ": read failed at byte ", offset + done, ": ",
                                              r < 0 ? ErrnoText(errno) : "unexpected end of file"));
    done += static_cast<uint64_t>(r);
  }
  return absl::OkStatus();
}

// Validates one header entry: {"dtype": s, "shape": [n...], "data_offsets": [b, e]}.
absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& path, const std::string& name,
                                            const nlohmann::json& j, uint64_t data_bytes) {
  const std::string where = absl::StrCat(path, ": tensor ", name, ": ");
  auto bad = [&](const std::string& what) { return absl::DataLossError(where + what); };
  if (!j.is_object()) return bad("header entry is not an object");
  auto dtype_it = j.find("dtype"), shape_it = j.find("shape"), off_it = j.find("data_offsets");
  if (dtype_it == j.end() || !dtype_it->is_string()) return bad("missing dtype");
  if (shape_it == j.end() || !shape_it->is_array()) return bad("missing shape");
  if (off_it == j.end() || !off_it->is_array() || off_it->size() != 2) return bad("missing data_offsets [begin, end]");
  SafetensorsEntry e;
  absl::StatusOr<DType> dtype = DTypeFromSafetensorsName(dtype_it->get<std::string>());
  if (!dtype.ok()) return bad(std::string(dtype.status().message()));
  e.dtype = *dtype;
  uint64_t bytes = DTypeSize(e.dtype);
  for (const nlohmann::json& d : *shape_it) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0) return bad("shape holds a non-integer or negative size");
    const int64_t n = d.get<int64_t>();
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(n), &bytes)) return bad("shape overflows 64 bits");
    e.shape.push_back(n);
  }
  for (const nlohmann::json& o : *off_it)
    if (!o.is_number_unsigned()) return bad("data_offsets must be non-negative integers");
  e.begin = (*off_it)[0].get<uint64_t>();
  e.end = (*off_it)[1].get<uint64_t>();
  if (e.begin > e.end || e.end > data_bytes)
    return bad(absl::StrCat("data_offsets [", e.begin, ", ", e.end, "] outside the data section of ", data_bytes,
                            " bytes"));
  if (e.end - e.begin != bytes)
    return bad(absl::StrCat("data_offsets span ", e.end - e.begin, " bytes but ", DTypeName(e.dtype), " ",
                            ShapeString(e.shape), " needs ", bytes));
  return e;
}

}  // namespace

const char* SafetensorsDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kF64: return "F64";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
  }
  return "?";
}

absl::StatusOr<DType> DTypeFromSafetensorsName(std::string_view name) {
  for (DType t : {DType::kF32, DType::kF64, DType::kBF16, DType::kF16, DType::kI32, DType::kI64})
    if (name == SafetensorsDTypeName(t)) return t;
  return absl::InvalidArgumentError(absl::StrCat("unsupported dtype '", absl::string_view(name.data(), name.size()), "'"));
}

std::string EncodeSafetensorsHeader(const std::map<std::string, SafetensorsEntry>& entries,
                                    const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  for (const auto& [name, e] : entries)
    header[name] = {{"dtype", SafetensorsDTypeName(e.dtype)}, {"shape", e.shape}, {"data_offsets", {e.begin, e.end}}};
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string json = header.dump();
  // Padding keeps the data section 8-byte aligned for readers that mmap it.
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + json;
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  SafetensorsFile f;
  f.path = path;
  // O_NONBLOCK: opening a FIFO must not wait for a writer (regular files
  // ignore the flag).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    const std::string msg = absl::StrCat(path, ": cannot open: ", ErrnoText(err));
    return err == ENOENT ? absl::NotFoundError(msg) : absl::InternalError(msg);
  }
  f.fd = std::shared_ptr<const int>(new int(fd), [](const int* p) {
    ::close(*p);
    delete p;
  });
  struct stat st;
  if (::fstat(fd, &st) != 0)
    return absl::InternalError(absl::StrCat(path, ": cannot stat: ", ErrnoText(errno)));
  // A directory or a FIFO named by a manifest must fail here, not hang or
  // fail later in read().
  if (!S_ISREG(st.st_mode)) return Corrupt(path, "not a regular file");
  f.size = static_cast<uint64_t>(st.st_size);
  if (f.size < 8) return Corrupt(path, absl::StrCat("file of ", f.size, " bytes is too short for a safetensors header"));
  std::string len(8, '\0');
  LOOM_RETURN_IF_ERROR(ReadAt(f, 0, len.data(), 8));
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(static_cast<unsigned char>(len[i])) << (8 * i);
  if (header_len > kMaxHeaderBytes || header_len > f.size - 8)
    return Corrupt(path, absl::StrCat("header length ", header_len, " exceeds file size ", f.size));
  f.data_start = 8 + header_len;
  const uint64_t data_bytes = f.size - f.data_start;
  std::string text(header_len, '\0');
  LOOM_RETURN_IF_ERROR(ReadAt(f, 8, text.data(), header_len));

  nlohmann::json header = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return Corrupt(path, "header is not a JSON object");
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) return Corrupt(path, "__metadata__ is not an object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) return Corrupt(path, absl::StrCat("__metadata__.", k, " is not a string"));
        f.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    LOOM_ASSIGN_OR_RETURN(f.tensors[name], ParseEntry(path, name, value, data_bytes));
  }
  return f;
}

absl::StatusOr<Tensor> ReadTensor(const SafetensorsFile& f, const SafetensorsEntry& e) {
  Tensor t = Tensor::Empty(e.shape, e.dtype);
  LOOM_RETURN_IF_ERROR(ReadAt(f, f.data_start + e.begin, t.raw(), e.end - e.begin));
  return t;
}

absl::StatusOr<uint64_t> HashTensor(const SafetensorsFile& f, const SafetensorsEntry& e) {
  constexpr uint64_t kPiece = 64u << 20;
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(state.get());
  std::string piece(std::min(kPiece, e.end - e.begin), '\0');
  for (uint64_t at = e.begin; at < e.end; at += kPiece) {
    const uint64_t n = std::min(kPiece, e.end - at);
    LOOM_RETURN_IF_ERROR(ReadAt(f, f.data_start + at, piece.data(), n));
    XXH3_64bits_update(state.get(), piece.data(), n);
  }
  return XXH3_64bits_digest(state.get());
}

}  // namespace loom::checkpoint
