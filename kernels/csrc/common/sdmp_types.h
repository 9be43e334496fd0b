// Host/device shared definitions: element type tags, stream type and the launch macro.
#pragma once

#ifdef SDMP_EMULATE
#include "emulate.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

namespace sdmp {

// Element type of the big tensors (logits, images); every op accumulates in fp32.
enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

using Stream = cudaStream_t;
using Status = cudaError_t;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }  // grid and tile counts

}  // namespace sdmp

// `kernel` is a plain function pointer variable (keeps template commas out of the macro).
#ifdef SDMP_EMULATE
#define SDMP_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::sdmp_emu::launch((grid), (block), (smem), (kernel), __VA_ARGS__))
#else
#define SDMP_LAUNCH(kernel, grid, block, smem, stream, ...)                                               \
  ((smem) > 48 * 1024                                                                                   \
       ? (void)cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(smem)) \
       : (void)0,                                                                                       \
   kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__))
#endif

// Dispatches on the element type tag: defines `scalar_t` for the body.
#define SDMP_DISPATCH_DTYPE(dtype, ...)            \
  switch (dtype) {                                 \
    case ::sdmp::DType::kFloat: {                  \
      using scalar_t = float;                      \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
    case ::sdmp::DType::kHalf: {                   \
      using scalar_t = ::c10::Half;                \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
    case ::sdmp::DType::kBFloat16: {               \
      using scalar_t = ::c10::BFloat16;            \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
  }
