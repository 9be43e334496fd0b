// Host-side helpers for the *_api.cpp files: argument checks, element type tags, stream and device guard.
// Light ATen headers only (no torch/extension.h) to keep each translation unit quick to compile.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/fill.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "sdmp_types.h"

#include <cmath>
#include <cstdlib>
#include <string>

#ifdef SDMP_EMULATE
#define SDMP_CHECK_DEVICE(x) \
  TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor in the emulated (CPU) build")
#define SDMP_CHECK_STATUS(st) TORCH_CHECK((st) == cudaSuccess, "emulated kernel launch failed")
namespace sdmp {
inline Stream current_stream(const at::Tensor&) { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
// An H100's opt-in limit: what the emulated launches enforce (emulate.h).
inline int64_t max_dynamic_smem(const at::Tensor&) { return static_cast<int64_t>(sdmp_emu::kMaxDynamicSmem); }
}  // namespace sdmp
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define SDMP_CHECK_DEVICE(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define SDMP_CHECK_STATUS(st) C10_CUDA_CHECK(st)
namespace sdmp {
// Launches go on the caller's current stream of the tensor's device: graph capture and side streams work.
inline Stream current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
// Dynamic shared memory one block of the tensor's device may request (227 KB on an H100, 163 KB on an A100).
inline int64_t max_dynamic_smem(const at::Tensor& t) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.device().index()));
  return optin;
}
}  // namespace sdmp
#endif

#define CHECK_SHAPE(x, ...)                                                                        \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_SAME_DEVICE(x, ref) \
  TORCH_CHECK((x).device() == (ref).device(), #x " is on ", (x).device(), ", expected ", (ref).device())
#define CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", (dt), ", got ", (x).scalar_type())

namespace sdmp {

inline DType dtype_tag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat;
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "sdmp_fast kernels support float32, float16 and bfloat16 tensors, got ", t.scalar_type());
  }
}

// A launch-tuning setting from the environment: unset or empty -> fallback; otherwise an integer in [lo, hi] and a
// multiple of `step`, or an error naming the variable (a typo must not silently run, and time, the default).
inline long tuning_env(const char* name, long fallback, long lo, long hi, long step = 1,
                       const char* expected = nullptr) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return fallback;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  const std::string want = expected != nullptr ? std::string(expected)
                           : "an integer " + std::to_string(lo) + " to " + std::to_string(hi) +
                                 (step > 1 ? " and a multiple of " + std::to_string(step) : std::string());
  TORCH_CHECK(end != v && *end == '\0' && n >= lo && n <= hi && n % step == 0, name, "=", v, ": expected ", want);
  return n;
}

// SDMP_KERNELS_POISON=1 (tests): outputs and workspaces start NaN-filled, so any element a kernel forgets to
// write shows up in the results.
// Read like every other setting: a value other than 0 / 1 is an error naming it (a 'yes' must not silently
// test without poisoning).
inline bool poison_outputs() { return tuning_env("SDMP_KERNELS_POISON", 0, 0, 1) == 1; }

inline at::Tensor poisoned(at::Tensor t) {
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) at::fill_(t, NAN);
  return t;
}

// Outputs and workspaces: caching-allocator memory on the current stream (capturable), poisoned on request.
inline at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return poisoned(at::empty(sizes, options));
}

inline at::Tensor new_like(const at::Tensor& x) {
  return poisoned(at::empty_like(x, at::MemoryFormat::Contiguous));
}

// 16-byte vector access is safe when the base is 16-byte aligned and every row starts on a 16-byte boundary.
inline bool vec_aligned(const at::Tensor& t, int64_t row_elems) {
  const int64_t bytes = row_elems * static_cast<int64_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && bytes % 16 == 0;
}

}  // namespace sdmp
