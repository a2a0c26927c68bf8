#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>

#include "runtime/text_proto.h"
#include "absl/strings/str_format.h"
#include "checkpoint/safetensors.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace loom::checkpoint {
namespace {

namespace fs = std::filesystem;
namespace pb = google::protobuf;

constexpr char kManifestFile[] = "manifest.textproto";
constexpr char kLatestFile[] = "latest";

std::string ErrnoText(int err) { return std::error_code(err, std::generic_category()).message(); }

absl::Status IoError(const std::string& path, const char* what, int err) {
  return absl::InternalError(absl::StrCat(path, ": ", what, ": ", ErrnoText(err)));
}

// Test hook: dies at `stage` when LOOM_FAULT names it and LOOM_FAULT_STEP,
// if set, names the step being saved (see checkpoint.h).
void MaybeFault(const char* stage, int64_t step) {
  const char* fault = std::getenv("LOOM_FAULT");
  if (fault == nullptr || std::string_view(fault) != stage) return;
  const char* at = std::getenv("LOOM_FAULT_STEP");
  if (at != nullptr && std::to_string(step) != at) return;
  std::_Exit(77);
}

// A file written with write(2) so that ENOSPC and EIO surface with errno.
class OutputFile {
 public:
  ~OutputFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  absl::Status Open(const std::string& path) {
    path_ = path;
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    return fd_ < 0 ? IoError(path, "cannot create", errno) : absl::OkStatus();
  }
  absl::Status Write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return IoError(path_, "write failed", w < 0 ? errno : ENOSPC);
      p += w;
      n -= static_cast<size_t>(w);
    }
    return absl::OkStatus();
  }
  absl::Status Sync() { return ::fsync(fd_) != 0 ? IoError(path_, "fsync failed", errno) : absl::OkStatus(); }
  absl::Status Close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc != 0 ? IoError(path_, "close failed", errno) : absl::OkStatus();
  }

 private:
  std::string path_;
  int fd_ = -1;
};

absl::Status SyncPath(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return IoError(path, "cannot open for fsync", errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  return rc != 0 ? IoError(path, "fsync failed", err) : absl::OkStatus();
}

absl::Status WriteSmallFile(const std::string& path, const std::string& text) {
  OutputFile out;
  LOOM_RETURN_IF_ERROR(out.Open(path));
  LOOM_RETURN_IF_ERROR(out.Write(text.data(), text.size()));
  return out.Close();
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

const char* ManifestDType(DType t) { return DTypeName(t); }

absl::StatusOr<DType> DTypeFromManifest(const std::string& name) {
  for (DType t : {DType::kF32, DType::kF64, DType::kBF16, DType::kF16, DType::kI32, DType::kI64})
    if (name == DTypeName(t)) return t;
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", name, "'"));
}

// Step number of a directory named exactly step_<digits>, else -1.
int64_t ParseStepDirName(const std::string& name) {
  constexpr std::string_view kPrefix = "step_";
  if (name.size() <= kPrefix.size() || name.compare(0, kPrefix.size(), kPrefix) != 0) return -1;
  int64_t step = 0;
  for (size_t i = kPrefix.size(); i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || step > (INT64_MAX - 9) / 10) return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

// step_<N> directories under `dir`, newest first.
std::vector<std::pair<int64_t, std::string>> ListStepDirs(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> steps;
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const int64_t step = ParseStepDirName(e.path().filename().string());
    if (step >= 0 && e.is_directory(ec)) steps.emplace_back(step, e.path().filename().string());
  }
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

// "rank_00003.safetensors".
std::string ShardFileName(int rank) { return absl::StrFormat("rank_%05d.safetensors", rank); }

absl::Status CheckTensors(const std::vector<NamedTensor>& tensors) {
  for (const NamedTensor& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__" || t.name.find('#') != std::string::npos)
      return absl::InvalidArgumentError(absl::StrCat("[checkpoint] invalid tensor name '", t.name, "'"));
    if (!t.tensor.defined() || !t.tensor.device().is_cpu())
      return absl::InvalidArgumentError(absl::StrCat("[checkpoint] tensor ", t.name, " is not a defined CPU tensor"));
    if (!t.piece) continue;
    const Piece& p = *t.piece;
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat("[checkpoint] tensor ", t.name, ": ", what));
    };
    if (p.start.size() != p.global.size() || p.length.size() != p.global.size())
      return bad("a piece needs a start and a length per dimension");
    for (size_t d = 0; d < p.global.size(); ++d)
      if (p.start[d] < 0 || p.length[d] < 0 || p.start[d] + p.length[d] > p.global[d])
        return bad(absl::StrCat("slice ", ShapeString(Shape(p.start.begin(), p.start.end())), " + ",
                                ShapeString(p.length), " outside ", ShapeString(p.global)));
    if (p.flat_start < 0 || p.flat_start + t.tensor.numel() > NumElements(p.length))
      return bad(absl::StrCat("elements [", p.flat_start, ", +", t.tensor.numel(), ") outside its slice of ",
                              NumElements(p.length)));
  }
  return absl::OkStatus();
}

// The shape a piece is stored in: its slice, or flat for a part of one.
Shape StoredShape(const TensorEntry& e) {
  return e.has_flat_length() ? Shape{e.flat_length()} : Shape(e.slice_length().begin(), e.slice_length().end());
}

// The manifest entry of a piece, its hash still to be set.
TensorEntry EntryOf(const NamedTensor& t, const std::string& file, const std::string& key) {
  TensorEntry e;
  e.set_name(t.name);
  e.set_dtype(ManifestDType(t.tensor.dtype()));
  e.set_file(file);
  if (key != t.name) e.set_key(key);
  if (!t.piece) {
    for (int64_t d : t.tensor.shape()) {
      e.add_shape(d);
      e.add_slice_start(0);
      e.add_slice_length(d);
    }
    return e;
  }
  const Piece& p = *t.piece;
  for (size_t d = 0; d < p.global.size(); ++d) {
    e.add_shape(p.global[d]);
    e.add_slice_start(p.start[d]);
    e.add_slice_length(p.length[d]);
  }
  if (p.flat_start != 0 || t.tensor.numel() != NumElements(p.length)) {
    e.set_flat_start(p.flat_start);
    e.set_flat_length(t.tensor.numel());
  }
  return e;
}

absl::Status WriteManifest(const std::string& tmp, const CheckpointState& state,
                           const std::vector<TensorEntry>& entries, int world) {
  Manifest manifest;
  manifest.set_loom_version(LOOM_VERSION);
  manifest.set_step(state.step);
  manifest.set_data_tokens(state.data_tokens);
  manifest.set_config(state.config_text);
  manifest.set_world_size(world);
  for (const auto& [k, v] : state.rng) (*manifest.mutable_rng())[k] = v;
  for (const TensorEntry& e : entries) *manifest.add_tensors() = e;
  std::string text;
  if (!pb::TextFormat::PrintToString(manifest, &text))
    return absl::InternalError(absl::StrCat(tmp, "/", kManifestFile, ": cannot print manifest"));
  LOOM_RETURN_IF_ERROR(WriteSmallFile(absl::StrCat(tmp, "/", kManifestFile), text));
  return SyncPath(absl::StrCat(tmp, "/", kManifestFile));
}

// Moves the finished `tmp` to `final`. An existing `final` is swapped out
// atomically (RENAME_EXCHANGE) so `latest` never names a missing directory;
// filesystems without it get rename-aside, which leaves a short window where
// FindLatestGoodCheckpoint falls back to scanning.
absl::Status Publish(const std::string& tmp, const std::string& final_dir) {
  if (::rename(tmp.c_str(), final_dir.c_str()) == 0) return absl::OkStatus();
  if (errno != EEXIST && errno != ENOTEMPTY) return IoError(final_dir, "cannot rename the new checkpoint into place", errno);
  std::error_code ec;
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(tmp, ec);  // now holds the replaced checkpoint
    return absl::OkStatus();
  }
  const std::string aside = absl::StrCat(final_dir, ".old-", ::getpid());
  if (::rename(final_dir.c_str(), aside.c_str()) != 0) return IoError(final_dir, "cannot move aside", errno);
  if (::rename(tmp.c_str(), final_dir.c_str()) != 0) {
    const int err = errno;
    ::rename(aside.c_str(), final_dir.c_str());
    return IoError(final_dir, "cannot rename the new checkpoint into place", err);
  }
  fs::remove_all(aside, ec);
  return absl::OkStatus();
}

// Deletes step directories beyond the newest `keep` (never `current`), and
// unfinished step_*.tmp-* directories left by crashed writers (one writer
// per checkpoint directory is assumed).
void Prune(const std::string& dir, int keep, const std::string& current) {
  std::error_code ec;
  if (keep > 0) {
    int kept = 0;
    for (const auto& [step, name] : ListStepDirs(dir)) {
      if (name == current || kept < keep) {
        ++kept;
        continue;
      }
      fs::remove_all(fs::path(dir) / name, ec);
    }
  }
  const std::string mine = absl::StrCat(".tmp-", ::getpid());
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const size_t tmp_at = name.find(".tmp-");
    if (name.rfind("step_", 0) == 0 && tmp_at != std::string::npos && name.substr(tmp_at) != mine)
      fs::remove_all(e.path(), ec);
  }
}

// What <dir>/latest names, for error messages.
std::string LatestNote(const std::string& dir) {
  const std::string latest = absl::StrCat(dir, "/", kLatestFile);
  absl::StatusOr<std::string> text = ReadSmallFile(latest);
  if (!text.ok()) return absl::StrCat("no earlier checkpoint in ", dir);
  std::string name(*text);
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  return absl::StrCat(latest, " still names ", name);
}

// How far a save got: an error message says what the directory now holds.
enum class SaveStage { kNothing, kPublished, kLatestMoved };

// The written `tmp` made step_<N>/, then `latest`; *stage follows it.
absl::Status PublishStep(const std::string& dir, const std::string& tmp, int64_t step, SaveStage* stage) {
  MaybeFault("before_rename", step);
  const std::string name = StepDirName(step);
  LOOM_RETURN_IF_ERROR(SyncPath(tmp));
  LOOM_RETURN_IF_ERROR(Publish(tmp, absl::StrCat(dir, "/", name)));
  *stage = SaveStage::kPublished;
  LOOM_RETURN_IF_ERROR(SyncPath(dir));
  MaybeFault("before_latest", step);

  const std::string latest = absl::StrCat(dir, "/", kLatestFile);
  const std::string latest_tmp = latest + ".tmp";
  OutputFile out;
  const std::string text = name + "\n";
  absl::Status moved = out.Open(latest_tmp);
  if (moved.ok()) moved = out.Write(text.data(), text.size());
  if (moved.ok()) moved = out.Sync();
  if (moved.ok()) moved = out.Close();
  if (moved.ok() && ::rename(latest_tmp.c_str(), latest.c_str()) != 0) moved = IoError(latest, "cannot replace", errno);
  if (!moved.ok()) {
    ::unlink(latest_tmp.c_str());
    return moved;
  }
  *stage = SaveStage::kLatestMoved;
  return SyncPath(dir);
}

}  // namespace

std::string StepDirName(int64_t step) { return absl::StrFormat("step_%08d", step); }

std::string SaveTempDir(const std::string& dir, int64_t step, int64_t tag) {
  return absl::StrCat(dir, "/", StepDirName(step), ".tmp-", tag);
}

absl::StatusOr<std::string> BeginSave(const std::string& dir, int64_t step, int64_t* tag) {
  auto fail = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat("[checkpoint] step ", step, " not saved: ", s.message(), "; ",
                                               LatestNote(dir)));
  };
  if (step < 0) return absl::InvalidArgumentError(absl::StrCat("[checkpoint] step ", step, " < 0"));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return fail(absl::InternalError(absl::StrCat(dir, ": cannot create checkpoint directory: ", ec.message())));
  *tag = ::getpid();
  const std::string tmp = SaveTempDir(dir, step, *tag);
  fs::remove_all(tmp, ec);
  if (::mkdir(tmp.c_str(), 0755) != 0) return fail(IoError(tmp, "cannot create directory", errno));
  return tmp;
}

absl::StatusOr<std::vector<TensorEntry>> WriteShard(const std::string& tmp, int rank,
                                                    const std::vector<NamedTensor>& tensors, int64_t step) {
  LOOM_RETURN_IF_ERROR(CheckTensors(tensors));
  std::vector<TensorEntry> manifest;
  if (tensors.empty()) return manifest;
  const std::string file = ShardFileName(rank);
  std::map<std::string, SafetensorsEntry> entries;
  std::map<std::string, int> pieces;  // per name, on this rank
  uint64_t offset = 0;
  for (const NamedTensor& t : tensors) {
    const int k = pieces[t.name]++;
    const std::string key = k == 0 ? t.name : absl::StrCat(t.name, "#", k);
    const uint64_t n = t.tensor.nbytes();
    TensorEntry e = EntryOf(t, file, key);
    entries[key] = {t.tensor.dtype(), StoredShape(e), offset, offset + n};
    offset += n;
    e.set_xxh3(XXH3_64bits(t.tensor.raw(), n));
    manifest.push_back(std::move(e));
  }
  const uint64_t total = offset;

  const std::string path = absl::StrCat(tmp, "/", file);
  OutputFile shard;
  LOOM_RETURN_IF_ERROR(shard.Open(path));
  const std::string header = EncodeSafetensorsHeader(entries, {{"format", "pt"}, {"loom_step", absl::StrCat(step)}});
  LOOM_RETURN_IF_ERROR(shard.Write(header.data(), header.size()));
  // Tensors in the given order: their offsets were assigned in that order.
  uint64_t written = 0;
  for (const NamedTensor& t : tensors) {
    const char* p = static_cast<const char*>(t.tensor.raw());
    uint64_t n = t.tensor.nbytes();
    if (written < total / 2 && written + n >= total / 2) {
      const uint64_t first = total / 2 - written;
      LOOM_RETURN_IF_ERROR(shard.Write(p, first));
      MaybeFault("tensor_write", step);
      p += first;
      n -= first;
      written += first;
    }
    LOOM_RETURN_IF_ERROR(shard.Write(p, n));
    written += n;
  }
  if (total == 0) MaybeFault("tensor_write", step);
  MaybeFault("before_fsync", step);
  LOOM_RETURN_IF_ERROR(shard.Sync());
  LOOM_RETURN_IF_ERROR(shard.Close());
  return manifest;
}

absl::Status EndSave(const std::string& dir, const std::string& tmp, const CheckpointState& state,
                     const std::vector<TensorEntry>& entries, int world, int keep, const absl::Status& shards) {
  SaveStage stage = SaveStage::kNothing;
  absl::Status s = shards;
  if (s.ok()) s = WriteManifest(tmp, state, entries, world);
  if (s.ok()) s = PublishStep(dir, tmp, state.step, &stage);
  if (!s.ok()) {
    std::error_code ec;
    if (stage == SaveStage::kNothing) fs::remove_all(tmp, ec);  // a failed save leaves nothing behind
    const std::string head = absl::StrCat("[checkpoint] step ", state.step);
    switch (stage) {
      case SaveStage::kNothing:
        return absl::Status(s.code(), absl::StrCat(head, " not saved: ", s.message(), "; ", LatestNote(dir)));
      case SaveStage::kPublished:
        return absl::Status(s.code(), absl::StrCat(head, " written to ", dir, "/", StepDirName(state.step),
                                                   " but not made latest: ", s.message(), "; ", LatestNote(dir)));
      case SaveStage::kLatestMoved:
        return absl::Status(s.code(), absl::StrCat(head, " saved, but: ", s.message()));
    }
  }
  Prune(dir, keep, StepDirName(state.step));
  return absl::OkStatus();
}

absl::Status SaveCheckpoint(const std::string& dir, const CheckpointState& state, int keep) {
  std::set<std::string> names;
  for (const NamedTensor& t : state.tensors)
    if (!t.piece && !names.insert(t.name).second)
      return absl::InvalidArgumentError(absl::StrCat("[checkpoint] duplicate tensor ", t.name));
  LOOM_RETURN_IF_ERROR(CheckTensors(state.tensors));
  int64_t tag = 0;
  LOOM_ASSIGN_OR_RETURN(const std::string tmp, BeginSave(dir, state.step, &tag));
  absl::StatusOr<std::vector<TensorEntry>> entries = WriteShard(tmp, 0, state.tensors, state.step);
  return EndSave(dir, tmp, state, entries.ok() ? *entries : std::vector<TensorEntry>{}, 1, keep, entries.status());
}

absl::Status PrepareCheckpointDir(const std::string& dir) {
  auto fail = [&](const std::string& what) {
    return absl::FailedPreconditionError(absl::StrCat("checkpoint.dir ", dir, ": ", what));
  };
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return fail(absl::StrCat("cannot create: ", ec.message()));
  if (!fs::is_directory(dir, ec)) return fail("exists and is not a directory");
  const std::string probe = absl::StrCat(dir, "/.write_test-", ::getpid());
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return fail(absl::StrCat("cannot write: ", ErrnoText(errno)));
  ::close(fd);
  ::unlink(probe.c_str());
  return absl::OkStatus();
}

absl::StatusOr<Manifest> ReadManifest(const std::string& step_dir) {
  const std::string path = absl::StrCat(step_dir, "/", kManifestFile);
  LOOM_ASSIGN_OR_RETURN(const std::string text, ReadSmallFile(path));
  Manifest manifest;
  if (absl::Status s = ParseTextProto(text, path, &manifest); !s.ok()) return absl::DataLossError(s.message());
  return manifest;
}

namespace {

// The element count of a shape read from a manifest, or -1 when a
// dimension is negative or the count passes 2^62.
int64_t CheckedElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, d, &n) || n > (int64_t{1} << 62)) return -1;
  return n;
}

// One manifest entry as checked against its file: where its bytes are and
// which elements of the global tensor they are.
struct CheckedPiece {
  const TensorEntry* entry;
  const SafetensorsFile* file;
  SafetensorsEntry bytes;
  std::vector<int64_t> start;
  Shape length;
  int64_t flat_start = 0, flat_length = 0;  // within the slice
  bool read = true;  // false: outside the region a reader wants
};

// Whether two pieces of one tensor share an element: rectangles that meet
// must be the same slice with disjoint flat ranges.
bool Overlap(const CheckedPiece& a, const CheckedPiece& b) {
  bool same = true;
  for (size_t d = 0; d < a.start.size(); ++d) {
    if (a.start[d] + a.length[d] <= b.start[d] || b.start[d] + b.length[d] <= a.start[d]) return false;
    same = same && a.start[d] == b.start[d] && a.length[d] == b.length[d];
  }
  if (!same) return true;
  return a.flat_start < b.flat_start + b.flat_length && b.flat_start < a.flat_start + a.flat_length;
}

// Copies a piece's elements (the flat range of its slice) into the whole
// tensor, a row of the slice's last dimension at a time.
void PlacePiece(const CheckedPiece& p, const char* src, Tensor& whole) {
  const Shape& g = whole.shape();
  const int nd = static_cast<int>(g.size());
  const int64_t elem = DTypeSize(whole.dtype());
  const int64_t row = nd == 0 ? 1 : p.length[nd - 1];
  std::vector<int64_t> stride(nd, 1);  // of the whole tensor
  for (int d = nd - 2; d >= 0; --d) stride[d] = stride[d + 1] * g[d + 1];
  char* dst = static_cast<char*>(whole.raw());
  for (int64_t at = p.flat_start, end = p.flat_start + p.flat_length; at < end;) {
    const int64_t r = at / row, c = at % row, n = std::min(row - c, end - at);
    // The whole tensor's offset of the slice's element (row r, column c).
    int64_t offset = nd > 0 ? p.start[nd - 1] + c : 0;
    for (int64_t d = nd - 2, rest = r; d >= 0; --d) {
      offset += (p.start[d] + rest % p.length[d]) * stride[d];
      rest /= p.length[d];
    }
    std::memcpy(dst + offset * elem, src + (at - p.flat_start) * elem, n * elem);
    at += n;
  }
}

// Checks every piece of the manifest against its shard (name, dtype,
// shape, bounds, XXH3) and that each tensor's pieces cover it once. With
// `keep`, each piece is read once and the whole tensors are kept in
// `state.tensors` (a single whole piece is read straight into it); without,
// pieces are hashed in parts and dropped, so verifying holds no tensor.
absl::StatusOr<CheckpointState> ReadCheckpoint(const std::string& step_dir, bool keep,
                                               const std::function<Interest(const std::string&)>& want) {
  LOOM_ASSIGN_OR_RETURN(const Manifest manifest, ReadManifest(step_dir));
  CheckpointState state;
  state.step = manifest.step();
  state.data_tokens = manifest.data_tokens();
  state.config_text = manifest.config();
  for (const auto& [k, v] : manifest.rng()) state.rng[k] = v;

  std::map<std::string, SafetensorsFile> shards;  // by file name, headers read once each
  std::vector<std::string> order;                 // tensor names, first seen first
  std::map<std::string, std::vector<CheckedPiece>> pieces;
  std::map<std::string, Interest> interest;  // by name, asked once each
  for (const TensorEntry& e : manifest.tensors()) {
    auto asked = interest.find(e.name());
    if (asked == interest.end()) asked = interest.emplace(e.name(), want ? want(e.name()) : Interest{}).first;
    if (!asked->second.read) continue;
    if (e.file().empty() || e.file().find('/') != std::string::npos)
      return absl::DataLossError(absl::StrCat(step_dir, "/", kManifestFile, ": tensor ", e.name(), ": bad file '",
                                              e.file(), "'"));
    const std::string path = absl::StrCat(step_dir, "/", e.file());
    auto it = shards.find(e.file());
    if (it == shards.end()) {
      LOOM_ASSIGN_OR_RETURN(SafetensorsFile f, ReadSafetensors(path));
      it = shards.emplace(e.file(), std::move(f)).first;
    }
    const SafetensorsFile& shard = it->second;
    auto bad = [&](const std::string& what) {
      return absl::DataLossError(absl::StrCat(path, ": tensor ", e.name(), ": ", what));
    };
    const std::string& key = e.has_key() ? e.key() : e.name();
    auto found = shard.tensors.find(key);
    if (found == shard.tensors.end()) return bad(e.has_key() ? absl::StrCat(key, " missing from the file")
                                                             : std::string("missing from the file"));
    CheckedPiece p{&e, &shard, found->second, {}, {}, 0, 0, true};
    const Shape shape(e.shape().begin(), e.shape().end());
    const size_t nd = shape.size();
    if (static_cast<size_t>(e.slice_start_size()) != nd || static_cast<size_t>(e.slice_length_size()) != nd)
      return bad("the slice does not match the shape's dimensions");
    p.start.assign(e.slice_start().begin(), e.slice_start().end());
    p.length.assign(e.slice_length().begin(), e.slice_length().end());
    if (CheckedElements(shape) < 0) return bad(absl::StrCat("bad shape ", ShapeString(shape)));
    for (size_t d = 0; d < nd; ++d)
      if (shape[d] < 0 || p.start[d] < 0 || p.length[d] < 0 || p.start[d] > shape[d] - p.length[d])
        return bad(absl::StrCat("slice dimension ", d, " [", p.start[d], ", +", p.length[d],
                                ") outside its shape ", ShapeString(shape)));
    const int64_t slice = NumElements(p.length);
    p.flat_start = e.has_flat_length() ? e.flat_start() : 0;
    p.flat_length = e.has_flat_length() ? e.flat_length() : slice;
    if (p.flat_start < 0 || p.flat_length < 0 || p.flat_start > slice - p.flat_length)
      return bad(absl::StrCat("flat range [", p.flat_start, ", +", p.flat_length, ") outside its slice of ", slice,
                              " elements"));
    const Shape stored = StoredShape(e);
    absl::StatusOr<DType> dtype = DTypeFromManifest(e.dtype());
    if (!dtype.ok()) return bad(std::string(dtype.status().message()));
    if (*dtype != p.bytes.dtype || stored != p.bytes.shape)
      return bad(absl::StrCat("manifest says ", e.dtype(), " ", ShapeString(stored), ", file holds ",
                              DTypeName(p.bytes.dtype), " ", ShapeString(p.bytes.shape)));
    std::vector<CheckedPiece>& of = pieces[e.name()];
    if (of.empty()) {
      order.push_back(e.name());
    } else if (of[0].entry->dtype() != e.dtype() || !std::equal(e.shape().begin(), e.shape().end(),
                                                                of[0].entry->shape().begin(), of[0].entry->shape().end())) {
      return bad(absl::StrCat("pieces disagree on the tensor (", of[0].entry->dtype(), " ",
                              ShapeString(Shape(of[0].entry->shape().begin(), of[0].entry->shape().end())),
                              " in ", of[0].entry->file(), ")"));
    }
    for (const CheckedPiece& q : of)
      if (Overlap(p, q)) return bad(absl::StrCat("pieces in ", q.entry->file(), " and ", e.file(), " overlap"));
    // Only the pieces that meet a region are read (a region of other
    // dimensions reads all: the reader then finds the shapes differ).
    if (const Interest& in = asked->second; in.start.size() == nd && in.length.size() == nd) {
      for (size_t d = 0; d < nd; ++d)
        p.read = p.read && p.start[d] < in.start[d] + in.length[d] && in.start[d] < p.start[d] + p.length[d];
    }
    of.push_back(p);
  }

  for (const std::string& name : order) {
    const std::vector<CheckedPiece>& of = pieces[name];
    const TensorEntry& first = *of[0].entry;
    const Shape shape(first.shape().begin(), first.shape().end());
    int64_t covered = 0;
    for (const CheckedPiece& p : of) covered += p.flat_length;
    if (covered != NumElements(shape))
      return absl::DataLossError(absl::StrCat(step_dir, "/", kManifestFile, ": tensor ", name, ": its pieces hold ",
                                              covered, " of its ", NumElements(shape), " elements"));
    Tensor whole;
    const bool one = of.size() == 1 && of[0].read;  // then the piece is the tensor: read straight into it
    if (keep && !one) whole = Tensor::Empty(shape, of[0].bytes.dtype);
    for (const CheckedPiece& p : of) {
      if (!p.read) continue;
      uint64_t hash = 0;
      Tensor t;
      if (keep) {
        LOOM_ASSIGN_OR_RETURN(t, ReadTensor(*p.file, p.bytes));
        hash = XXH3_64bits(t.raw(), t.nbytes());
      } else {
        LOOM_ASSIGN_OR_RETURN(hash, HashTensor(*p.file, p.bytes));
      }
      if (hash != p.entry->xxh3())
        return absl::DataLossError(absl::StrFormat("%s: tensor %s: checksum mismatch (manifest %016x, data %016x)",
                                                   p.file->path, name, p.entry->xxh3(), hash));
      if (!keep) continue;
      if (one) {
        whole = t.Reshape(shape);
      } else {
        PlacePiece(p, static_cast<const char*>(t.raw()), whole);
      }
    }
    if (keep) state.tensors.push_back({name, std::move(whole)});
  }
  return state;
}

}  // namespace

absl::StatusOr<CheckpointState> LoadCheckpoint(const std::string& step_dir,
                                               const std::function<Interest(const std::string&)>& want) {
  return ReadCheckpoint(step_dir, /*keep=*/true, want);
}

absl::Status VerifyCheckpoint(const std::string& step_dir) {
  return ReadCheckpoint(step_dir, /*keep=*/false, nullptr).status();
}

absl::StatusOr<std::string> ResolveStepDir(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return absl::NotFoundError(absl::StrCat(path, ": no such checkpoint directory"));
  if (fs::exists(fs::path(path) / kManifestFile, ec)) return path;
  const std::string latest = absl::StrCat(path, "/", kLatestFile);
  absl::StatusOr<std::string> text = ReadSmallFile(latest);
  if (!text.ok())
    return absl::NotFoundError(absl::StrCat(path, ": not a checkpoint (no ", kManifestFile, " or ", kLatestFile, ")"));
  std::string name(*text);
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  if (ParseStepDirName(name) < 0)
    return absl::DataLossError(absl::StrCat(latest, ": '", name, "' is not a step directory name"));
  return absl::StrCat(path, "/", name);
}

absl::StatusOr<std::string> FindLatestGoodCheckpoint(const std::string& dir, std::vector<std::string>* skipped) {
  int refused = 0;
  auto skip = [&](const std::string& step_dir, const absl::Status& s) {
    ++refused;
    if (skipped != nullptr) {
      const std::string msg(s.message());
      // Messages from the loader already start with a path inside step_dir.
      skipped->push_back(msg.rfind(step_dir, 0) == 0 ? msg : absl::StrCat(step_dir, ": ", msg));
    }
  };
  std::string tried;
  if (absl::StatusOr<std::string> latest = ResolveStepDir(dir);
      latest.ok() && *latest != dir && fs::is_directory(*latest)) {
    if (absl::Status s = VerifyCheckpoint(*latest); s.ok()) return *latest;
    else skip(*latest, s);
    tried = *latest;
  }
  for (const auto& [step, name] : ListStepDirs(dir)) {
    const std::string step_dir = absl::StrCat(dir, "/", name);
    if (step_dir == tried) continue;
    if (absl::Status s = VerifyCheckpoint(step_dir); s.ok()) return step_dir;
    else skip(step_dir, s);
  }
  if (refused > 0)
    return absl::DataLossError(absl::StrCat(dir, ": none of its ", refused, " checkpoints verifies"));
  return absl::NotFoundError(absl::StrCat(dir, ": no checkpoint"));
}

}  // namespace loom::checkpoint
