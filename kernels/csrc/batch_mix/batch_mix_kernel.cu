// Fused batch-flip mixing: one launch mixes every sample of every view with its partner n-1-i.
//
// A thread owns VEC consecutive pixels of one row and channel of a *pair* {i, p} (PACKS such packs): it reads x_i
// and x_p there once and writes both mixed outputs, so mixup and cutmix move exactly the bytes of a copy.
// Resizemix samples the whole partner, bilinearly resized into the box (grid_sample semantics: half-pixel centres,
// border clamp), with a few extra (cached) partner reads inside the box. Arithmetic follows the eager reference
// (sdmp_fast.mixing.apply_mix) step by step, including its per-op rounding for half-precision images.
//
// Staged resizemix (kStaged, $SDMP_MIX_STAGED=1, opt-in until timed): with VEC pixels per thread, neighbouring
// lanes of a warp gather their bilinear taps VEC * scale pixels apart (scale = W / box width > 1), so each gather
// instruction touches several times the L1 sectors it uses, and the column table is read VEC floats apart (bank
// conflicts). Staged, the warp first resamples its 32 * VEC box pixels in lane order (lane l takes pixels l,
// l + 32, ...: one gather instruction's taps lie scale pixels apart, and the tables are read at consecutive
// addresses) into a per-warp shared-memory stage, then each thread takes its own VEC pixels from the stage with
// 16-byte loads (conflict-free). Same arithmetic, so the same results bit for bit.
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

// grid_sampler's unnormalize ((g + 1) * size - 1) / 2 (align_corners=False) rounded as PyTorch's kernels round it:
// the multiply-subtract contracted into one FMA (nvcc in the CUDA kernel; the AVX2 / AVX-512 CPU kernels too, the
// emulated build included, which is compared with them). /2 is exact. ATen's non-vectorised CPU kernel
// (ATEN_CPU_CAPABILITY=default) rounds the product separately: source x can then differ in its last bit, which
// shows only for coordinates in the thousands (tests/test_kernels.py, wide rows).
__device__ __forceinline__ float unnormalize(float g, int size) {
  return __fmul_rn(__fmaf_rn(__fadd_rn(g, 1.f), static_cast<float>(size), -1.f), 0.5f);
}

// acc + v * w as the reference accumulates (out_acc += v * w: one FMA).
__device__ __forceinline__ float mul_add(float v, float w, float acc) { return __fmaf_rn(v, w, acc); }

// Source coordinate in the partner (size `size`) of box pixel `pos` (box [start, start + len)), border-clamped:
// the normalised grid coordinate (2 (pos - start) + 1) / len - 1 in float64 rounded to float32, as
// mixing._resized_partner builds it, then grid_sampler's unnormalize and clip.
__device__ __forceinline__ float source_coord(int pos, int64_t start, int64_t len, int size) {
  const double l = static_cast<double>(len < 1 ? 1 : len);
  const double t = __dadd_rn(2.0 * static_cast<double>(pos - start), 1.0);
  const float g = __double2float_rn(__dadd_rn(__ddiv_rn(t, l), -1.0));
  return fminf(static_cast<float>(size - 1), fmaxf(unnormalize(g, size), 0.f));
}

// Bilinear sample of the partner plane at source coordinates (iy, ix): grid_sampler_2d, padding_mode="border"
// (neighbours outside the image carry zero weight after the clamp), same order of accumulation.
template <typename T>
__device__ __forceinline__ float bilinear(const T* plane, int H, int W, float iy, float ix) {
  const int ix_nw = static_cast<int>(floorf(ix)), iy_nw = static_cast<int>(floorf(iy));
  const int ix_se = ix_nw + 1, iy_se = iy_nw + 1;
  const float nw = __fmul_rn(__fsub_rn(static_cast<float>(ix_se), ix), __fsub_rn(static_cast<float>(iy_se), iy));
  const float ne = __fmul_rn(__fsub_rn(ix, static_cast<float>(ix_nw)), __fsub_rn(static_cast<float>(iy_se), iy));
  const float sw = __fmul_rn(__fsub_rn(static_cast<float>(ix_se), ix), __fsub_rn(iy, static_cast<float>(iy_nw)));
  const float se = __fmul_rn(__fsub_rn(ix, static_cast<float>(ix_nw)), __fsub_rn(iy, static_cast<float>(iy_nw)));
  const T* row = plane + static_cast<int64_t>(iy_nw) * W;
  float acc = __fmul_rn(static_cast<float>(row[ix_nw]), nw);
  if (ix_se < W) acc = mul_add(static_cast<float>(row[ix_se]), ne, acc);
  if (iy_se < H) acc = mul_add(static_cast<float>(row[W + ix_nw]), sw, acc);
  if (ix_se < W && iy_se < H) acc = mul_add(static_cast<float>(row[W + ix_se]), se, acc);
  return acc;
}

// What a thread needs to mix its pixels of one sample: parameters, whether its row crosses the box, and for
// resizemix the row's source coordinate and the per-column source coordinates (block table or computed).
struct RowMix {
  SampleMix s;
  bool row_inside;
  float iy;
  const float* col_ix;  // [W] source x per column (resizemix, table in shared memory) or null
};

template <typename T>
__device__ __forceinline__ float mixed_pixel(const RowMix& r, float a, float b, const T* partner_plane, int H,
                                             int W, int x) {
  const SampleMix& s = r.s;
  if (s.method == kMixup) {
    // lam * x + (1 - lam) * partner in fp32, rounded once to the image dtype (mixing._blend): no FMA, each op
    // rounded as the reference's separate fp32 kernels round it.
    const float l = s.lam;
    return round_through<T>(__fadd_rn(__fmul_rn(l, a), __fmul_rn(__fsub_rn(1.f, l), b)));
  }
  if (!r.row_inside || x < s.x0 || x >= s.x0 + s.cw) return a;
  if (s.method == kCutmix) return b;
  const float ix = r.col_ix != nullptr ? r.col_ix[x] : source_coord(x, s.x0, s.cw, W);
  return round_through<T>(bilinear<T>(partner_plane, H, W, r.iy, ix));
}

__device__ __forceinline__ bool resized_row(const SampleMix& s, int y) {
  return s.method == kResizemix && y >= s.y0 && y < s.y0 + s.ch;
}

// Pixel x of a row is resampled from the partner (resizemix, inside the box).
__device__ __forceinline__ bool resized_pixel(const RowMix& r, int x) {
  return r.s.method == kResizemix && r.row_inside && x >= r.s.x0 && x < r.s.x0 + r.s.cw;
}

// Staged resizemix: this lane's share of its warp's 32 * VEC pixels starting at pixel `first_pixel` of the sample
// (flattened c, y, x), resampled from `partner` into stage[local] for the pixels inside `s`'s box (0 for the
// other pixels of the box's rows). row_iy / col_ix:
// the block's tables for this sample (row_iy indexed from the block's first row row0).
template <typename T, int VEC>
__device__ __forceinline__ void stage_resized(const SampleMix& s, const T* partner, const float* row_iy,
                                              const float* col_ix, uint32_t row0, uint32_t first_pixel,
                                              uint32_t sample_pixels, int H, int W, float* stage) {
  if (s.method != kResizemix) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t plane = static_cast<int64_t>(H) * W;
#pragma unroll
  for (int m = 0; m < VEC; ++m) {
    const int local = lane + 32 * m;
    const uint32_t pix = first_pixel + static_cast<uint32_t>(local);
    if (pix >= sample_pixels) break;  // past the sample's end (pix grows with m)
    const uint32_t row = pix / static_cast<uint32_t>(W);  // c * H + y
    const int x = static_cast<int>(pix % static_cast<uint32_t>(W));
    const int y = static_cast<int>(row % static_cast<uint32_t>(H));
    if (y < s.y0 || y >= s.y0 + s.ch) continue;  // no thread of this row reads the stage
    // every pixel of a row inside the box is written (0 beside the box): the consumers' 16-byte loads read
    // no unwritten shared memory
    if (x < s.x0 || x >= s.x0 + s.cw) {
      stage[local] = 0.f;
      continue;
    }
    const T* plane_c = partner + static_cast<int64_t>(row / static_cast<uint32_t>(H)) * plane;
    stage[local] = round_through<T>(bilinear<T>(plane_c, H, W, row_iy[row - row0], col_ix[x]));
  }
}

// row_iy: the row's source y from the block's table, or null to compute it here.
__device__ __forceinline__ RowMix row_mix(const SampleMix& s, int y, int H, const float* row_iy,
                                          const float* col_ix) {
  RowMix r;
  r.s = s;
  r.row_inside = y >= s.y0 && y < s.y0 + s.ch;
  r.iy = !resized_row(s, y) ? 0.f : (row_iy != nullptr ? *row_iy : source_coord(y, s.y0, s.ch, H));
  r.col_ix = col_ix;
  return r;
}

// grid (ceil(C*H*W/VEC / (threads * PACKS)), pairs, views): a block covers part of one pair {i, n-1-i} of one
// view, so the per-sample parameters are block-uniform and the index math is 32-bit (the API checks C*H*W < 2^31).
// Each thread takes PACKS packs, blockDim.x packs apart (coalesced), and issues all their loads first.
// kTable: the block then writes to shared memory the resizemix source coordinates of both samples, x for every
// column ([2][W]) and y for the p.row_table rows its packs can span ([2][row_table]): each float64 coordinate is
// computed once per block instead of once per pixel or per pack (float64 division is slow on most GPUs). The
// loads are in flight meanwhile, and more packs per thread spread the tables over more pixels.
// kStaged (needs kTable, VEC > 1): resizemix box pixels resampled in lane order through a per-warp stage
// ([2][32 * VEC] floats per warp after the tables), see the file comment.
template <typename T, int VEC, int PACKS, bool kTable, bool kStaged>
__global__ void __launch_bounds__(kThreads) batch_mix_kernel(MixParams p) {
  const MixView& v = p.views[blockIdx.z];
  const int i = blockIdx.y, q = p.n - 1 - i;
  const SampleMix si = sample_params(p, v, i), sq = sample_params(p, v, q);
  const uint32_t wpacks = static_cast<uint32_t>(v.W / VEC);
  const uint32_t per_sample = static_cast<uint32_t>(v.C) * static_cast<uint32_t>(v.H) * wpacks;
  const uint32_t block_first = blockIdx.x * blockDim.x * PACKS;
  const uint32_t first = block_first + threadIdx.x;
  const int64_t plane = static_cast<int64_t>(v.H) * v.W;
  const T* x = static_cast<const T*>(v.x);
  T* out = static_cast<T*>(v.out);
  const T* sample_i = x + static_cast<int64_t>(i) * v.C * plane;
  const T* sample_q = x + static_cast<int64_t>(q) * v.C * plane;
  uint32_t row[PACKS];  // c * H + y
  int xoff[PACKS];
  float xi[PACKS][VEC], xq[PACKS][VEC];
#pragma unroll
  for (int u = 0; u < PACKS; ++u) {
    const uint32_t idx = first + static_cast<uint32_t>(u) * blockDim.x;
    if (idx >= per_sample) break;  // packs beyond the sample: this thread has no more (idx grows with u)
    row[u] = idx / wpacks;
    xoff[u] = static_cast<int>(idx % wpacks) * VEC;
    const int64_t at = static_cast<int64_t>(row[u]) * v.W + xoff[u];
    load_floats<T, VEC>(sample_i + at, xi[u]);
    load_floats<T, VEC>(sample_q + at, xq[u]);
  }
  const bool any_resize = si.method == kResizemix || sq.method == kResizemix;  // block-uniform
  const uint32_t row0 = block_first / wpacks;
  float* col_ix = kTable ? reinterpret_cast<float*>(dynamic_smem()) : nullptr;  // [2][W]
  float* row_iy = kTable ? col_ix + 2 * v.W : nullptr;                           // [2][row_table]
  if (kTable && any_resize) {  // every thread reaches the barrier
    for (int c = threadIdx.x; c < v.W; c += blockDim.x) {
      col_ix[c] = si.method == kResizemix ? source_coord(c, si.x0, si.cw, v.W) : 0.f;
      col_ix[v.W + c] = sq.method == kResizemix ? source_coord(c, sq.x0, sq.cw, v.W) : 0.f;
    }
    for (int t = threadIdx.x; t < p.row_table; t += blockDim.x) {
      const int y = static_cast<int>((row0 + static_cast<uint32_t>(t)) % static_cast<uint32_t>(v.H));
      row_iy[t] = resized_row(si, y) ? source_coord(y, si.y0, si.ch, v.H) : 0.f;
      row_iy[p.row_table + t] = resized_row(sq, y) ? source_coord(y, sq.y0, sq.ch, v.H) : 0.f;
    }
    __syncthreads();
  }
  const int lane = static_cast<int>(threadIdx.x % 32);
  float* stage_i = kStaged ? row_iy + 2 * p.row_table + (threadIdx.x / 32) * (2 * 32 * VEC) : nullptr;
  float* stage_q = kStaged ? stage_i + 32 * VEC : nullptr;
  const bool staged = kStaged && any_resize;  // block-uniform
#pragma unroll
  for (int u = 0; u < PACKS; ++u) {
    const uint32_t idx = first + static_cast<uint32_t>(u) * blockDim.x;
    // staged: the whole warp goes on while any lane has pixels (its lanes meet at __syncwarp)
    if ((staged ? idx - static_cast<uint32_t>(lane) : idx) >= per_sample) break;
    if (staged) {
      const uint32_t warp_pixel = (idx - static_cast<uint32_t>(lane)) * VEC;
      const uint32_t sample_pixels = per_sample * VEC;
      stage_resized<T, VEC>(si, sample_q, row_iy, col_ix, row0, warp_pixel, sample_pixels, v.H, v.W, stage_i);
      stage_resized<T, VEC>(sq, sample_i, row_iy + p.row_table, col_ix + v.W, row0, warp_pixel, sample_pixels,
                            v.H, v.W, stage_q);
      __syncwarp();
    }
    if (idx < per_sample) {
      const int y = static_cast<int>(row[u] % static_cast<uint32_t>(v.H));
      const int64_t plane_off = static_cast<int64_t>(row[u] / static_cast<uint32_t>(v.H)) * plane;
      const float* iy_i = kTable ? row_iy + (row[u] - row0) : nullptr;
      const RowMix ri = row_mix(si, y, v.H, iy_i, col_ix);
      const RowMix rq = row_mix(sq, y, v.H, kTable ? iy_i + p.row_table : nullptr, kTable ? col_ix + v.W : nullptr);
      float oi[VEC], oq[VEC], sti[VEC] = {}, stq[VEC] = {};
      if (staged && ri.row_inside && si.method == kResizemix) load_floats<float, VEC>(stage_i + lane * VEC, sti);
      if (staged && rq.row_inside && sq.method == kResizemix) load_floats<float, VEC>(stage_q + lane * VEC, stq);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int px = xoff[u] + j;
        oi[j] = staged && resized_pixel(ri, px)
                    ? sti[j] : mixed_pixel<T>(ri, xi[u][j], xq[u][j], sample_q + plane_off, v.H, v.W, px);
        oq[j] = staged && resized_pixel(rq, px)
                    ? stq[j] : mixed_pixel<T>(rq, xq[u][j], xi[u][j], sample_i + plane_off, v.H, v.W, px);
      }
      const int64_t at = static_cast<int64_t>(row[u]) * v.W + xoff[u];
      store_floats<T, VEC>(out + (sample_i - x) + at, oi);
      if (q != i) store_floats<T, VEC>(out + (sample_q - x) + at, oq);
    }
    if (staged) __syncwarp();  // every lane has read the stage before the next pack overwrites it
  }
}

// Coordinate tables while they fit the 48 KiB of shared memory any launch may take.
constexpr int64_t kMaxTableFloats = 48 * 1024 / sizeof(float);

template <typename T, int VEC, int PACKS>
Status launch_packs(MixParams p, int64_t most, int max_w, Stream stream) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * PACKS;
  const dim3 grid(static_cast<unsigned>(ceil_div(most, per_block)), static_cast<unsigned>((p.n + 1) / 2),
                  static_cast<unsigned>(p.nviews));
  // Rows a block's packs [a, a + per_block) can span in any view: (per_block - 1) / wpacks + 2 at most.
  int64_t rows = 0;
  for (int k = 0; k < p.nviews; ++k) {
    const int64_t wpacks = std::max<int64_t>(1, p.views[k].W / VEC);
    rows = std::max<int64_t>(rows, (per_block - 1) / wpacks + 2);
  }
  const int64_t table_floats = 2 * (static_cast<int64_t>(max_w) + rows);
  constexpr int64_t stage_floats = VEC > 1 ? (kThreads / 32) * 2 * 32 * VEC : 0;
  // The stage starts after 2 * (W + row_table) floats: W % VEC == 0 on this path and row_table a multiple of 4
  // keep it aligned for the 16 / 32-byte Pack loads.
  const int64_t rows4 = (rows + 3) / 4 * 4;
  const int64_t staged_floats = 2 * (static_cast<int64_t>(max_w) + rows4) + stage_floats;
  if (VEC > 1 && p.staged && p.allow_resize && staged_floats <= kMaxTableFloats) {
    p.row_table = static_cast<int>(rows4);
    auto k = batch_mix_kernel<T, VEC, PACKS, true, VEC != 1>;
    SDMP_LAUNCH(k, grid, dim3(kThreads), static_cast<size_t>(staged_floats) * sizeof(float), stream, p);
  } else if (p.allow_resize && table_floats <= kMaxTableFloats) {
    p.row_table = static_cast<int>(rows);
    auto k = batch_mix_kernel<T, VEC, PACKS, true, false>;
    SDMP_LAUNCH(k, grid, dim3(kThreads), static_cast<size_t>(table_floats) * sizeof(float), stream, p);
  } else {
    auto k = batch_mix_kernel<T, VEC, PACKS, false, false>;
    SDMP_LAUNCH(k, grid, dim3(kThreads), 0, stream, p);
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
Status launch_vec(const MixParams& p, int64_t most, int max_w, Stream stream) {
  // Packs per thread: 1 by default (the configuration measured on an H100, 2026-11-26); 2 or 4 for tuning.
  switch (p.packs) {
    // 4 packs of 8 half-precision values would spill registers (ptxas, sm_90): 16 values per thread at most.
    case 4: return launch_packs<T, VEC, VEC <= 4 ? 4 : 2>(p, most, max_w, stream);
    case 2: return launch_packs<T, VEC, 2>(p, most, max_w, stream);
    default: return launch_packs<T, VEC, 1>(p, most, max_w, stream);
  }
}

template <typename T>
Status launch(const MixParams& p, Stream stream) {
  constexpr int V = 16 / sizeof(T);
  int64_t most = 0;
  int max_w = 0;
  for (int k = 0; k < p.nviews; ++k) {
    const MixView& v = p.views[k];
    most = std::max<int64_t>(most, static_cast<int64_t>(v.C) * v.H * (p.vec_ok ? v.W / V : v.W));
    max_w = std::max(max_w, v.W);
  }
  if (most == 0) return cudaSuccess;
  return p.vec_ok ? launch_vec<T, V>(p, most, max_w, stream) : launch_vec<T, 1>(p, most, max_w, stream);
}

}  // namespace

Status batch_mix(const MixParams& p, Stream stream) {
  if (p.n == 0 || p.nviews == 0) return cudaSuccess;
  Status st = cudaSuccess;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch<scalar_t>(p, stream));
  return st;
}

}  // namespace sdmp
