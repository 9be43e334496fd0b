// Fused SDMP-DINO soft-target cross-entropy kernels: teacher statistics, the pair-block paths (two launches,
// fused, chunked), the backward's decide / rescale / recompute, and their launchers. The shared device code and
// the math are in dino_ce_device.cuh; the cluster forward in dino_cluster_kernel.cu.
#include "dino_ce_device.cuh"

#include <algorithm>
#include <cstdlib>

namespace sdmp {
namespace {

// --------------------------------------------------------------------------------------- teacher statistics

// grid (t_tiles, t_groups_clean + t_groups_mixed), 256 threads. Each warp walks rows of its group over one
// column tile: partial (max, sum) of u = (t - center) / tau_t per (row, tile); clean groups also sum the raw
// logits per column (the DINO center statistic) and write one partial per (group, column).
template <typename T, int VEC>
__global__ void __launch_bounds__(kDinoThreads) teacher_stats_kernel(DinoParams p) {
  constexpr int U = kTeacherPacksPerLane;
  constexpr int TILE = kWarpSize * VEC * U;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  const int64_t tile = blockIdx.x, col0 = tile * TILE;
  const int TB = p.T * p.B;
  const bool clean = static_cast<int>(blockIdx.y) < p.t_groups_clean;
  const int group = clean ? blockIdx.y : blockIdx.y - p.t_groups_clean;
  const int row_begin = group * kTeacherRowsPerGroup;
  const int row_end = imin(row_begin + kTeacherRowsPerGroup, TB);
  const T* base = static_cast<const T*>(clean ? p.t_clean : p.t_mixed);

  float c[U][VEC], csum[U][VEC];
  bool in[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t col = col0 + u * kWarpSize * VEC + lane * VEC;
    in[u] = col < p.K;  // VEC > 1 only when K % VEC == 0: a pack is all in or all out
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      c[u][j] = in[u] ? p.center[col + j] : 0.f;
      csum[u][j] = 0.f;
    }
  }
  for (int r = row_begin + warp; r < row_end; r += nwarps) {
    const T* row = base + static_cast<int64_t>(r) * p.K;
    Lse st{-INFINITY, 0.f};
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!in[u]) continue;
      float v[VEC];
      load_floats<T, VEC>(row + col0 + u * kWarpSize * VEC + lane * VEC, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        csum[u][j] += v[j];
        v[j] = (v[j] - c[u][j]) * p.inv_tau_t;
      }
      lse_update<VEC>(st, v);
    }
    st = warp_lse(st);
    if (lane == 0) {
      const int64_t out_row = clean ? r : TB + r;
      p.t_part[(out_row * p.t_tiles + tile) * 2 + 0] = st.m;
      p.t_part[(out_row * p.t_tiles + tile) * 2 + 1] = st.s;
    }
  }
  if (!clean) return;  // uniform per block
  float* sm = reinterpret_cast<float*>(dynamic_smem());  // [nwarps][TILE]
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int j = 0; j < VEC; ++j) sm[warp * TILE + u * kWarpSize * VEC + lane * VEC + j] = csum[u][j];
  __syncthreads();
  for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
    const int64_t col = col0 + i;
    if (col >= p.K) continue;
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += sm[w * TILE + i];
    p.col_part[static_cast<int64_t>(group) * p.K + col] = s;
  }
}

// Blocks [0, row_blocks): one warp per teacher row merges its tile partials into (max, log sum).
// Blocks [row_blocks, ...): one thread per column sums the group partials into the center statistic.
__global__ void __launch_bounds__(kDinoThreads) teacher_finalize_kernel(DinoParams p, int row_blocks) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  const int TB = p.T * p.B;
  const int nrows = (p.t_mixed != nullptr ? 2 : 1) * TB;
  if (static_cast<int>(blockIdx.x) < row_blocks) {
    const int row = blockIdx.x * nwarps + warp;
    if (row >= nrows) return;  // uniform per warp
    Lse st{-INFINITY, 0.f};
    for (int64_t t = lane; t < p.t_tiles; t += kWarpSize) {
      const Lse part{p.t_part[(row * p.t_tiles + t) * 2], p.t_part[(row * p.t_tiles + t) * 2 + 1]};
      st = lse_merge(st, part);
    }
    st = warp_lse(st);
    if (lane == 0) {
      p.lse_t[row * 2 + 0] = st.m;
      p.lse_t[row * 2 + 1] = logf(st.s);
    }
    return;
  }
  const int64_t col = static_cast<int64_t>(blockIdx.x - row_blocks) * blockDim.x + threadIdx.x;
  if (col >= p.K) return;
  float s = 0.f;
  for (int g = 0; g < p.t_groups_clean; ++g) s += p.col_part[static_cast<int64_t>(g) * p.K + col];
  p.center_mean[col] = s / static_cast<float>(TB);
}

// ------------------------------------------------------------------------------------------------- kernels

template <typename T, int VEC>
__global__ void __launch_bounds__(kDinoPairThreads, 2) student_stats_kernel(DinoParams p) {
  stats_unit<T, VEC>(p, p.pair0 + static_cast<int>(blockIdx.y), blockIdx.x, reinterpret_cast<float*>(dynamic_smem()));
}

// One warp per student row of the launch's pairs (row slot r of pair b: b itself, then its partner).
__global__ void __launch_bounds__(kDinoThreads) merge_pairs_kernel(DinoParams p) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  const int idx = blockIdx.x * nwarps + warp;
  const int per_view = 2 * launch_pairs(p);
  if (idx >= (p.Sc + p.Sm) * per_view) return;  // uniform per warp
  const int v = idx / per_view, b = p.pair0 + (idx % per_view) / 2, r = idx % 2;
  const int partner = p.B - 1 - b;
  if (r == 1 && partner == b) return;  // the middle sample of an odd batch has one row
  merge_row(p, v * p.B + (r == 0 ? b : partner), lane);
}

__global__ void __launch_bounds__(kDinoThreads) merge_rows_kernel(DinoParams p, int nrows) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  const int row = blockIdx.x * nwarps + warp;
  if (row < nrows) merge_row(p, row, lane);
}

// One block: terms[c] = pair_norm * sum over rows of row_loss[:, c] (fixed order: deterministic), and
// terms[3] = (terms[0] + terms[1]) + terms[2], the total in the reference's order of additions.
__global__ void __launch_bounds__(kDinoThreads) terms_kernel(DinoParams p, int nrows) {
  __shared__ float total[3];
  for (int c = 0; c < 3; ++c) {
    float s = 0.f;
    for (int row = threadIdx.x; row < nrows; row += blockDim.x) s += p.row_loss[static_cast<int64_t>(row) * 3 + c];
    s = block_sum(s);
    if (threadIdx.x == 0) total[c] = p.terms[c] = s * p.pair_norm;
  }
  if (threadIdx.x == 0) p.terms[3] = (total[0] + total[1]) + total[2];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kDinoPairThreads, 2) student_grad_kernel(DinoParams p) {
  if (p.mode != nullptr && *p.mode != p.run_mode) return;
  const int units = launch_pairs(p) * p.n_kblocks;
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    grad_unit<T, VEC>(p, p.pair0 + u / p.n_kblocks, u % p.n_kblocks, reinterpret_cast<float*>(dynamic_smem()),
                      false);
    __syncthreads();  // the next unit overwrites the shared targets
  }
}

// Fused forward: every block takes a ticket (its logical unit, in launch order) from counters[0]. Units run
// stats for pair group g, then gradients for group g - 1, so a pair's gradient pass re-reads its student rows
// shortly after the stats pass (mostly from L2). The last stats block of a pair merges the pair's rows and
// raises its ready flag; gradient blocks wait on that flag. A ticket is taken only by a running block, so every
// unit a block waits for belongs to a block that is already running or done: no deadlock whatever the
// residency.
template <typename T, int VEC>
__global__ void __launch_bounds__(kDinoPairThreads, 2) fused_forward_kernel(DinoParams p) {
  __shared__ int unit[3];  // kind (0 stats, 1 grad), pair, column block
  __shared__ int is_last;
  float* tg = reinterpret_cast<float*>(dynamic_smem());
  if (threadIdx.x == 0) {
    int rem = atomicAdd(p.counters, 1);
    const int G = p.group_pairs, KS = p.n_kblocks;
    const int ngroups = (p.npairs + G - 1) / G;
    for (int s = 0; s <= ngroups; ++s) {
      if (s < ngroups) {
        const int cnt = imin(G, p.npairs - s * G) * KS;
        if (rem < cnt) {
          unit[0] = 0, unit[1] = s * G + rem / KS, unit[2] = rem % KS;
          break;
        }
        rem -= cnt;
      }
      if (s >= 1) {
        const int cnt = imin(G, p.npairs - (s - 1) * G) * KS;
        if (rem < cnt) {
          unit[0] = 1, unit[1] = (s - 1) * G + rem / KS, unit[2] = rem % KS;
          break;
        }
        rem -= cnt;
      }
    }
  }
  __syncthreads();
  const int kind = unit[0], pair = unit[1], kb = unit[2];
  if (kind == 1) {
    grad_unit<T, VEC>(p, pair, kb, tg, true);
    return;
  }
  stats_unit<T, VEC>(p, pair, kb, tg);
  __threadfence();  // publish this block's partials before counting it done
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.counters + 1 + pair, 1) == p.n_kblocks - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  const PairRows pr = pair_rows(p, pair);
  for (int rr = warp; rr < pr.count; rr += nwarps) merge_row(p, (rr / pr.nr) * p.B + pr.row(rr % pr.nr), lane);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) store_flag(p.counters + 1 + p.npairs + pair, 1);
}
// Backward control: mode 0 (the precomputed gradient is already right: every active upstream gradient is 1),
// 1 (all active upstream gradients equal c: rescale by c), 2 (recompute).
__global__ void grad_decide_kernel(DinoParams p, bool a0, bool a1, bool a2) {
  if (threadIdx.x != 0) return;
  const bool active[3] = {a0, a1, a2};
  int mode = 0;
  float factor = 1.f;
  bool first = true;
  for (int c = 0; c < 3; ++c) {
    if (!active[c]) continue;
    const float g = p.gw[c];
    if (first) {
      factor = g;
      first = false;
      mode = g == 1.f ? 0 : 1;
    } else if (g != factor) {
      mode = 2;
    }
  }
  p.ctl[0] = mode;
  reinterpret_cast<float*>(p.ctl)[1] = factor;
}

// Mode 1: both gradient buffers times the factor (blockIdx.y: 0 clean, 1 mixed), grid-strided.
template <typename T, int VEC>
__global__ void __launch_bounds__(kDinoThreads) grad_scale_kernel(DinoParams p, int64_t n_clean, int64_t n_mixed) {
  if (p.ctl[0] != 1) return;
  T* g = static_cast<T*>(blockIdx.y == 0 ? p.g_clean : p.g_mixed);
  const int64_t n = blockIdx.y == 0 ? n_clean : n_mixed;
  if (g == nullptr) return;
  const float f = reinterpret_cast<const float*>(p.ctl)[1];
  const int64_t npack = n / VEC;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < npack;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[VEC];
    load_floats<T, VEC>(g + i * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] *= f;
    store_floats<T, VEC>(g + i * VEC, v);
  }
  for (int64_t i = npack * VEC + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    g[i] = static_cast<T>(static_cast<float>(g[i]) * f);
}

// ------------------------------------------------------------------------------------------------ launchers

template <typename T>
Status launch_teacher_stats(const DinoParams& p, Stream stream) {
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(p.t_tiles), static_cast<unsigned>(p.t_groups_clean + p.t_groups_mixed));
  const int vec = p.vec_ok ? V : 1;
  const size_t smem = static_cast<size_t>(kDinoThreads / kWarpSize) * kWarpSize * vec * kTeacherPacksPerLane * sizeof(float);
  if (p.vec_ok) {
    auto k = teacher_stats_kernel<T, V>;
    SDMP_LAUNCH(k, grid, dim3(kDinoThreads), smem, stream, p);
  } else {
    auto k = teacher_stats_kernel<T, 1>;
    SDMP_LAUNCH(k, grid, dim3(kDinoThreads), smem, stream, p);
  }
  Status st = cudaGetLastError();
  if (st != cudaSuccess) return st;
  const int nrows = (p.t_mixed != nullptr ? 2 : 1) * p.T * p.B;
  const int row_blocks = static_cast<int>(ceil_div(nrows, kDinoThreads / kWarpSize));
  const int col_blocks = static_cast<int>(ceil_div(p.K, kDinoThreads));
  auto fin = teacher_finalize_kernel;
  SDMP_LAUNCH(fin, dim3(row_blocks + col_blocks), dim3(kDinoThreads), 0, stream, p, row_blocks);
  return cudaGetLastError();
}

template <typename T>
Status launch_student_stats(const DinoParams& p, Stream stream) {
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(p.n_kblocks), static_cast<unsigned>(launch_pairs(p)));
  const size_t smem = dino_smem_bytes(p);
  if (p.vec_ok) {
    auto k = student_stats_kernel<T, V>;
    SDMP_LAUNCH(k, grid, dim3(dino_pair_threads(p)), smem, stream, p);
  } else {
    auto k = student_stats_kernel<T, 1>;
    SDMP_LAUNCH(k, grid, dim3(dino_pair_threads(p)), smem, stream, p);
  }
  return cudaGetLastError();
}

Status launch_merge_and_terms(const DinoParams& p, Stream stream, bool merge) {
  const int nrows = (p.Sc + p.Sm) * p.B;
  if (merge) {
    auto mk = merge_rows_kernel;
    SDMP_LAUNCH(mk, dim3(static_cast<unsigned>(ceil_div(nrows, kDinoThreads / kWarpSize))), dim3(kDinoThreads), 0,
                stream, p, nrows);
    Status st = cudaGetLastError();
    if (st != cudaSuccess) return st;
  }
  auto tk = terms_kernel;
  SDMP_LAUNCH(tk, dim3(1), dim3(kDinoThreads), 0, stream, p, nrows);
  return cudaGetLastError();
}

template <typename T>
Status launch_fused(const DinoParams& p, Stream stream) {
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(2 * static_cast<int64_t>(p.npairs) * p.n_kblocks));
  const size_t smem = dino_smem_bytes(p);
  if (p.vec_ok) {
    auto k = fused_forward_kernel<T, V>;
    SDMP_LAUNCH(k, grid, dim3(dino_pair_threads(p)), smem, stream, p);
  } else {
    auto k = fused_forward_kernel<T, 1>;
    SDMP_LAUNCH(k, grid, dim3(dino_pair_threads(p)), smem, stream, p);
  }
  return cudaGetLastError();
}

template <typename T>
Status launch_grad(const DinoParams& p, Stream stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t units = static_cast<int64_t>(launch_pairs(p)) * p.n_kblocks;
  const dim3 grid(static_cast<unsigned>(p.mode != nullptr ? std::min<int64_t>(units, kGatedGradBlocks) : units));
  const size_t smem = dino_smem_bytes(p);
  if (p.vec_ok) {
    auto k = student_grad_kernel<T, V>;
    SDMP_LAUNCH(k, grid, dim3(dino_pair_threads(p)), smem, stream, p);
  } else {
    auto k = student_grad_kernel<T, 1>;
    SDMP_LAUNCH(k, grid, dim3(dino_pair_threads(p)), smem, stream, p);
  }
  return cudaGetLastError();
}

template <typename T>
Status launch_scale(const DinoParams& p, Stream stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t per_view = static_cast<int64_t>(p.B) * p.K;
  const int64_t n_clean = p.g_clean != nullptr ? p.Sc * per_view : 0, n_mixed = p.g_mixed != nullptr ? p.Sm * per_view : 0;
  const int64_t most = std::max(n_clean, n_mixed);
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(ceil_div(most, V), kDinoThreads), kGatedGradBlocks)));
  if (p.vec_ok) {
    auto k = grad_scale_kernel<T, V>;
    SDMP_LAUNCH(k, dim3(blocks, 2), dim3(kDinoThreads), 0, stream, p, n_clean, n_mixed);
  } else {
    auto k = grad_scale_kernel<T, 1>;
    SDMP_LAUNCH(k, dim3(blocks, 2), dim3(kDinoThreads), 0, stream, p, n_clean, n_mixed);
  }
  return cudaGetLastError();
}

}  // namespace


int64_t dino_teacher_tile_cols(DType dt, bool vec_ok) {
  const int elt = dt == DType::kFloat ? 4 : 2;
  return static_cast<int64_t>(kWarpSize) * (vec_ok ? 16 / elt : 1) * kTeacherPacksPerLane;
}

// Columns per pair block: the most (up to 2048) whose target vectors take at most 96 KiB of shared memory, which
// every sm_80+ card grants on request (2048 for T <= 3). Measured on an H100 (2026-11-26, 10 x 256 x 65,536, 2
// teacher crops + mixed): 2048 columns 0.80 ms vs 1024 0.84-0.87 ms fwd+bwd, 4096 1.12 ms.
// $SDMP_DINO_BLOCK_COLS (a multiple of 256, up to the card's shared memory) overrides it for tuning.
int64_t dino_block_cols(int T, int64_t setting) {
  if (setting > 0) return setting;
  for (int64_t cols = 2048; cols > 256; cols /= 2) {
    if (static_cast<int64_t>(2) * (3 + T) * cols * static_cast<int64_t>(sizeof(float)) <= 96 * 1024) return cols;
  }
  return 256;
}

// Warps per pair block (4..12, one student row at a time each): the count that leaves the fewest warps idle in
// the last round of rows (20 rows -> 10 warps), the larger one on ties.
int dino_pair_threads(const DinoParams& p) {
  if (p.pair_warps_setting > 0) return p.pair_warps_setting * kWarpSize;  // tuning override, 4..12
  const int rows = 2 * (p.Sc + p.Sm);
  int best = 8;
  double best_eff = 0.0;
  for (int w = kDinoPairThreads / kWarpSize; w >= 4; --w) {
    const int rounds = (rows + w - 1) / w;
    const double eff = static_cast<double>(rows) / (rounds * w);
    if (eff > best_eff + 1e-9) {
      best_eff = eff;
      best = w;
    }
  }
  return best * kWarpSize;
}

size_t dino_smem_bytes(const DinoParams& p) {
  return static_cast<size_t>(2) * (kSlotGlobal + p.T) * p.kb_cols * sizeof(float);
}

Status dino_teacher_stats(const DinoParams& p, Stream stream) {
  Status st = cudaSuccess;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch_teacher_stats<scalar_t>(p, stream));
  return st;
}

Status dino_student_stats(const DinoParams& p, Stream stream) {
  Status st = cudaSuccess;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch_student_stats<scalar_t>(p, stream));
  if (st != cudaSuccess) return st;
  return launch_merge_and_terms(p, stream, true);
}

Status dino_fused_forward(const DinoParams& p, Stream stream) {
  Status st = cudaSuccess;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch_fused<scalar_t>(p, stream));
  if (st != cudaSuccess) return st;
  return launch_merge_and_terms(p, stream, false);
}

Status dino_chunked_forward(const DinoParams& p, int chunk, Stream stream) {
  Status st = cudaSuccess;
  for (int c0 = 0; c0 < p.npairs && st == cudaSuccess; c0 += chunk) {
    DinoParams q = p;
    q.pair0 = c0;
    q.pair_count = std::min(chunk, p.npairs - c0);
    SDMP_DISPATCH_DTYPE(q.dtype, st = launch_student_stats<scalar_t>(q, stream));
    if (st != cudaSuccess) return st;
    const int rows = (q.Sc + q.Sm) * 2 * q.pair_count;
    auto mk = merge_pairs_kernel;
    SDMP_LAUNCH(mk, dim3(static_cast<unsigned>(ceil_div(rows, kDinoThreads / kWarpSize))), dim3(kDinoThreads), 0,
                stream, q);
    st = cudaGetLastError();
    if (st != cudaSuccess) return st;
    SDMP_DISPATCH_DTYPE(q.dtype, st = launch_grad<scalar_t>(q, stream));
  }
  if (st != cudaSuccess) return st;
  return launch_merge_and_terms(p, stream, false);
}

Status dino_student_grad(const DinoParams& p, Stream stream) {
  Status st = cudaSuccess;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch_grad<scalar_t>(p, stream));
  return st;
}

Status dino_grad_fixup(const DinoParams& p, const bool active[3], Stream stream) {
  auto dk = grad_decide_kernel;
  SDMP_LAUNCH(dk, dim3(1), dim3(kWarpSize), 0, stream, p, active[0], active[1], active[2]);
  Status st = cudaGetLastError();
  if (st != cudaSuccess) return st;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch_scale<scalar_t>(p, stream));
  if (st != cudaSuccess) return st;
  DinoParams q = p;  // recompute (mode 2) reads the control word written above
  q.mode = p.ctl;
  q.run_mode = 2;
  return dino_student_grad(q, stream);
}

Status dino_merge_and_terms(const DinoParams& p, Stream stream, bool merge) {
  return launch_merge_and_terms(p, stream, merge);
}

}  // namespace sdmp