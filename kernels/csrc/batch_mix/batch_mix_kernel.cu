// Fused batch-flip mixing: one launch mixes every sample of every view with its partner n-1-i.
//
// A thread owns VEC consecutive pixels of one row and channel of a *pair* {i, p}: it reads x_i and x_p there once
// and writes both mixed outputs, so mixup and cutmix move exactly the bytes of a copy. Resizemix samples the
// whole partner, bilinearly resized into the box (grid_sample semantics: half-pixel centres, border clamp),
// with a few extra (cached) partner reads inside the box. Arithmetic follows the eager reference
// (sdmp_fast.mixing.apply_mix) step by step, including its per-op rounding for half-precision images.
#include "../common/sdmp_cuda.cuh"
#include "batch_mix.h"

#include <algorithm>

namespace sdmp {
namespace {

constexpr int kThreads = 256;

struct SampleMix {
  float lam;
  int method;  // 0 mixup, 1 cutmix (box from the partner at the same place), 2 resizemix
  int64_t y0, x0, ch, cw;
};

__device__ __forceinline__ SampleMix sample_params(const MixParams& p, const MixView& v, int i) {
  SampleMix s;
  s.lam = p.lam[i];
  const int64_t m = p.method[i];
  s.method = m == kMixup ? kMixup : ((m == kResizemix && p.allow_resize) ? kResizemix : kCutmix);
  s.y0 = v.y0[i];
  s.x0 = v.x0[i];
  s.ch = v.cut_h[i];
  s.cw = v.cut_w[i];
  return s;
}

// Bilinear sample of the partner plane at output pixel (y, x) of a box: grid_sampler_2d, align_corners=False,
// padding_mode="border". The normalised grid coordinate is computed in float64 and rounded to float32, as
// mixing._resized_partner builds it.
template <typename T>
__device__ __forceinline__ float resized_pixel(const T* plane, int H, int W, const SampleMix& s, int y, int x) {
  const double ch = static_cast<double>(s.ch < 1 ? 1 : s.ch), cw = static_cast<double>(s.cw < 1 ? 1 : s.cw);
  const float gy = __double2float_rn(__dadd_rn(__ddiv_rn(__dadd_rn(2.0 * static_cast<double>(y - s.y0), 1.0), ch), -1.0));
  const float gx = __double2float_rn(__dadd_rn(__ddiv_rn(__dadd_rn(2.0 * static_cast<double>(x - s.x0), 1.0), cw), -1.0));
  float iy = __fdiv_rn(__fsub_rn(__fmul_rn(__fadd_rn(gy, 1.f), static_cast<float>(H)), 1.f), 2.f);
  float ix = __fdiv_rn(__fsub_rn(__fmul_rn(__fadd_rn(gx, 1.f), static_cast<float>(W)), 1.f), 2.f);
  iy = fminf(static_cast<float>(H - 1), fmaxf(iy, 0.f));
  ix = fminf(static_cast<float>(W - 1), fmaxf(ix, 0.f));
  const int ix_nw = static_cast<int>(floorf(ix)), iy_nw = static_cast<int>(floorf(iy));
  const int ix_se = ix_nw + 1, iy_se = iy_nw + 1;
  const float nw = __fmul_rn(__fsub_rn(static_cast<float>(ix_se), ix), __fsub_rn(static_cast<float>(iy_se), iy));
  const float ne = __fmul_rn(__fsub_rn(ix, static_cast<float>(ix_nw)), __fsub_rn(static_cast<float>(iy_se), iy));
  const float sw = __fmul_rn(__fsub_rn(static_cast<float>(ix_se), ix), __fsub_rn(iy, static_cast<float>(iy_nw)));
  const float se = __fmul_rn(__fsub_rn(ix, static_cast<float>(ix_nw)), __fsub_rn(iy, static_cast<float>(iy_nw)));
  float acc = 0.f;  // neighbours outside the image carry zero weight after the border clamp
  acc = __fadd_rn(acc, __fmul_rn(static_cast<float>(plane[static_cast<int64_t>(iy_nw) * W + ix_nw]), nw));
  if (ix_se < W) acc = __fadd_rn(acc, __fmul_rn(static_cast<float>(plane[static_cast<int64_t>(iy_nw) * W + ix_se]), ne));
  if (iy_se < H) acc = __fadd_rn(acc, __fmul_rn(static_cast<float>(plane[static_cast<int64_t>(iy_se) * W + ix_nw]), sw));
  if (ix_se < W && iy_se < H)
    acc = __fadd_rn(acc, __fmul_rn(static_cast<float>(plane[static_cast<int64_t>(iy_se) * W + ix_se]), se));
  return acc;
}

// Output pixel of sample s (own value a, partner value b at the same place, partner plane for resizemix).
template <typename T>
__device__ __forceinline__ float mixed_pixel(const SampleMix& s, float a, float b, const T* partner_plane, int H,
                                             int W, int y, int x) {
  if (s.method == kMixup) {
    // lam_x * x + (1.0 - lam_x) * partner with lam_x = lam.to(x.dtype): one rounding per op, as eager PyTorch.
    const float l = round_through<T>(s.lam);
    const float t1 = round_through<T>(__fmul_rn(l, a));
    const float t2 = round_through<T>(__fmul_rn(round_through<T>(__fsub_rn(1.f, l)), b));
    return round_through<T>(__fadd_rn(t1, t2));
  }
  const bool inside = y >= s.y0 && y < s.y0 + s.ch && x >= s.x0 && x < s.x0 + s.cw;
  if (!inside) return a;
  if (s.method == kCutmix) return b;
  return round_through<T>(resized_pixel<T>(partner_plane, H, W, s, y, x));
}

// grid (ceil(C*H*W/VEC / threads), pairs, views): a block covers part of one pair {i, n-1-i} of one view, so the
// per-sample parameters are block-uniform and the index math is 32-bit (the API checks C*H*W < 2^31).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) batch_mix_kernel(MixParams p) {
  const MixView& v = p.views[blockIdx.z];
  const uint32_t wpacks = static_cast<uint32_t>(v.W / VEC);
  const uint32_t per_sample = static_cast<uint32_t>(v.C) * static_cast<uint32_t>(v.H) * wpacks;
  const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= per_sample) return;
  const int i = blockIdx.y, q = p.n - 1 - i;
  const uint32_t wp = idx % wpacks, rest = idx / wpacks;
  const int y = static_cast<int>(rest % static_cast<uint32_t>(v.H));
  const int c = static_cast<int>(rest / static_cast<uint32_t>(v.H));
  const int64_t plane = static_cast<int64_t>(v.H) * v.W;
  const T* x = static_cast<const T*>(v.x);
  T* out = static_cast<T*>(v.out);
  const int xoff = static_cast<int>(wp) * VEC;
  const T* plane_i = x + (static_cast<int64_t>(i) * v.C + c) * plane;
  const T* plane_q = x + (static_cast<int64_t>(q) * v.C + c) * plane;
  const int64_t in_row = static_cast<int64_t>(y) * v.W + xoff;
  float xi[VEC], xq[VEC], oi[VEC], oq[VEC];
  load_floats<T, VEC>(plane_i + in_row, xi);
  load_floats<T, VEC>(plane_q + in_row, xq);
  const SampleMix si = sample_params(p, v, i), sq = sample_params(p, v, q);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    oi[j] = mixed_pixel<T>(si, xi[j], xq[j], plane_q, v.H, v.W, y, xoff + j);
    oq[j] = mixed_pixel<T>(sq, xq[j], xi[j], plane_i, v.H, v.W, y, xoff + j);
  }
  store_floats<T, VEC>(out + (plane_i - x) + in_row, oi);
  if (q != i) store_floats<T, VEC>(out + (plane_q - x) + in_row, oq);
}

template <typename T>
Status launch(const MixParams& p, Stream stream) {
  constexpr int V = 16 / sizeof(T);
  int64_t most = 0;
  for (int k = 0; k < p.nviews; ++k) {
    const MixView& v = p.views[k];
    most = std::max<int64_t>(most, static_cast<int64_t>(v.C) * v.H * (p.vec_ok ? v.W / V : v.W));
  }
  if (most == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((most + kThreads - 1) / kThreads), static_cast<unsigned>((p.n + 1) / 2),
                  static_cast<unsigned>(p.nviews));
  if (p.vec_ok) {
    auto k = batch_mix_kernel<T, V>;
    SDMP_LAUNCH(k, grid, dim3(kThreads), 0, stream, p);
  } else {
    auto k = batch_mix_kernel<T, 1>;
    SDMP_LAUNCH(k, grid, dim3(kThreads), 0, stream, p);
  }
  return cudaGetLastError();
}

}  // namespace

Status batch_mix(const MixParams& p, Stream stream) {
  if (p.n == 0 || p.nviews == 0) return cudaSuccess;
  Status st = cudaSuccess;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch<scalar_t>(p, stream));
  return st;
}

}  // namespace sdmp
