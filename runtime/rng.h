// Counter-based random numbers (Philox-4x32-10, Salmon et al., SC'11).
// A value is a pure function of (key, counter): parameter init draws element
// i of a tensor from counter i under a key hashed from (seed, tensor name),
// so the global weights are the same whatever the parallel layout, and any
// shard can draw its own slice without drawing the rest.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "runtime/tensor.h"

namespace loom {

// Four 32-bit random words for (key, counter).
std::array<uint32_t, 4> Philox4x32(uint64_t key, uint64_t counter_hi, uint64_t counter_lo);

// Key of a named stream under a seed (XXH3 of the name, seeded).
uint64_t RngKey(uint64_t seed, std::string_view name);

// Uniform in (0, 1) and standard normal draws at `index` of stream `key`.
double RngUniform(uint64_t key, uint64_t index);
double RngNormal(uint64_t key, uint64_t index);

// t[i] = std · N(0,1) drawn at global index offset + i (f32 or f64 CPU tensor).
void FillNormal(Tensor& t, uint64_t key, double std, uint64_t offset = 0);

}  // namespace loom
