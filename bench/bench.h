// loom-bench's registry: each bench/<what>.cc (and bench/cuda/<what>.cu in a
// CUDA build) registers one `--what=` entry with LOOM_BENCHMARK, so adding a
// measurement is adding a file.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "runtime/config.h"

// Shared flags, defined in loom_bench.cc.
ABSL_DECLARE_FLAG(int, steps);
ABSL_DECLARE_FLAG(bool, json);

namespace loom::bench {

// Returns the process exit code. The config is the loaded --config (default
// configs/default.textproto) with every --set applied.
using BenchFn = std::function<int(const config::Config&)>;

struct Benchmark {
  std::string summary;
  BenchFn run;
};

// "1024,4096" as {1024, 4096}; nullopt (after saying why on stderr, naming
// --flag) when an item is not a positive integer.
std::optional<std::vector<int64_t>> ParseSizes(const char* flag, const std::string& list);

inline std::map<std::string, Benchmark>& Registry() {
  static std::map<std::string, Benchmark> registry;
  return registry;
}

struct Register {
  Register(const char* what, const char* summary, BenchFn fn) { Registry()[what] = {summary, std::move(fn)}; }
};

}  // namespace loom::bench

#define LOOM_BENCHMARK_CAT2(a, b) a##b
#define LOOM_BENCHMARK_CAT(a, b) LOOM_BENCHMARK_CAT2(a, b)
// LOOM_BENCHMARK("step", "whole training steps on the CPU", BenchStep);
#define LOOM_BENCHMARK(what, summary, fn) \
  static ::loom::bench::Register LOOM_BENCHMARK_CAT(loom_benchmark_, __LINE__)(what, summary, fn)
