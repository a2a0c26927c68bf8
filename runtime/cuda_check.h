// LOOM_CUDA_CHECK: a failed CUDA call is a broken invariant here (the inputs
// were validated before any launch): print file:line and the CUDA error.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define LOOM_CUDA_CHECK(expr)                                                        \
  do {                                                                               \
    cudaError_t loom_err_ = (expr);                                                  \
    if (loom_err_ != cudaSuccess) {                                                  \
      std::fprintf(stderr, "[cuda] %s:%d: %s: %s\n", __FILE__, __LINE__, #expr,      \
                   cudaGetErrorString(loom_err_));                                   \
      std::abort();                                                                  \
    }                                                                                \
  } while (0)
