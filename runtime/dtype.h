// Element types and the CPU conversions of the 16-bit floats.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace loom {

enum class DType : uint8_t { kF32, kBF16, kF16, kF64, kI32, kI64 };

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

constexpr size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32: case DType::kI32: return 4;
    case DType::kBF16: case DType::kF16: return 2;
    case DType::kF64: case DType::kI64: return 8;
  }
  return 0;
}
constexpr const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "f16";
    case DType::kF64: return "f64";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
  }
  return "?";
}

template <typename T> constexpr DType DTypeOf();
template <> constexpr DType DTypeOf<float>() { return DType::kF32; }
template <> constexpr DType DTypeOf<double>() { return DType::kF64; }
template <> constexpr DType DTypeOf<bf16>() { return DType::kBF16; }
template <> constexpr DType DTypeOf<f16>() { return DType::kF16; }
template <> constexpr DType DTypeOf<int32_t>() { return DType::kI32; }
template <> constexpr DType DTypeOf<int64_t>() { return DType::kI64; }

// Round to nearest even; NaN stays NaN.
inline bf16 FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float Bf16ToFloat(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline f16 FloatToF16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  f16 r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}
inline float F16ToFloat(f16 x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}

}  // namespace loom

// Runs the block with `T` bound to the C++ type of a floating dtype the CPU
// references compute in (f32 for training, f64 for gradient checks).
#define LOOM_DISPATCH_FLOAT(dtype, T, ...)                                      \
  [&] {                                                                         \
    switch (dtype) {                                                            \
      case ::loom::DType::kF32: { using T = float; return __VA_ARGS__(); }      \
      case ::loom::DType::kF64: { using T = double; return __VA_ARGS__(); }     \
      default:                                                                  \
        LOOM_CHECK(false, "no CPU kernel for dtype ", ::loom::DTypeName(dtype)); \
    }                                                                           \
  }()
