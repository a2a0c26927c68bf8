// loom-bench --what=NAME [--config FILE] [--set k=v ...] [--steps N] [--json]
// Runs one registered measurement (bench/<what>.cc); each prints its result
// beside a baseline measured in the same run. --what=list names them all.
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench.h"
#include "runtime/tool_flags.h"

ABSL_FLAG(std::string, what, "step", "what to measure (--what=list names them)");
ABSL_FLAG(int, steps, 5, "timed repetitions (after one warm-up)");
ABSL_FLAG(bool, json, false, "print one JSON line per result instead of a table");

namespace loom::bench {

std::optional<std::vector<int64_t>> ParseSizes(const char* flag, const std::string& list) {
  std::vector<int64_t> sizes;
  for (absl::string_view s : absl::StrSplit(list, ',')) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(s, &n) || n <= 0) {
      std::fprintf(stderr, "loom-bench: --%s: \"%s\" is not a positive integer\n", flag, std::string(s).c_str());
      return std::nullopt;
    }
    sizes.push_back(n);
  }
  return sizes;
}

}  // namespace loom::bench

int main(int argc, char** argv) {
  auto args = loom::ExtractConfigArgs(argc, argv);
  if (!args.ok()) {
    std::fprintf(stderr, "loom-bench: %s\n", std::string(args.status().message()).c_str());
    return 2;
  }
  loom::ParseToolFlags(argc, argv, "loom-bench --what=NAME [--steps N] [flags of that bench: --help lists them]");
  const auto& registry = loom::bench::Registry();
  const std::string what = absl::GetFlag(FLAGS_what);
  auto it = registry.find(what);
  if (it == registry.end()) {
    std::string names;
    for (const auto& [name, bench] : registry) names += (names.empty() ? "" : ", ") + name;
    if (what == "list") {
      for (const auto& [name, bench] : registry) std::printf("%-12s %s\n", name.c_str(), bench.summary.c_str());
      return 0;
    }
    const std::string gpu_only = LOOM_BENCH_GPU_ONLY;
    if (!gpu_only.empty() && absl::StrContains(", " + gpu_only + ",", ", " + what + ",")) {
      std::fprintf(stderr, "loom-bench: --what=%s is a GPU measurement: build with -DLOOM_CUDA=ON (this build has %s)\n",
                   what.c_str(), names.c_str());
      return 2;
    }
    std::fprintf(stderr, "loom-bench: --what=%s is not a benchmark (%s)\n", what.c_str(), names.c_str());
    return 2;
  }
  const std::string path = args->config_path.empty() ? LOOM_SOURCE_DIR "/configs/default.textproto" : args->config_path;
  auto config = loom::LoadConfig(path, args->sets);
  if (!config.ok()) {
    std::fprintf(stderr, "loom-bench: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  return it->second.run(*config);
}
