// Two-hot soft-label cross-entropy kernels.
//
// Forward, one block per row, one pass: online log-sum-exp of z = s*x (s = in_scale, z rounded to the logits
// dtype as PyTorch rounds `logits / tau`) over the row, then
//   loss = out_scale * ((wa + wb) * lse - wa * z[a] - wb * z[b]).
// Backward, one block per row: grad = g * out_scale * s * ((wa + wb) * softmax(s*x) - wa e_a - wb e_b),
// written once in the logits dtype. No dense label matrix is ever built.
#include "../common/sdmp_cuda.cuh"
#include "two_hot_ce.h"

#include <algorithm>

namespace sdmp {
namespace {

constexpr int kMaxThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) two_hot_fwd_kernel(TwoHotParams p) {
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.logits) + row * p.ld;
  const float sc = p.in_scale;
  Lse st{-INFINITY, 0.f};
  const int64_t npack = p.N / VEC;
  for (int64_t i = threadIdx.x; i < npack; i += blockDim.x) {
    float v[VEC];
    load_floats<T, VEC>(x + i * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = round_through<T>(v[j] * sc);
    lse_update<VEC>(st, v);
  }
  for (int64_t i = npack * VEC + threadIdx.x; i < p.N; i += blockDim.x) {  // tail (VEC == 1: whole row)
    float v[1] = {round_through<T>(static_cast<float>(x[i]) * sc)};
    lse_update<1>(st, v);
  }
  st = block_lse(st);
  if (threadIdx.x == 0) {
    const float lse = lse_value(st);
    const int64_t a = p.index_a[row], b = p.index_b[row];
    const float wa = p.weight_a[row], wb = p.weight_b[row];
    // An out-of-range target gives NaN (validating indices on the host would need a synchronisation).
    const float xa = (a >= 0 && a < p.N) ? round_through<T>(static_cast<float>(x[a]) * sc) : NAN;
    const float xb = (b >= 0 && b < p.N) ? round_through<T>(static_cast<float>(x[b]) * sc) : NAN;
    // a masked (-inf) target of weight 0 is not read (0 x -inf would be NaN), as the reference
    const float ta = (wa == 0.f && xa == -INFINITY) ? 0.f : wa * xa;
    const float tb = (wb == 0.f && xb == -INFINITY) ? 0.f : wb * xb;
    p.loss[row] = p.out_scale * ((wa + wb) * lse - ta - tb);
    p.lse[row] = lse;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) two_hot_bwd_kernel(TwoHotParams p) {
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.logits) + row * p.ld;
  T* gx = static_cast<T*>(p.grad_logits) + row * p.N;
  const float sc = p.in_scale;
  const float g = p.grad_loss[row * p.grad_stride] * p.out_scale * sc;
  const float wa = p.weight_a[row], wb = p.weight_b[row];
  const float gsm = g * (wa + wb), ga = g * wa, gb = g * wb;
  const float lse = p.lse[row];
  const int64_t a = p.index_a[row], b = p.index_b[row];
  const int64_t npack = p.N / VEC;
  for (int64_t i = threadIdx.x; i < npack; i += blockDim.x) {
    float v[VEC];
    load_floats<T, VEC>(x + i * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t col = i * VEC + j;
      v[j] = gsm * __expf(round_through<T>(v[j] * sc) - lse) - (col == a ? ga : 0.f) - (col == b ? gb : 0.f);
    }
    store_floats<T, VEC>(gx + i * VEC, v);
  }
  for (int64_t col = npack * VEC + threadIdx.x; col < p.N; col += blockDim.x) {
    const float v = gsm * __expf(round_through<T>(static_cast<float>(x[col]) * sc) - lse) - (col == a ? ga : 0.f) -
                    (col == b ? gb : 0.f);
    gx[col] = static_cast<T>(v);
  }
}

int threads_for(int64_t packs) {
  int t = static_cast<int>(std::min<int64_t>(kMaxThreads, (packs + 31) / 32 * 32));
  return t < 32 ? 32 : t;
}

template <typename T>
Status launch_forward(const TwoHotParams& p, Stream stream) {
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(p.n));
  if (p.vec_ok) {
    auto k = two_hot_fwd_kernel<T, V>;
    SDMP_LAUNCH(k, grid, dim3(threads_for(p.N / V)), 0, stream, p);
  } else {
    auto k = two_hot_fwd_kernel<T, 1>;
    SDMP_LAUNCH(k, grid, dim3(threads_for(p.N)), 0, stream, p);
  }
  return cudaGetLastError();
}

template <typename T>
Status launch_backward(const TwoHotParams& p, Stream stream) {
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(p.n));
  if (p.vec_ok) {
    auto k = two_hot_bwd_kernel<T, V>;
    SDMP_LAUNCH(k, grid, dim3(threads_for(p.N / V)), 0, stream, p);
  } else {
    auto k = two_hot_bwd_kernel<T, 1>;
    SDMP_LAUNCH(k, grid, dim3(threads_for(p.N)), 0, stream, p);
  }
  return cudaGetLastError();
}

}  // namespace

Status two_hot_ce_forward(const TwoHotParams& p, Stream stream) {
  if (p.n == 0) return cudaSuccess;
  Status st = cudaSuccess;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch_forward<scalar_t>(p, stream));
  return st;
}

Status two_hot_ce_backward(const TwoHotParams& p, Stream stream) {
  if (p.n == 0) return cudaSuccess;
  Status st = cudaSuccess;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch_backward<scalar_t>(p, stream));
  return st;
}

}  // namespace sdmp
