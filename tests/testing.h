// Shared test helpers: random tensors, golden-vector files, closeness checks
// that print the numbers that differ, and the f64 finite-difference check.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "runtime/config.h"
#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::testing {

// `name` inside a temporary folder of this test process (ctest runs each
// test in its own process, maybe beside another build's suite), removed
// when the process exits.
inline std::string TempPath(const std::string& name) {
  static const struct Dir {
    std::filesystem::path path =
        std::filesystem::path(::testing::TempDir()) / ("loom_test_" + std::to_string(::getpid()));
    Dir() { std::filesystem::create_directories(path); }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  } dir;
  return (dir.path / name).string();
}

// Uniform in [lo, hi), deterministic from `seed`.
inline Tensor RandomTensor(const Shape& shape, DType dtype, uint64_t seed, double lo = -1, double hi = 1) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  Tensor t = Tensor::Empty(shape, DType::kF64);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = dist(gen);
  return dtype == DType::kF64 ? t : t.To(dtype);
}

// Columns [c0, c0 + n) of every row of a CPU f64 [rows, width] tensor, as
// [rows, n]: a block of a packed row (ops/stacked_linear.h's y, ops/rope.h's
// q, k, v as heads · D columns).
inline Tensor Columns(const Tensor& t, int64_t c0, int64_t n) {
  const int64_t rows = t.dim(0), width = t.dim(1);
  Tensor out = Tensor::Empty({rows, n}, DType::kF64);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) out.data<double>()[r * n + c] = t.data<double>()[r * width + c0 + c];
  return out;
}

// The two column halves of a CPU f64 [N, 2F] tensor's rows, as [N, F]
// tensors: a packed [dgate | dup] (ops/swiglu.h) or [dya | dyb]
// (ops/grouped_linear.h) row split in two.
inline std::pair<Tensor, Tensor> SplitRowHalves(const Tensor& t) {
  const int64_t f = t.dim(1) / 2;
  return {Columns(t, 0, f), Columns(t, f, f)};
}

// A pointer to each tensor of v: the per-group weights and gradients the
// grouped ops take (ops/grouped_linear.h).
inline std::vector<Tensor*> Pointers(std::vector<Tensor>& v) {
  std::vector<Tensor*> p;
  for (Tensor& t : v) p.push_back(&t);
  return p;
}
inline std::vector<const Tensor*> ConstPointers(const std::vector<Tensor>& v) {
  std::vector<const Tensor*> p;
  for (const Tensor& t : v) p.push_back(&t);
  return p;
}

// A copy of t on the first GPU, and a copy of a GPU tensor on the host.
inline Tensor ToGpu(const Tensor& t) {
  Tensor g = Tensor::Empty(t.shape(), t.dtype(), Device::Cuda(0));
  g.CopyFrom(t);
  return g;
}
// GPU tests skip, saying why, where no GPU is visible.
#define LOOM_SKIP_WITHOUT_GPU() \
  if (::loom::CudaDeviceCount() == 0)  \
  GTEST_SKIP() << "skipped: no GPU" << (::loom::BuiltWithCuda() ? "" : " (CPU-only build)")

// A GPU tensor full of NaN (integers: −7): an output the op must overwrite
// everywhere, or the comparison fails.
inline Tensor PoisonedGpu(const Shape& shape, DType dtype) {
  Tensor t = Tensor::Empty(shape, dtype);
  t.Fill(dtype == DType::kI32 || dtype == DType::kI64 ? -7 : std::numeric_limits<double>::quiet_NaN());
  return ToGpu(t);
}

inline double MaxAbs(const Tensor& t) {
  double m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.Get(i)));
  return m;
}

inline Tensor ToCpu(const Tensor& t) {
  Tensor c = Tensor::Empty(t.shape(), t.dtype());
  c.CopyFrom(t);
  return c;
}

// Max |a-b| / (atol + rtol·|b|) <= 1, reporting the worst element.
inline ::testing::AssertionResult AllClose(const Tensor& a, const Tensor& b, double rtol, double atol) {
  if (a.numel() != b.numel())
    return ::testing::AssertionFailure() << "sizes differ: " << ShapeString(a.shape()) << " vs "
                                         << ShapeString(b.shape());
  double worst = 0;
  int64_t at = -1;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.Get(i), y = b.Get(i);
    if (x == y) continue;  // also exact zeros under rtol = atol = 0
    const double r = std::abs(x - y) / (atol + rtol * std::abs(y));
    if (!(r <= worst)) {  // also catches NaN
      worst = r;
      at = i;
    }
  }
  if (at < 0 || worst <= 1) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "element " << at << " of " << ShapeString(a.shape()) << ": "
                                       << a.Get(at) << " vs expected " << b.Get(at) << " (rtol " << rtol
                                       << ", atol " << atol << ")";
}

// AllClose with atol = rtol · max|expected|, `got` on any device and in any
// float dtype: the relative error of a GEMM or a loss output is only
// meaningful against the scale of the output.
inline ::testing::AssertionResult CloseToScale(const Tensor& got, const Tensor& expected, double rtol) {
  const Tensor g = got.device().is_cpu() ? got : ToCpu(got);
  return AllClose(g.dtype() == DType::kF32 ? g : g.To(DType::kF32), expected, rtol, rtol * MaxAbs(expected));
}

// A GPU result against its CPU reference (a on either device): normwise
// ‖a − b‖ / ‖b‖ ≤ rel over the finite entries of b, element-wise
// |a − b| ≤ rel·(max|b| + |b|), and a equal to b where b is infinite (a
// softmax row with no visible key has lse −∞). Prints the normwise error.
inline ::testing::AssertionResult NormwiseClose(const Tensor& gpu, const Tensor& ref, const std::string& what,
                                                double rel) {
  const Tensor a = gpu.To(Device::Cpu());
  double num = 0, den = 0, maxabs = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double x = a.Get(i), y = ref.Get(i);
    if (std::isinf(y)) {
      if (x != y) return ::testing::AssertionFailure() << what << " element " << i << ": " << x << " vs " << y;
      continue;
    }
    num += (x - y) * (x - y);
    den += y * y;
    maxabs = std::max(maxabs, std::abs(y));
  }
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  std::printf("  %-28s normwise %.3g\n", what.c_str(), err);
  if (!(err <= rel)) return ::testing::AssertionFailure() << what << ": normwise error " << err << " > " << rel;
  auto r = AllClose(a, ref, rel, rel * std::max(maxabs, 1e-30));
  if (!r) return r << " (" << what << ")";
  return r;
}

// Golden files of ../shared/golden: `param NAME VALUE` and
// `tensor NAME RANK D0 D1 ...` followed by one line of values.
struct GoldenCase {
  std::map<std::string, double> params;
  std::map<std::string, Tensor> tensors;  // f64
  const Tensor& t(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      ADD_FAILURE() << "golden tensor " << name << " missing";
      static Tensor empty;
      return empty;
    }
    return it->second;
  }
};

inline std::string GoldenDir() {
  if (const char* dir = std::getenv("LOOM_GOLDEN_DIR")) return dir;
  return LOOM_SOURCE_DIR "/../shared/golden";
}

// Reads the whole file as one flat list of params and tensors.
inline GoldenCase ReadGolden(const std::string& file) {
  GoldenCase g;
  std::ifstream in(GoldenDir() + "/" + file);
  EXPECT_TRUE(in.good()) << "cannot open golden file " << GoldenDir() << "/" << file;
  std::string kind;
  while (in >> kind) {
    if (kind == "param") {
      std::string name, v;
      in >> name >> v;
      g.params[name] = std::strtod(v.c_str(), nullptr);
    } else if (kind == "tensor") {
      std::string name;
      int rank;
      in >> name >> rank;
      Shape shape(rank);
      for (auto& d : shape) in >> d;
      Tensor t = Tensor::Empty(shape, DType::kF64);
      // Values as text: `>> double` stops at "-inf" (a fully masked LSE).
      std::string word;
      for (int64_t i = 0; i < t.numel() && in >> word; ++i) t.data<double>()[i] = std::strtod(word.c_str(), nullptr);
      g.tensors[name] = t;
    } else {
      std::string rest;
      std::getline(in, rest);  // comments or unknown lines
    }
  }
  return g;
}

// f64 finite-difference gradient check. `loss` recomputes a scalar from the
// current contents of the inputs; `inputs[i]` is perturbed element by
// element (at most `max_elements` evenly spread ones) and the central
// difference is held to `grads[i]`.
struct GradInput {
  std::string name;
  Tensor value;     // f64, perturbed in place
  Tensor gradient;  // f64, analytic
};

inline void ExpectGradientsMatch(const std::function<double()>& loss, const std::vector<GradInput>& inputs,
                                 double tol = 1e-7, double eps = 1e-6, int64_t max_elements = 400) {
  for (const GradInput& in : inputs) {
    ASSERT_EQ(in.value.dtype(), DType::kF64) << in.name;
    ASSERT_EQ(in.value.numel(), in.gradient.numel()) << in.name;
    double* x = in.value.data<double>();
    const int64_t n = in.value.numel();
    const int64_t step = std::max<int64_t>(1, n / max_elements);
    double worst = 0, worst_num = 0, worst_ana = 0;
    int64_t worst_i = -1;
    for (int64_t i = 0; i < n; i += step) {
      const double saved = x[i];
      x[i] = saved + eps;
      const double lp = loss();
      x[i] = saved - eps;
      const double lm = loss();
      x[i] = saved;
      const double num = (lp - lm) / (2 * eps);
      const double ana = in.gradient.Get(i);
      const double err = std::abs(num - ana) / (1.0 + std::abs(num));
      if (!(err <= worst)) {
        worst = err;
        worst_i = i;
        worst_num = num;
        worst_ana = ana;
      }
    }
    EXPECT_LE(worst, tol) << "gradient of " << in.name << " element " << worst_i << ": analytic " << worst_ana
                          << " vs finite difference " << worst_num;
  }
}

// Σ a·b over all elements, in f64.
inline double Dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.Get(i) * b.Get(i);
  return s;
}

// A config from `sets` then `extra` (path=value pairs over the defaults),
// the test failing if it does not load.
inline config::Config ConfigFromSets(std::vector<std::string> sets, const std::vector<std::string>& extra = {}) {
  sets.insert(sets.end(), extra.begin(), extra.end());
  absl::StatusOr<config::Config> c = LoadConfig("", sets);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : config::Config();
}

}  // namespace loom::testing
