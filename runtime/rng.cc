#include "runtime/rng.h"

// Header-only xxHash: no library to ship to the GPU image.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cmath>

namespace loom {

std::array<uint32_t, 4> Philox4x32(uint64_t key, uint64_t counter_hi, uint64_t counter_lo) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kW0;
    k1 += kW1;
  }
  return {c0, c1, c2, c3};
}

uint64_t RngKey(uint64_t seed, std::string_view name) { return XXH3_64bits_withSeed(name.data(), name.size(), seed); }

namespace {
// 53 random bits mapped into the open interval (0, 1).
double ToUnit(uint32_t hi, uint32_t lo) {
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  return (static_cast<double>(bits) + 0.5) * (1.0 / 9007199254740992.0);
}
}  // namespace

double RngUniform(uint64_t key, uint64_t index) {
  const auto r = Philox4x32(key, 0, index);
  return ToUnit(r[0], r[1]);
}

double RngNormal(uint64_t key, uint64_t index) {
  // Box-Muller on the two uniforms of one Philox block.
  const auto r = Philox4x32(key, 0, index);
  const double u1 = ToUnit(r[0], r[1]), u2 = ToUnit(r[2], r[3]);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

namespace {
template <typename T>
void FillNormalKernel(T* x, int64_t n, uint64_t key, double std, uint64_t offset) {
#pragma omp parallel for if (n > 65536)
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(std * RngNormal(key, offset + i));
}
}  // namespace

void FillNormal(Tensor& t, uint64_t key, double std, uint64_t offset) {
  LOOM_DISPATCH_FLOAT(t.dtype(), T, [&] { FillNormalKernel(t.data<T>(), t.numel(), key, std, offset); });
}

}  // namespace loom
