#include "data/sentencepiece_tokenizer.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "absl/strings/str_join.h"
#include "data/sentencepiece/loom_sentencepiece.h"

namespace loom {

struct SentencePieceTokenizer::Api {
  decltype(&loom_sentencepiece_abi) abi;
  decltype(&loom_sentencepiece_load) load;
  decltype(&loom_sentencepiece_free) free;
  decltype(&loom_sentencepiece_vocab_size) vocab_size;
  decltype(&loom_sentencepiece_eos_id) eos_id;
  decltype(&loom_sentencepiece_encode) encode;
  decltype(&loom_sentencepiece_decode) decode;
};

namespace {

constexpr char kLibraryName[] = "libloom_sentencepiece.so";
constexpr size_t kErrorBytes = 512;

std::string ExecutableDir() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  std::string path(buf, static_cast<size_t>(n));
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

// Opens the wrapper once per process and keeps it: unloading a library with
// C++ static state (libsentencepiece's flags and protobuf registries) is not
// safe, and one copy serves every model.
absl::StatusOr<const SentencePieceTokenizer::Api*> LoadApi() {
  static std::mutex mu;
  static SentencePieceTokenizer::Api api;
  static bool loaded = false;
  std::lock_guard<std::mutex> lock(mu);
  if (loaded) return &api;

  std::vector<std::string> failures;
  void* handle = nullptr;
  std::string opened;
  for (const std::string& path : SentencePieceLibraryCandidates()) {
    // DEEPBIND: the wrapper and libsentencepiece bind to their own Abseil and
    // protobuf copies first; LOCAL: those never become visible to Loom.
    handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (handle != nullptr) {
      opened = path;
      break;
    }
    const char* why = ::dlerror();
    failures.push_back(why != nullptr ? why : path);
  }
  if (handle == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "[sentencepiece] cannot load ", kLibraryName,
        " (built only where libsentencepiece-dev is installed: run launch/install_deps.sh and rebuild): ",
        absl::StrJoin(failures, "; ")));
  }
  auto symbol = [&](const char* name, auto* into) -> bool {
    *into = reinterpret_cast<std::remove_pointer_t<decltype(into)>>(::dlsym(handle, name));
    if (*into == nullptr) failures.push_back(name);
    return *into != nullptr;
  };
  failures.clear();
  symbol("loom_sentencepiece_abi", &api.abi);
  symbol("loom_sentencepiece_load", &api.load);
  symbol("loom_sentencepiece_free", &api.free);
  symbol("loom_sentencepiece_vocab_size", &api.vocab_size);
  symbol("loom_sentencepiece_eos_id", &api.eos_id);
  symbol("loom_sentencepiece_encode", &api.encode);
  symbol("loom_sentencepiece_decode", &api.decode);
  if (!failures.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("[sentencepiece] ", opened, ": missing symbols ", absl::StrJoin(failures, ", ")));
  }
  if (api.abi() != LOOM_SENTENCEPIECE_ABI) {
    return absl::FailedPreconditionError(absl::StrCat("[sentencepiece] ", opened, ": interface version ", api.abi(),
                                                      ", this program wants ", LOOM_SENTENCEPIECE_ABI,
                                                      " (a stale build: rebuild it)"));
  }
  loaded = true;
  return &api;
}

}  // namespace

std::vector<std::string> SentencePieceLibraryCandidates() {
  std::vector<std::string> paths;
  if (const char* env = std::getenv("LOOM_SENTENCEPIECE_LIBRARY"); env != nullptr && *env != '\0') {
    paths.push_back(env);
  }
  if (const std::string dir = ExecutableDir(); !dir.empty()) paths.push_back(absl::StrCat(dir, "/../lib/", kLibraryName));
  paths.push_back(kLibraryName);
  return paths;
}

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Load(const std::string& model_path) {
  // The model file first: its errors matter more than the library's.
  const int fd = ::open(model_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(
        absl::StrCat(model_path, ": cannot open SentencePiece model (", std::strerror(errno), ")"));
  }
  ::close(fd);
  LOOM_ASSIGN_OR_RETURN(const Api* api, LoadApi());
  char error[kErrorBytes] = "";
  LoomSentencePiece* model = api->load(model_path.c_str(), error, sizeof(error));
  if (model == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(model_path, ": not a valid SentencePiece model (", error, ")"));
  }
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  t->api_ = api;
  t->model_ = model;
  t->path_ = model_path;
  t->vocab_size_ = api->vocab_size(model);
  t->eos_id_ = api->eos_id(model);
  if (t->vocab_size_ <= 0) return absl::InvalidArgumentError(absl::StrCat(model_path, ": the model has no pieces"));
  if (t->eos_id_ < 0 || t->eos_id_ >= t->vocab_size_) {
    return absl::InvalidArgumentError(absl::StrCat(model_path, ": the model has no end-of-document piece </s> (eos_id ",
                                                   t->eos_id_, "); train it with --eos_id set"));
  }
  return t;
}

SentencePieceTokenizer::~SentencePieceTokenizer() {
  if (model_ != nullptr) api_->free(model_);
}

absl::Status SentencePieceTokenizer::EncodeInto(std::string_view text, std::vector<int32_t>* out) const {
  const size_t start = out->size();
  // Normalisation can lengthen the text, so the first guess may be short:
  // then the wrapper reports the count and a second call fills it.
  int64_t capacity = static_cast<int64_t>(text.size()) + 16;
  for (int attempt = 0; attempt < 2; ++attempt) {
    out->resize(start + static_cast<size_t>(capacity));
    char error[kErrorBytes] = "";
    const int64_t n = api_->encode(model_, text.data(), text.size(), out->data() + start, capacity, error, sizeof(error));
    if (n < 0) {
      out->resize(start);
      return absl::InvalidArgumentError(absl::StrCat("[sentencepiece] ", path_, ": cannot encode: ", error));
    }
    if (n <= capacity) {
      out->resize(start + static_cast<size_t>(n));
      return absl::OkStatus();
    }
    capacity = n;
  }
  out->resize(start);
  return absl::InternalError(absl::StrCat("[sentencepiece] ", path_, ": encoding changed length between two calls"));
}

absl::StatusOr<std::string> SentencePieceTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::vector<int32_t> pieces;
  pieces.reserve(ids.size());
  for (int32_t id : ids)
    if (id != eos_id_) pieces.push_back(id);
  std::string text;
  int64_t capacity = static_cast<int64_t>(pieces.size()) * 8 + 16;
  for (int attempt = 0; attempt < 2; ++attempt) {
    text.resize(static_cast<size_t>(capacity));
    char error[kErrorBytes] = "";
    const int64_t n = api_->decode(model_, pieces.data(), pieces.size(), text.data(), capacity, error, sizeof(error));
    if (n < 0) return absl::InvalidArgumentError(absl::StrCat("[sentencepiece] ", path_, ": cannot decode: ", error));
    if (n <= capacity) {
      text.resize(static_cast<size_t>(n));
      return text;
    }
    capacity = n;
  }
  return absl::InternalError(absl::StrCat("[sentencepiece] ", path_, ": decoding changed length between two calls"));
}

std::string SentencePieceTokenizer::description() const {
  return absl::StrCat("sentencepiece:", path_, " (", vocab_size_, " pieces)");
}

}  // namespace loom
