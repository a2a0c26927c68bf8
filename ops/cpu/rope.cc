// CPU RoPE (see ops/rope.h) and the RoPE frequency tables. Forward rotates
// each pair (x[i], x[i+D/2]) by +angle, backward by −angle; angles and
// products are computed in double.
#include "ops/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <utility>
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

// One row of `packed` [T, H, D] is the heads of parts[0], parts[1], … side
// by side; the first `rotated` parts are rotated by a · R(sign · angle),
// the rest copied. pack: parts → packed, else packed → parts. A part may
// alias packed (RoPE in place: one part of all H heads), since each pair is
// read whole before it is written.
template <typename T>
void RotatePacked(T* packed, const std::vector<std::pair<T*, int64_t>>& parts, size_t rotated, bool pack,
                  const int32_t* pos, const RopeTable& table, double sign, int64_t t_len, int64_t d) {
  const int64_t half = d / 2;
  int64_t heads = 0;
  for (const auto& part : parts) heads += part.second;
  const double a = table.attention_factor;
#pragma omp parallel for if (t_len * heads * d >= kParallelMinElements)
  for (int64_t t = 0; t < t_len; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = pos[t] * table.inv_freq[i];
      const double c = a * std::cos(angle), s = a * sign * std::sin(angle);
      int64_t first = 0;  // the part's first head in the packed row
      for (size_t p = 0; p < parts.size(); ++p) {
        const auto [base, part_heads] = parts[p];
        for (int64_t h = 0; h < part_heads; ++h) {
          T* in = packed + (t * heads + first + h) * d + i;
          T* out = base + (t * part_heads + h) * d + i;
          if (pack) std::swap(in, out);
          if (p < rotated) {
            const double x0 = in[0], x1 = in[half];
            out[0] = static_cast<T>(x0 * c - x1 * s);
            out[half] = static_cast<T>(x1 * c + x0 * s);
          } else {
            out[0] = in[0];
            out[half] = in[half];
          }
        }
        first += part_heads;
      }
    }
  }
}

// Checks `packed` against `parts` (each [T, h_i, D], heads adding up to
// packed's), then RotatePacked.
void Rotate(const Tensor& packed, const std::vector<const Tensor*>& parts, size_t rotated, bool pack,
            const Tensor& positions, const RopeTable& table, double sign) {
  LOOM_CHECK(packed.device().is_cpu() && positions.device().is_cpu(), "[rope] CPU tensors only");
  LOOM_CHECK(packed.ndim() == 3, "[rope] input must be [T, H, D], got ", ShapeString(packed.shape()));
  const int64_t t_len = packed.dim(0), d = packed.dim(2);
  int64_t heads = 0;
  for (const Tensor* part : parts) {
    LOOM_CHECK(part->device().is_cpu() && part->ndim() == 3 && part->dim(0) == t_len && part->dim(2) == d &&
                   part->dtype() == packed.dtype(),
               "[rope] ", ShapeString(part->shape()), " ", DTypeName(part->dtype()), " does not match ",
               ShapeString(packed.shape()), " ", DTypeName(packed.dtype()));
    heads += part->dim(1);
  }
  LOOM_CHECK(heads == packed.dim(1), "[rope] the parts' ", heads, " heads are not the packed row's ", packed.dim(1));
  LOOM_CHECK(d % 2 == 0, "[rope] head dim ", d, " must be even");
  LOOM_CHECK(static_cast<int64_t>(table.inv_freq.size()) == d / 2, "[rope] the table has ", table.inv_freq.size(),
             " frequencies for head dim ", d);
  LOOM_CHECK(positions.dtype() == DType::kI32 && positions.numel() == t_len, "[rope] positions ",
             ShapeString(positions.shape()), " ", DTypeName(positions.dtype()), " must be [", t_len, "] i32");
  LOOM_DISPATCH_FLOAT(packed.dtype(), T, [&] {
    std::vector<std::pair<T*, int64_t>> bases;
    for (const Tensor* part : parts) bases.emplace_back(part->data<T>(), part->dim(1));
    RotatePacked(packed.data<T>(), bases, rotated, pack, positions.data<int32_t>(), table, sign, t_len, d);
  });
}

}  // namespace

void RopeForward(const Tensor& x, const Tensor& positions, const RopeTable& table, Tensor& y, CudaStream stream) {
  if (!x.device().is_cpu()) return cuda::RopeForward(x, positions, table, y, stream);
  Rotate(x, {&y}, 1, /*pack=*/false, positions, table, +1.0);
}

void RopeBackward(const Tensor& dy, const Tensor& positions, const RopeTable& table, Tensor& dx, CudaStream stream) {
  if (!dy.device().is_cpu()) return cuda::RopeBackward(dy, positions, table, dx, stream);
  Rotate(dy, {&dx}, 1, /*pack=*/false, positions, table, -1.0);
}

void RopeQkvForward(const Tensor& qkv, const Tensor& positions, const RopeTable& table, Tensor& q, Tensor& k,
                    Tensor& v, CudaStream stream) {
  if (!qkv.device().is_cpu()) return cuda::RopeQkvForward(qkv, positions, table, q, k, v, stream);
  Rotate(qkv, {&q, &k, &v}, 2, /*pack=*/false, positions, table, +1.0);
}

void RopeQkvBackward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& positions,
                     const RopeTable& table, Tensor& dqkv, CudaStream stream) {
  if (!dqkv.device().is_cpu()) return cuda::RopeQkvBackward(dq, dk, dv, positions, table, dqkv, stream);
  Rotate(dqkv, {&dq, &dk, &dv}, 2, /*pack=*/true, positions, table, -1.0);
}

void RopeForward(const Tensor& x, const Tensor& positions, double theta, Tensor& y) {
  RopeForward(x, positions, RopeTable::Plain(theta, x.dim(-1)), y);
}

void RopeBackward(const Tensor& dy, const Tensor& positions, double theta, Tensor& dx) {
  RopeBackward(dy, positions, RopeTable::Plain(theta, dy.dim(-1)), dx);
}

}  // namespace loom::ops
