#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
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

constexpr char kShardFile[] = "rank_00000.safetensors";
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

absl::Status CheckState(const CheckpointState& state) {
  if (state.step < 0) return absl::InvalidArgumentError(absl::StrCat("[checkpoint] step ", state.step, " < 0"));
  std::set<std::string> names;
  for (const NamedTensor& t : state.tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      return absl::InvalidArgumentError(absl::StrCat("[checkpoint] invalid tensor name '", t.name, "'"));
    if (!names.insert(t.name).second)
      return absl::InvalidArgumentError(absl::StrCat("[checkpoint] duplicate tensor ", t.name));
    if (!t.tensor.defined() || !t.tensor.device().is_cpu())
      return absl::InvalidArgumentError(absl::StrCat("[checkpoint] tensor ", t.name, " is not a defined CPU tensor"));
  }
  return absl::OkStatus();
}

// Writes the shard and the manifest into `tmp` (not yet synced).
absl::Status WriteStepFiles(const std::string& tmp, const CheckpointState& state) {
  std::map<std::string, SafetensorsEntry> entries;
  Manifest manifest;
  manifest.set_loom_version(LOOM_VERSION);
  manifest.set_step(state.step);
  manifest.set_data_tokens(state.data_tokens);
  manifest.set_config(state.config_text);
  manifest.set_world_size(1);
  for (const auto& [k, v] : state.rng) (*manifest.mutable_rng())[k] = v;
  uint64_t offset = 0;
  for (const NamedTensor& t : state.tensors) {
    const uint64_t n = t.tensor.nbytes();
    entries[t.name] = {t.tensor.dtype(), t.tensor.shape(), offset, offset + n};
    offset += n;
    TensorEntry* e = manifest.add_tensors();
    e->set_name(t.name);
    e->set_dtype(ManifestDType(t.tensor.dtype()));
    e->set_file(kShardFile);
    for (int64_t d : t.tensor.shape()) {
      e->add_shape(d);
      e->add_slice_start(0);
      e->add_slice_length(d);
    }
    e->set_xxh3(XXH3_64bits(t.tensor.raw(), n));
  }
  const uint64_t total = offset;

  const std::string shard_path = absl::StrCat(tmp, "/", kShardFile);
  OutputFile shard;
  LOOM_RETURN_IF_ERROR(shard.Open(shard_path));
  const std::string header =
      EncodeSafetensorsHeader(entries, {{"format", "pt"}, {"loom_step", absl::StrCat(state.step)}});
  LOOM_RETURN_IF_ERROR(shard.Write(header.data(), header.size()));
  // Tensors in state order: their offsets were assigned in that order.
  uint64_t written = 0;
  for (const NamedTensor& t : state.tensors) {
    const char* p = static_cast<const char*>(t.tensor.raw());
    uint64_t n = t.tensor.nbytes();
    if (written < total / 2 && written + n >= total / 2) {
      const uint64_t first = total / 2 - written;
      LOOM_RETURN_IF_ERROR(shard.Write(p, first));
      MaybeFault("tensor_write", state.step);
      p += first;
      n -= first;
      written += first;
    }
    LOOM_RETURN_IF_ERROR(shard.Write(p, n));
    written += n;
  }
  if (total == 0) MaybeFault("tensor_write", state.step);
  LOOM_RETURN_IF_ERROR(shard.Close());

  std::string text;
  if (!pb::TextFormat::PrintToString(manifest, &text))
    return absl::InternalError(absl::StrCat(tmp, "/", kManifestFile, ": cannot print manifest"));
  return WriteSmallFile(absl::StrCat(tmp, "/", kManifestFile), text);
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

// The save up to and including the move of `latest`; *stage follows it.
absl::Status SaveStep(const std::string& dir, const CheckpointState& state, SaveStage* stage) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create checkpoint directory: ", ec.message()));

  const std::string name = StepDirName(state.step);
  const std::string final_dir = absl::StrCat(dir, "/", name);
  const std::string tmp = absl::StrCat(final_dir, ".tmp-", ::getpid());
  fs::remove_all(tmp, ec);
  if (::mkdir(tmp.c_str(), 0755) != 0) return IoError(tmp, "cannot create directory", errno);

  absl::Status written = WriteStepFiles(tmp, state);
  if (written.ok()) {
    MaybeFault("before_fsync", state.step);
    written = SyncPath(absl::StrCat(tmp, "/", kShardFile));
  }
  if (written.ok()) written = SyncPath(absl::StrCat(tmp, "/", kManifestFile));
  if (written.ok()) written = SyncPath(tmp);
  if (written.ok()) {
    MaybeFault("before_rename", state.step);
    written = Publish(tmp, final_dir);
  }
  if (!written.ok()) {
    fs::remove_all(tmp, ec);  // a failed save leaves nothing behind
    return written;
  }
  *stage = SaveStage::kPublished;
  LOOM_RETURN_IF_ERROR(SyncPath(dir));
  MaybeFault("before_latest", state.step);

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

absl::Status SaveCheckpoint(const std::string& dir, const CheckpointState& state, int keep) {
  LOOM_RETURN_IF_ERROR(CheckState(state));
  SaveStage stage = SaveStage::kNothing;
  if (absl::Status s = SaveStep(dir, state, &stage); !s.ok()) {
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

// Checks every tensor of the manifest against its shard (name, dtype, shape,
// a whole slice, XXH3). With `keep`, each is read once into `state.tensors`
// and hashed there; without, hashed in pieces and dropped, so verifying
// holds no tensor.
absl::StatusOr<CheckpointState> ReadCheckpoint(const std::string& step_dir, bool keep) {
  LOOM_ASSIGN_OR_RETURN(const Manifest manifest, ReadManifest(step_dir));
  CheckpointState state;
  state.step = manifest.step();
  state.data_tokens = manifest.data_tokens();
  state.config_text = manifest.config();
  for (const auto& [k, v] : manifest.rng()) state.rng[k] = v;

  std::map<std::string, SafetensorsFile> shards;  // by file name, headers read once each
  for (const TensorEntry& e : manifest.tensors()) {
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
    auto found = shard.tensors.find(e.name());
    if (found == shard.tensors.end()) return bad("missing from the file");
    const SafetensorsEntry& st = found->second;
    const Shape shape(e.shape().begin(), e.shape().end());
    absl::StatusOr<DType> dtype = DTypeFromManifest(e.dtype());
    if (!dtype.ok()) return bad(std::string(dtype.status().message()));
    if (*dtype != st.dtype || shape != st.shape)
      return bad(absl::StrCat("manifest says ", e.dtype(), " ", ShapeString(shape), ", file holds ",
                              DTypeName(st.dtype), " ", ShapeString(st.shape)));
    const bool whole = e.slice_start_size() == e.shape_size() && e.slice_length_size() == e.shape_size() &&
                       std::equal(e.slice_length().begin(), e.slice_length().end(), e.shape().begin()) &&
                       std::all_of(e.slice_start().begin(), e.slice_start().end(), [](int64_t s) { return s == 0; });
    if (!whole) return absl::UnimplementedError(absl::StrCat(path, ": tensor ", e.name(), ": partial slices (",
                                                             manifest.world_size(), " ranks) cannot be loaded yet"));
    Tensor t;
    uint64_t hash = 0;
    if (keep) {
      LOOM_ASSIGN_OR_RETURN(t, ReadTensor(shard, st));
      hash = XXH3_64bits(t.raw(), t.nbytes());
    } else {
      LOOM_ASSIGN_OR_RETURN(hash, HashTensor(shard, st));
    }
    if (hash != e.xxh3())
      return bad(absl::StrFormat("checksum mismatch (manifest %016x, data %016x)", e.xxh3(), hash));
    if (keep) state.tensors.push_back({e.name(), std::move(t)});
  }
  return state;
}

}  // namespace

absl::StatusOr<CheckpointState> LoadCheckpoint(const std::string& step_dir) {
  return ReadCheckpoint(step_dir, /*keep=*/true);
}

absl::Status VerifyCheckpoint(const std::string& step_dir) {
  return ReadCheckpoint(step_dir, /*keep=*/false).status();
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
  auto skip = [&](const std::string& step_dir, const absl::Status& s) {
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
  return absl::NotFoundError(absl::StrCat(dir, ": no checkpoint that verifies"));
}

}  // namespace loom::checkpoint
