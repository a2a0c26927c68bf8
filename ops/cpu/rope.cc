// CPU RoPE (see ops/rope.h) and the RoPE frequency tables. Forward rotates
// each pair (x[i], x[i+D/2]) by +angle, backward by −angle; angles and
// products are computed in double.
#include "ops/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "absl/strings/str_cat.h"

namespace loom::ops {

// ---------------------------------------------------------------- tables
// transformers' ROPE_INIT_FUNCTIONS (modeling_rope_utils.py), in double
// where transformers rounds inv_freq to f32.

RopeTable RopeTable::Plain(double theta, int64_t head_dim) {
  RopeTable t;
  t.inv_freq.resize(head_dim / 2);
  for (int64_t i = 0; i < head_dim / 2; ++i) t.inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / head_dim);
  return t;
}

namespace {

// YaRN (Peng et al. 2023, arXiv:2309.00071; _compute_yarn_parameters):
// pairs that turn fewer than beta_slow times within m tokens are
// interpolated (inv_freq / s), more than beta_fast times extrapolated (kept),
// with a linear ramp between; attention factor 0.1·ln(s) + 1.
RopeTable Yarn(double base, const config::RopeScaling& r, int64_t dim) {
  const double s = r.factor(), m = r.original_max_position_embeddings();
  auto correction_dim = [&](double rotations) {
    return dim * std::log(m / (rotations * 2 * std::numbers::pi)) / (2 * std::log(base));
  };
  double low = correction_dim(r.beta_fast()), high = correction_dim(r.beta_slow());
  if (r.truncate()) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // transformers' guard against a zero-width ramp
  RopeTable t = RopeTable::Plain(base, dim);
  for (size_t i = 0; i < t.inv_freq.size(); ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double extrapolation = 1 - ramp;  // weight of the unscaled frequency
    t.inv_freq[i] = t.inv_freq[i] / s * (1 - extrapolation) + t.inv_freq[i] * extrapolation;
  }
  auto get_mscale = [&](double mscale) { return s <= 1 ? 1.0 : 0.1 * mscale * std::log(s) + 1.0; };
  if (r.attention_factor() > 0) {
    t.attention_factor = r.attention_factor();
  } else if (r.mscale() > 0 && r.mscale_all_dim() > 0) {
    t.attention_factor = get_mscale(r.mscale()) / get_mscale(r.mscale_all_dim());
  } else {
    t.attention_factor = get_mscale(1.0);
  }
  return t;
}

// Llama 3 (_compute_llama3_parameters): wavelengths 2π/inv_freq longer than
// m/low_freq_factor are divided by s, shorter than m/high_freq_factor kept,
// and those between interpolated by smooth = (m/λ − low)/(high − low).
RopeTable Llama3(double base, const config::RopeScaling& r, int64_t dim) {
  const double s = r.factor(), m = r.original_max_position_embeddings();
  const double low = r.low_freq_factor(), high = r.high_freq_factor();
  RopeTable t = RopeTable::Plain(base, dim);
  for (double& f : t.inv_freq) {
    const double wavelen = 2 * std::numbers::pi / f;
    if (wavelen > m / low) {
      f /= s;
    } else if (!(wavelen < m / high)) {
      const double smooth = (m / wavelen - low) / (high - low);
      f = (1 - smooth) * f / s + smooth * f;
    }
  }
  return t;
}

}  // namespace

absl::StatusOr<RopeTable> RopeTable::FromConfig(double theta, const config::RopeScaling& r, int64_t head_dim) {
  if (head_dim < 2 || head_dim % 2 != 0)
    return absl::InvalidArgumentError(absl::StrCat("[rope] head dim ", head_dim, " must be even and >= 2"));
  const std::string& type = r.type();
  if (type == "default") return Plain(theta, head_dim);
  if (type == "linear") {
    RopeTable t = Plain(theta, head_dim);
    for (double& f : t.inv_freq) f /= r.factor();
    return t;
  }
  if (type == "dynamic") {
    // Static NTK-aware base: transformers' dynamic formula at L tokens.
    const double m = r.original_max_position_embeddings();
    const double len = std::max<double>(r.dynamic_seq_len() > 0 ? r.dynamic_seq_len() : m, m);
    if (head_dim <= 2) return absl::InvalidArgumentError("[rope] dynamic scaling needs head dim > 2");
    const double d = static_cast<double>(head_dim);
    return Plain(theta * std::pow(r.factor() * len / m - (r.factor() - 1), d / (d - 2)), head_dim);
  }
  if (type == "yarn") return Yarn(theta, r, head_dim);
  if (type == "llama3") return Llama3(theta, r, head_dim);
  return absl::InvalidArgumentError(
      absl::StrCat("model.rope_scaling.type: '", type, "' is not default, linear, dynamic, yarn or llama3"));
}

// ---------------------------------------------------------------- the op

namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

// out = a · R(sign · angle) in over [T, H, D]; out may alias in, since each
// pair is read whole before it is written.
template <typename T>
void RotatePairs(const T* in, const int32_t* pos, const RopeTable& table, double sign, int64_t t_len, int64_t heads,
                 int64_t d, T* out) {
  const int64_t half = d / 2;
  const double a = table.attention_factor;
#pragma omp parallel for if (t_len * heads * d >= kParallelMinElements)
  for (int64_t t = 0; t < t_len; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = pos[t] * table.inv_freq[i];
      const double c = a * std::cos(angle), s = a * sign * std::sin(angle);
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t at = (t * heads + h) * d + i;
        const double x0 = in[at], x1 = in[at + half];
        out[at] = static_cast<T>(x0 * c - x1 * s);
        out[at + half] = static_cast<T>(x1 * c + x0 * s);
      }
    }
  }
}

void Rotate(const Tensor& in, const Tensor& positions, const RopeTable& table, double sign, Tensor& out,
            const char* in_name, const char* out_name) {
  LOOM_CHECK(in.device().is_cpu() && positions.device().is_cpu() && out.device().is_cpu(),
             "[rope] CPU tensors only");
  LOOM_CHECK(in.ndim() == 3, "[rope] ", in_name, " must be [T, H, D], got ", ShapeString(in.shape()));
  LOOM_CHECK(out.shape() == in.shape() && out.dtype() == in.dtype(), "[rope] ", out_name, " ",
             ShapeString(out.shape()), " ", DTypeName(out.dtype()), " must match ", in_name, " ",
             ShapeString(in.shape()), " ", DTypeName(in.dtype()));
  LOOM_CHECK(in.dim(2) % 2 == 0, "[rope] head dim ", in.dim(2), " must be even");
  LOOM_CHECK(static_cast<int64_t>(table.inv_freq.size()) == in.dim(2) / 2, "[rope] the table has ",
             table.inv_freq.size(), " frequencies for head dim ", in.dim(2));
  LOOM_CHECK(positions.dtype() == DType::kI32 && positions.numel() == in.dim(0), "[rope] positions ",
             ShapeString(positions.shape()), " ", DTypeName(positions.dtype()), " must be [", in.dim(0), "] i32");
  LOOM_DISPATCH_FLOAT(in.dtype(), T, [&] {
    RotatePairs(in.data<T>(), positions.data<int32_t>(), table, sign, in.dim(0), in.dim(1), in.dim(2),
                out.data<T>());
  });
}

}  // namespace

void RopeForward(const Tensor& x, const Tensor& positions, const RopeTable& table, Tensor& y, CudaStream stream) {
  if (!x.device().is_cpu()) return cuda::RopeForward(x, positions, table, y, stream);
  Rotate(x, positions, table, +1.0, y, "x", "y");
}

void RopeBackward(const Tensor& dy, const Tensor& positions, const RopeTable& table, Tensor& dx, CudaStream stream) {
  if (!dy.device().is_cpu()) return cuda::RopeBackward(dy, positions, table, dx, stream);
  Rotate(dy, positions, table, -1.0, dx, "dy", "dx");
}

void RopeForward(const Tensor& x, const Tensor& positions, double theta, Tensor& y) {
  RopeForward(x, positions, RopeTable::Plain(theta, x.dim(-1)), y);
}

void RopeBackward(const Tensor& dy, const Tensor& positions, double theta, Tensor& dx) {
  RopeBackward(dy, positions, RopeTable::Plain(theta, dy.dim(-1)), dx);
}

}  // namespace loom::ops
