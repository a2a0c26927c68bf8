// loom-ckpt inspect|verify DIR_OR_STEP_DIR: looks into a checkpoint.
// DIR is a checkpoint directory (resolved through its `latest`) or one
// step_<N>/ directory. `inspect` prints the manifest and a table of tensors
// without reading the data; `verify` loads everything and checks every
// checksum.
// loom-ckpt import-hf --from HF_DIR --to CKPT_DIR: a Hugging Face Llama
// folder as a Loom checkpoint at step 0 (checkpoint/hf.h); export-hf --from
// CKPT --to HF_DIR: back, loadable by transformers.
// Exit 0 on success, 1 on a bad checkpoint or model, 2 on bad usage.
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <string_view>

#include "absl/strings/str_format.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/hf.h"

namespace loom::checkpoint {
namespace {

constexpr char kUsage[] =
    "usage: loom-ckpt inspect|verify DIR_OR_STEP_DIR | import-hf --from HF_DIR --to CKPT_DIR | "
    "export-hf --from CKPT --to HF_DIR";

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "loom-ckpt: %s\n", std::string(s.message()).c_str());
  return 1;
}

int Inspect(const std::string& step_dir) {
  absl::StatusOr<Manifest> manifest = ReadManifest(step_dir);
  if (!manifest.ok()) return Fail(manifest.status());
  const Manifest& m = *manifest;
  std::printf("%s\n", step_dir.c_str());
  std::printf("step %lld  data_tokens %lld  loom %s  world_size %d  config %zu bytes\n",
              static_cast<long long>(m.step()), static_cast<long long>(m.data_tokens()), m.loom_version().c_str(),
              m.world_size(), m.config().size());
  std::map<std::string, uint64_t> rng(m.rng().begin(), m.rng().end());  // sorted for stable output
  for (const auto& [name, value] : rng) std::printf("rng %s = %llu\n", name.c_str(), static_cast<unsigned long long>(value));
  size_t width = 4;
  for (const TensorEntry& e : m.tensors()) width = std::max(width, e.name().size());
  std::printf("%-*s  %-20s  %-5s  %12s\n", static_cast<int>(width), "name", "shape", "dtype", "bytes");
  uint64_t total = 0;
  for (const TensorEntry& e : m.tensors()) {
    const Shape shape(e.shape().begin(), e.shape().end());
    uint64_t bytes = static_cast<uint64_t>(NumElements(shape));
    for (DType t : {DType::kF32, DType::kF64, DType::kBF16, DType::kF16, DType::kI32, DType::kI64})
      if (e.dtype() == DTypeName(t)) bytes *= DTypeSize(t);
    total += bytes;
    std::printf("%-*s  %-20s  %-5s  %12llu\n", static_cast<int>(width), e.name().c_str(),
                ShapeString(shape).c_str(), e.dtype().c_str(), static_cast<unsigned long long>(bytes));
  }
  std::printf("%d tensors, %llu bytes\n", m.tensors_size(), static_cast<unsigned long long>(total));
  return 0;
}

int Verify(const std::string& step_dir) {
  absl::StatusOr<CheckpointState> state = LoadCheckpoint(step_dir);
  if (!state.ok()) return Fail(state.status());
  std::printf("ok: %zu tensors verified (%s)\n", state->tensors.size(), step_dir.c_str());
  return 0;
}

// import-hf / export-hf with --from A --to B (either order, or --from=A).
int Convert(std::string_view command, int argc, char** argv) {
  std::string from, to;
  for (int i = 2; i < argc; ++i) {
    const std::string_view arg = argv[i];
    std::string* into = arg.starts_with("--from") ? &from : arg.starts_with("--to") ? &to : nullptr;
    const size_t flag_len = arg.starts_with("--from") ? 6 : 4;
    if (into == nullptr || (arg.size() > flag_len && arg[flag_len] != '=')) {
      std::fprintf(stderr, "loom-ckpt: unknown argument '%s' (%s)\n", argv[i], kUsage);
      return 2;
    }
    if (arg.size() > flag_len) {
      *into = std::string(arg.substr(flag_len + 1));
    } else if (i + 1 < argc) {
      *into = argv[++i];
    }
  }
  if (from.empty() || to.empty()) {
    std::fprintf(stderr, "loom-ckpt: %s needs --from and --to (%s)\n", std::string(command).c_str(), kUsage);
    return 2;
  }
  if (command == "import-hf") {
    if (absl::Status s = ImportHf(from, to); !s.ok()) return Fail(s);
    std::printf("imported %s into %s/%s\n", from.c_str(), to.c_str(), StepDirName(0).c_str());
  } else {
    if (absl::Status s = ExportHf(from, to); !s.ok()) return Fail(s);
    std::printf("exported %s to %s\n", from.c_str(), to.c_str());
  }
  return 0;
}

int Main(int argc, char** argv) {
  if (argc >= 2 && (std::string_view(argv[1]) == "import-hf" || std::string_view(argv[1]) == "export-hf"))
    return Convert(argv[1], argc, argv);
  if (argc != 3) {
    std::fprintf(stderr, "loom-ckpt: %s\n", kUsage);
    return 2;
  }
  const std::string_view command = argv[1];
  if (command != "inspect" && command != "verify") {
    std::fprintf(stderr, "loom-ckpt: unknown command '%s' (%s)\n", argv[1], kUsage);
    return 2;
  }
  absl::StatusOr<std::string> step_dir = ResolveStepDir(argv[2]);
  if (!step_dir.ok()) return Fail(step_dir.status());
  return command == "inspect" ? Inspect(*step_dir) : Verify(*step_dir);
}

}  // namespace
}  // namespace loom::checkpoint

int main(int argc, char** argv) { return loom::checkpoint::Main(argc, argv); }
