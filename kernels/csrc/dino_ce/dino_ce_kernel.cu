// Fused SDMP-DINO soft-target cross-entropy kernels (see dino_ce.h for the layout).
//
// Every pair loss is H(target, student) = -sum_k target_k * log_softmax(x)_k, x = student / tau_s. For one
// student row all its pairs collapse into at most two target vectors (linearity of H in the target):
//   clean global crop v < T : GL_v = sum_{iq != v} P_t[iq, b]           (DINO, same-view pair excluded)
//   clean local crop        : A    = sum_iq P_t[iq, b]
//   mixed crop              : SRC  = lam_b A_b + (1 - lam_b) A_p        (eq. 7, summed over teacher crops)
//                             MIX  = w1_b Am_b + w2_b Am_p              (eq. 8, Am = sum_iq P_tm[iq, .])
// with p = B - 1 - b. A block owns the pair {b, p} and a column block: it builds these vectors once in shared
// memory (one exp per teacher element), then streams every student row of b and p against them.
//
// Per row we keep m = max x, s = sum exp(x - m), and per target q = sum t, d = sum t (x - m); then
//   H = q log(s) - d,   dH/dx = q softmax(x) - t,
// the same expression the reference evaluates (-sum t (x - lse)), without cancelling two large numbers.
//
// Scalars follow PyTorch's CUDA rounding so that the kernels match the eager reference: dividing a tensor by a
// Python float is a multiplication by the fp32 reciprocal, and student / tau_s is rounded to the logits dtype.
#include "../common/sdmp_cuda.cuh"
#include "dino_ce.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

namespace sdmp {
namespace {

constexpr int kTeacherPacksPerLane = 2;  // teacher-stats column tile = 32 lanes x VEC x 2
constexpr int kTeacherRowsPerGroup = 64;
constexpr int kAccFloats = 6;  // partial row state: m, s, d1, q1, d2, q2
constexpr int kSlotA = 0, kSlotSrc = 1, kSlotMix = 2, kSlotGlobal = 3;
constexpr int64_t kGatedGradBlocks = 528;  // grid of the backward's mode-gated launches (4 per SM of an H100)

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ int num_slots(const DinoParams& p) { return kSlotGlobal + p.T; }

// Pairs of this launch (the chunked path launches a range of them).
__host__ __device__ __forceinline__ int launch_pairs(const DinoParams& p) {
  return p.pair_count > 0 ? p.pair_count : p.npairs;
}

// Shared-memory target vector `slot` of pair row r (0: b, 1: partner).
__device__ __forceinline__ float* target_slot(const DinoParams& p, float* tg, int r, int slot) {
  return tg + (static_cast<int64_t>(r) * num_slots(p) + slot) * p.kb_cols;
}

// Position of block column lc in a target vector. With 8-wide student packs the two 4-float halves of a lane's
// pack are stored 128 floats apart, so the 16-byte shared loads of a warp hit consecutive addresses (no bank
// conflicts); narrower packs are consecutive already.
template <int VEC>
__device__ __forceinline__ int64_t tg_pos(int64_t lc) {
  if constexpr (VEC == 8) {
    const int64_t w = lc & 255;
    return (lc & ~int64_t{255}) + ((w & 4) << 5) + ((w >> 3) << 2) + (w & 3);
  } else {
    return lc;
  }
}

// The VEC target values of the student pack starting at block column lc (a multiple of VEC).
template <int VEC>
__device__ __forceinline__ void load_targets(const float* vec, int64_t lc, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const Pack<float, 4> q = *reinterpret_cast<const Pack<float, 4>*>(vec + tg_pos<VEC>(lc + i));
#pragma unroll
      for (int j = 0; j < 4; ++j) out[i + j] = q.v[j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = vec[tg_pos<VEC>(lc + i)];
  }
}

// TV (1 or 4) consecutive target values from block column lc (TV == 4: lc is a multiple of 4).
template <int VEC, int TV>
__device__ __forceinline__ void store_targets(float* vec, int64_t lc, const float (&in)[TV]) {
  if constexpr (TV == 4) {
    Pack<float, 4> q;
#pragma unroll
    for (int j = 0; j < 4; ++j) q.v[j] = in[j];
    *reinterpret_cast<Pack<float, 4>*>(vec + tg_pos<VEC>(lc)) = q;
  } else {
    vec[tg_pos<VEC>(lc)] = in[0];
  }
}

template <int VEC, int TV>
__device__ __forceinline__ void load_targets_tv(const float* vec, int64_t lc, float (&out)[TV]) {
  if constexpr (TV == 4) {
    const Pack<float, 4> q = *reinterpret_cast<const Pack<float, 4>*>(vec + tg_pos<VEC>(lc));
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = q.v[j];
  } else {
    out[0] = vec[tg_pos<VEC>(lc)];
  }
}

template <typename T>
__device__ __forceinline__ const T* student_row(const DinoParams& p, int v, int b) {
  if (v < p.Sc) return static_cast<const T*>(p.s_clean) + (static_cast<int64_t>(v) * p.B + b) * p.K;
  return static_cast<const T*>(p.s_mixed) + (static_cast<int64_t>(v - p.Sc) * p.B + b) * p.K;
}

template <typename T>
__device__ __forceinline__ T* grad_row(const DinoParams& p, int v, int b) {
  if (v < p.Sc) {
    if (p.g_clean == nullptr) return nullptr;
    return static_cast<T*>(p.g_clean) + (static_cast<int64_t>(v) * p.B + b) * p.K;
  }
  if (p.g_mixed == nullptr) return nullptr;
  return static_cast<T*>(p.g_mixed) + (static_cast<int64_t>(v - p.Sc) * p.B + b) * p.K;
}

// ------------------------------------------------------------------------------------------ row accumulator

struct RowAcc {
  float m, s, d1, q1, d2, q2;
};

__device__ __forceinline__ RowAcc acc_empty() { return RowAcc{-INFINITY, 0.f, 0.f, 0.f, 0.f, 0.f}; }

__device__ __forceinline__ void store_acc(float* out, const RowAcc& a) {
  out[0] = a.m, out[1] = a.s, out[2] = a.d1, out[3] = a.q1, out[4] = a.d2, out[5] = a.q2;
}

__device__ __forceinline__ RowAcc read_acc(const float* in) {
  return RowAcc{in[0], in[1], in[2], in[3], in[4], in[5]};
}

template <int VEC, bool kTwo>
__device__ __forceinline__ void acc_update(RowAcc& a, const float (&x)[VEC], const float (&t1)[VEC],
                                           const float (&t2)[VEC]) {
  float pm = x[0];
#pragma unroll
  for (int j = 1; j < VEC; ++j) pm = fmaxf(pm, x[j]);
  if (pm > a.m) {
    if (a.m != -INFINITY) {  // re-reference s and d to the new max
      const float dm = a.m - pm;
      a.s *= __expf(dm);
      a.d1 += a.q1 * dm;
      if (kTwo) a.d2 += a.q2 * dm;
    }
    a.m = pm;
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float e = x[j] - a.m;
    a.s += __expf(e);
    a.d1 += t1[j] * e;
    a.q1 += t1[j];
    if (kTwo) {
      a.d2 += t2[j] * e;
      a.q2 += t2[j];
    }
  }
}

__device__ __forceinline__ void acc_fold(RowAcc& r, const RowAcc& a) {
  if (a.m == -INFINITY) return;  // empty (no columns): s = d = q = 0
  const float dm = a.m - r.m;
  r.s += a.s * __expf(dm);
  r.d1 += a.d1 + a.q1 * dm;
  r.q1 += a.q1;
  r.d2 += a.d2 + a.q2 * dm;
  r.q2 += a.q2;
}

__device__ __forceinline__ RowAcc acc_merge(const RowAcc& a, const RowAcc& b) {
  RowAcc r{fmaxf(a.m, b.m), 0.f, 0.f, 0.f, 0.f, 0.f};
  if (r.m == -INFINITY) return acc_empty();
  acc_fold(r, a);
  acc_fold(r, b);
  return r;
}

__device__ __forceinline__ RowAcc warp_acc_merge(RowAcc a) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    RowAcc b{__shfl_xor_sync(0xffffffffu, a.m, o),  __shfl_xor_sync(0xffffffffu, a.s, o),
             __shfl_xor_sync(0xffffffffu, a.d1, o), __shfl_xor_sync(0xffffffffu, a.q1, o),
             __shfl_xor_sync(0xffffffffu, a.d2, o), __shfl_xor_sync(0xffffffffu, a.q2, o)};
    a = acc_merge(a, b);
  }
  return a;
}

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

// ------------------------------------------------------------------------------------------ target vectors

// Fills the shared target vectors of pair `pair` for block columns [0, kcount) (global k0 + lc), TV columns at
// a time (4, or 1 on the scalar path). Each thread writes and re-reads only its own columns here; the caller
// synchronises before other threads read them.
// local_lse (cluster forward with folded teacher statistics): the pair's teacher rows' (max, log sum) in shared
// memory, clean row (r, iq) at r * T + iq and mixed at 2T + r * T + iq, instead of p.lse_t; it also adds the
// pair's clean teacher logits / (T * B) to p.center_mean (zeroed before the launch).
template <typename T, int VEC>
__device__ void build_targets(const DinoParams& p, int pair, int64_t k0, int64_t kcount, float* tg,
                              const float* local_lse = nullptr) {
  constexpr int TV = VEC >= 4 ? 4 : 1;
  const int B = p.B, TB = p.T * p.B;
  const int rows[2] = {pair, B - 1 - pair};
  const int ng = imin(p.T, p.Sc);
  const bool has_mix = p.Sm > 0, has_tm = p.t_mixed != nullptr;
  const T* tc = static_cast<const T*>(p.t_clean);
  const T* tm = static_cast<const T*>(p.t_mixed);
  const float inv_tb = 1.f / static_cast<float>(TB);
  for (int64_t lc = static_cast<int64_t>(threadIdx.x) * TV; lc < kcount; lc += static_cast<int64_t>(blockDim.x) * TV) {
    const int64_t col = k0 + lc;
    float c[TV], csum[TV];
#pragma unroll
    for (int j = 0; j < TV; ++j) c[j] = p.center[col + j], csum[j] = 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int b = rows[r];
      float P[kDinoMaxTeacher][TV], A[TV];
#pragma unroll
      for (int j = 0; j < TV; ++j) A[j] = 0.f;
#pragma unroll
      for (int iq = 0; iq < kDinoMaxTeacher; ++iq) {
        if (iq >= p.T) break;
        const int trow = iq * B + b;
        const float* L = local_lse != nullptr ? local_lse + (r * p.T + iq) * 2 : p.lse_t + trow * 2;
        const float tmax = L[0], tls = L[1];
        float v[TV];
        load_floats<T, TV>(tc + static_cast<int64_t>(trow) * p.K + col, v);
#pragma unroll
        for (int j = 0; j < TV; ++j) {
          if (r == 0 || rows[1] != rows[0]) csum[j] += v[j];  // the middle row of an odd batch counts once
          P[iq][j] = __expf(((v[j] - c[j]) * p.inv_tau_t - tmax) - tls);
          A[j] += P[iq][j];
        }
      }
      store_targets<VEC, TV>(target_slot(p, tg, r, kSlotA), lc, A);
#pragma unroll
      for (int v = 0; v < kDinoMaxTeacher; ++v) {
        if (v >= ng) break;
        float gl[TV];  // DINO pairs of global crop v: every other teacher crop
#pragma unroll
        for (int j = 0; j < TV; ++j) gl[j] = 0.f;
#pragma unroll
        for (int iq = 0; iq < kDinoMaxTeacher; ++iq) {
          if (iq >= p.T) break;
          if (iq == v) continue;
#pragma unroll
          for (int j = 0; j < TV; ++j) gl[j] += P[iq][j];
        }
        store_targets<VEC, TV>(target_slot(p, tg, r, kSlotGlobal + v), lc, gl);
      }
      if (has_mix && has_tm) {  // Am parked in the MIX slot until both rows are known
        float am[TV];
#pragma unroll
        for (int j = 0; j < TV; ++j) am[j] = 0.f;
#pragma unroll
        for (int iq = 0; iq < kDinoMaxTeacher; ++iq) {
          if (iq >= p.T) break;
          const int trow = TB + iq * B + b;
          const float* L = local_lse != nullptr ? local_lse + (2 * p.T + r * p.T + iq) * 2 : p.lse_t + trow * 2;
          const float tmax = L[0], tls = L[1];
          float v[TV];
          load_floats<T, TV>(tm + static_cast<int64_t>(iq * B + b) * p.K + col, v);
#pragma unroll
          for (int j = 0; j < TV; ++j) am[j] += __expf(((v[j] - c[j]) * p.inv_tau_t - tmax) - tls);
        }
        store_targets<VEC, TV>(target_slot(p, tg, r, kSlotMix), lc, am);
      }
    }
    if (local_lse != nullptr) {  // order across pairs varies: the center statistic is not bitwise reproducible
#pragma unroll
      for (int j = 0; j < TV; ++j) atomicAdd(p.center_mean + col + j, csum[j] * inv_tb);
    }
    if (!has_mix) continue;
    // Source target (eq. 7) and mix-teacher target (eq. 8) of both rows, from this thread's A / Am.
    const float lam[2] = {p.lam[rows[0]], p.lam[rows[1]]};
    float a[2][TV];
    load_targets_tv<VEC, TV>(target_slot(p, tg, 0, kSlotA), lc, a[0]);
    load_targets_tv<VEC, TV>(target_slot(p, tg, 1, kSlotA), lc, a[1]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float src[TV];
#pragma unroll
      for (int j = 0; j < TV; ++j) src[j] = lam[r] * a[r][j] + (1.f - lam[r]) * a[1 - r][j];
      store_targets<VEC, TV>(target_slot(p, tg, r, kSlotSrc), lc, src);
    }
    if (!has_tm) continue;
    float am[2][TV];
    load_targets_tv<VEC, TV>(target_slot(p, tg, 0, kSlotMix), lc, am[0]);
    load_targets_tv<VEC, TV>(target_slot(p, tg, 1, kSlotMix), lc, am[1]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // c = min(lam_i, 1 - lam_p) + min(1 - lam_i, lam_p); w1 = 1/(1+c), w2 = c/(1+c) (losses.mix_mix_weights)
      const float li = lam[r], lq = lam[1 - r];
      const float cc = fminf(li, 1.f - lq) + fminf(1.f - li, lq);
      const float w1 = 1.f / (1.f + cc), w2 = cc / (1.f + cc);
      float mix[TV];
#pragma unroll
      for (int j = 0; j < TV; ++j) mix[j] = w1 * am[r][j] + w2 * am[1 - r][j];
      store_targets<VEC, TV>(target_slot(p, tg, r, kSlotMix), lc, mix);
    }
  }
}

// Which shared vectors a student row uses: slot1 always, slot2 only for mixed rows with a mixed teacher.
struct RowTargets {
  int slot1, slot2;  // slot2 < 0: none
  bool mixed;
};

__device__ __forceinline__ RowTargets row_targets(const DinoParams& p, int v) {
  if (v >= p.Sc) return RowTargets{kSlotSrc, p.t_mixed != nullptr ? kSlotMix : -1, true};
  if (v < p.T) return RowTargets{kSlotGlobal + v, -1, false};
  return RowTargets{kSlotA, -1, false};
}

// ---------------------------------------------------------------------------------------------- the units

// Student rows stream through registers kLoadGroup packs at a time: every lane issues that many 16-byte loads
// before using any, which keeps enough bytes in flight to cover HBM latency at modest occupancy.
constexpr int kLoadGroup = 4;

// Folds one pack of a student row (block column lc) into its partial state: x = student / tau_s against the
// row's one or two target vectors.
template <typename T, int VEC, bool kTwo>
__device__ __forceinline__ void stats_pack(const DinoParams& p, const Pack<T, VEC>& raw, const float* t1,
                                           const float* t2, int64_t lc, RowAcc& acc) {
  float x[VEC], a1[VEC], a2[VEC];
  unpack_floats<T, VEC>(raw, x);
#pragma unroll
  for (int j = 0; j < VEC; ++j) x[j] = round_through<T>(x[j] * p.inv_tau_s);  // student / tau_s
  load_targets<VEC>(t1, lc, a1);
  if (kTwo) load_targets<VEC>(t2, lc, a2);
  acc_update<VEC, kTwo>(acc, x, a1, a2);
}

// Partial statistics of one student row over the block columns [0, kcount) (src already offset by k0).
template <typename T, int VEC, bool kTwo>
__device__ __forceinline__ RowAcc stats_row(const DinoParams& p, const T* src, const float* t1, const float* t2,
                                            int64_t kcount, int lane) {
  constexpr int64_t kStride = static_cast<int64_t>(kWarpSize) * VEC;
  RowAcc acc = acc_empty();
  for (int64_t base = static_cast<int64_t>(lane) * VEC; base < kcount; base += kLoadGroup * kStride) {
    Pack<T, VEC> raw[kLoadGroup];
#pragma unroll
    for (int g = 0; g < kLoadGroup; ++g)
      if (base + g * kStride < kcount) raw[g] = load_pack<T, VEC>(src + base + g * kStride);
#pragma unroll
    for (int g = 0; g < kLoadGroup; ++g) {
      const int64_t lc = base + g * kStride;
      if (lc >= kcount) break;
      stats_pack<T, VEC, kTwo>(p, raw[g], t1, t2, lc, acc);
    }
  }
  return warp_acc_merge(acc);
}

// Number of student rows of a pair and the (crop, batch row, pair slot) of the rr-th.
struct PairRows {
  int b, partner;
  int nr;     // 1 when the pair is the middle sample of an odd batch (its own partner)
  int count;  // (Sc + Sm) * nr
  __device__ __forceinline__ int row(int r) const { return r == 0 ? b : partner; }  // no local-memory array
};

__device__ __forceinline__ PairRows pair_rows(const DinoParams& p, int pair) {
  PairRows pr;
  pr.b = pair;
  pr.partner = p.B - 1 - pair;
  pr.nr = pr.b == pr.partner ? 1 : 2;
  pr.count = (p.Sc + p.Sm) * pr.nr;
  return pr;
}

template <typename T, int VEC>
__device__ void stats_unit(const DinoParams& p, int pair, int kb, float* tg) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  const int64_t k0 = static_cast<int64_t>(kb) * p.kb_cols;
  const int64_t kcount = p.K - k0 < p.kb_cols ? p.K - k0 : p.kb_cols;
  build_targets<T, VEC>(p, pair, k0, kcount, tg);
  __syncthreads();
  const PairRows pr = pair_rows(p, pair);
  for (int rr = warp; rr < pr.count; rr += nwarps) {
    const int v = rr / pr.nr, r = rr % pr.nr, b = pr.row(r);
    const RowTargets rt = row_targets(p, v);
    const T* src = student_row<T>(p, v, b) + k0;
    const float* t1 = target_slot(p, tg, r, rt.slot1);
    RowAcc acc;
    if (rt.slot2 >= 0) {
      acc = stats_row<T, VEC, true>(p, src, t1, target_slot(p, tg, r, rt.slot2), kcount, lane);
    } else {
      acc = stats_row<T, VEC, false>(p, src, t1, t1, kcount, lane);
    }
    if (lane == 0) store_acc(p.s_part + (static_cast<int64_t>(v * p.B + b) * p.n_kblocks + kb) * kAccFloats, acc);
  }
}

// The merged state of student row `row` with ls = log s: its statistics (m, log s, q1, q2) for the gradient
// and the backward, and its contribution to the three loss terms.
__device__ __forceinline__ void publish_row(const DinoParams& p, int row, const RowAcc& acc, float ls) {
  const float h1 = acc.q1 * ls - acc.d1, h2 = acc.q2 * ls - acc.d2;  // H = -sum t (x - lse)
  const bool mixed = row / p.B >= p.Sc;
  float* st = p.row_stat + static_cast<int64_t>(row) * 4;
  st[0] = acc.m;
  st[1] = ls;
  st[2] = acc.q1;
  st[3] = acc.q2;
  float* rl = p.row_loss + static_cast<int64_t>(row) * 3;
  rl[0] = mixed ? 0.f : h1;
  rl[1] = mixed ? p.w_src * h1 : 0.f;
  rl[2] = mixed ? p.w_mix * h2 : 0.f;
}

// One warp: merges the column-block partials of a student row into (m, log s, q1, q2) and its loss terms.
__device__ void merge_row(const DinoParams& p, int row, int lane) {
  RowAcc acc = acc_empty();
  for (int kb = lane; kb < p.n_kblocks; kb += kWarpSize) {
    const float* in = p.s_part + (static_cast<int64_t>(row) * p.n_kblocks + kb) * kAccFloats;
    const RowAcc part{load_coherent(in + 0), load_coherent(in + 1), load_coherent(in + 2),
                      load_coherent(in + 3), load_coherent(in + 4), load_coherent(in + 5)};
    acc = acc_merge(acc, part);
  }
  acc = warp_acc_merge(acc);
  if (lane == 0) publish_row(p, row, acc, logf(acc.s));
}

// Gradient of one pack of a student row (block column lc): csm softmax - c1 target1 - c2 target2, with
// csm = c1 q1 + c2 q2 and the row's (max, log sum) of student / tau_s.
template <typename T, int VEC, bool kTwo>
__device__ __forceinline__ void grad_pack(const DinoParams& p, const Pack<T, VEC>& raw, const float* t1,
                                          const float* t2, int64_t lc, float c1, float c2, float csm, float m,
                                          float ls, T* dst) {
  float x[VEC], a1[VEC], a2[VEC];
  unpack_floats<T, VEC>(raw, x);
  load_targets<VEC>(t1, lc, a1);
  if (kTwo) load_targets<VEC>(t2, lc, a2);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float xs = round_through<T>(x[j] * p.inv_tau_s);
    float g_ = csm * __expf((xs - m) - ls) - c1 * a1[j];
    if (kTwo) g_ -= c2 * a2[j];
    x[j] = g_;
  }
  store_floats<T, VEC>(dst, x);
}

// Gradient of one student row over the block columns: c1 (q1 c1 + q2 c2 scaled softmax - target 1) etc.
template <typename T, int VEC, bool kTwo>
__device__ __forceinline__ void grad_row_write(const DinoParams& p, const T* src, T* dst, const float* t1,
                                               const float* t2, float c1, float c2, const float* stat,
                                               int64_t kcount, int lane) {
  constexpr int64_t kStride = static_cast<int64_t>(kWarpSize) * VEC;
  const float m = load_coherent(stat + 0), ls = load_coherent(stat + 1);
  const float csm = c1 * load_coherent(stat + 2) + (kTwo ? c2 * load_coherent(stat + 3) : 0.f);
  for (int64_t base = static_cast<int64_t>(lane) * VEC; base < kcount; base += kLoadGroup * kStride) {
    Pack<T, VEC> raw[kLoadGroup];
#pragma unroll
    for (int g = 0; g < kLoadGroup; ++g)
      if (base + g * kStride < kcount) raw[g] = load_pack<T, VEC>(src + base + g * kStride);
#pragma unroll
    for (int g = 0; g < kLoadGroup; ++g) {
      const int64_t lc = base + g * kStride;
      if (lc >= kcount) break;
      grad_pack<T, VEC, kTwo>(p, raw[g], t1, t2, lc, c1, c2, csm, m, ls, dst + lc);
    }
  }
}

// Gradient of every student row of `pair` over column block kb. With wait_pair, first waits until the pair's
// row statistics are published by the fused forward (the targets are built meanwhile).
template <typename T, int VEC>
__device__ void grad_unit(const DinoParams& p, int pair, int kb, float* tg, bool wait_pair) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  const int64_t k0 = static_cast<int64_t>(kb) * p.kb_cols;
  const int64_t kcount = p.K - k0 < p.kb_cols ? p.K - k0 : p.kb_cols;
  build_targets<T, VEC>(p, pair, k0, kcount, tg);
  if (wait_pair && threadIdx.x == 0) {
    const int* ready = p.counters + 1 + p.npairs + pair;
    while (load_flag(ready) == 0) backoff();
    __threadfence();
  }
  __syncthreads();
  const float base = p.inv_tau_s * p.pair_norm;
  const float g_dino = p.gw[0] * base, g_src = p.gw[1] * base * p.w_src, g_mix = p.gw[2] * base * p.w_mix;
  const PairRows pr = pair_rows(p, pair);
  for (int rr = warp; rr < pr.count; rr += nwarps) {
    const int v = rr / pr.nr, r = rr % pr.nr, b = pr.row(r);
    T* dst = grad_row<T>(p, v, b);
    if (dst == nullptr) continue;
    const RowTargets rt = row_targets(p, v);
    const T* src = student_row<T>(p, v, b) + k0;
    const float* stat = p.row_stat + static_cast<int64_t>(v * p.B + b) * 4;
    const float* t1 = target_slot(p, tg, r, rt.slot1);
    if (rt.slot2 >= 0) {
      grad_row_write<T, VEC, true>(p, src, dst + k0, t1, target_slot(p, tg, r, rt.slot2), g_src, g_mix, stat,
                                   kcount, lane);
    } else {
      grad_row_write<T, VEC, false>(p, src, dst + k0, t1, t1, rt.mixed ? g_src : g_dino, 0.f, stat, kcount, lane);
    }
  }
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

// ------------------------------------------------------------------------------------- cluster forward (sm_90)
//
// One thread-block cluster per pair {b, B-1-b}; its C blocks split the K columns (kb_cols = threads x VEC x PPT
// each) and keep their slice of the pair's target vectors in shared memory. Student rows go through in rounds
// of kClusterRows: every thread loads its PPT packs of each row of the round into registers, the block reduces
// its partial row states, the cluster exchanges them through distributed shared memory (every block merges all
// C partials in the same order, so all agree bit for bit), and the gradient is written from the registers. Student
// logits are read from HBM once and the gradient written once: the traffic floor of the loss, where the
// two-launch path reads the logits twice and the teacher three times.
constexpr int kClusterRows = 8;
constexpr int kClusterTeacherRows = 4 * kDinoMaxTeacher;  // clean + mixed teacher rows of both rows of a pair

// Folded teacher statistics (p.fold_teacher): the (max, log sum) of u = (t - center) / tau_t of the pair's
// teacher rows, clean (r, iq) at r * T + iq and mixed at 2T + r * T + iq, merged over the cluster's column
// blocks into tstat (every block gets the same bits); rank 0 also writes them to p.lse_t for the
// backward. One warp per row over this block's columns; the rows are re-read right after, by build_targets,
// mostly from L1/L2: the teacher comes from HBM once instead of twice (separate statistics launch).
template <typename T, int VEC>
__device__ void cluster_teacher_stats(const DinoParams& p, int pair, int64_t k0, int64_t kcount, float* tpart,
                                      float* tstat, int C) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  const int rows[2] = {pair, p.B - 1 - pair};
  const int per_kind = 2 * p.T, nrows = (p.t_mixed != nullptr ? 2 : 1) * per_kind;
  for (int lr = warp; lr < nrows; lr += nwarps) {
    const bool mixed = lr >= per_kind;
    const int r = (lr % per_kind) / p.T, iq = lr % p.T;
    const T* src = static_cast<const T*>(mixed ? p.t_mixed : p.t_clean) +
                   (static_cast<int64_t>(iq) * p.B + rows[r]) * p.K + k0;
    Lse st{-INFINITY, 0.f};
    for (int64_t lc = static_cast<int64_t>(lane) * VEC; lc < kcount; lc += kWarpSize * VEC) {
      float v[VEC];
      load_floats<T, VEC>(src + lc, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = (v[j] - p.center[k0 + lc + j]) * p.inv_tau_t;
      lse_update<VEC>(st, v);
    }
    st = warp_lse(st);
    if (lane == 0) tpart[lr * 2] = st.m, tpart[lr * 2 + 1] = st.s;
  }
  cluster_sync();  // every block's partials written and visible
  for (int lr = warp; lr < nrows; lr += nwarps) {  // lane c reads block c's partial; same bits in every block
    Lse st{-INFINITY, 0.f};
    if (lane < C) {
      const float* q = cluster_map(tpart, lane) + lr * 2;
      st = Lse{q[0], q[1]};
    }
    st = warp_lse(st);
    if (lane == 0) {
      const float ls = logf(st.s);
      tstat[lr * 2] = st.m, tstat[lr * 2 + 1] = ls;
      if (cluster_rank() == 0) {
        const bool mixed = lr >= per_kind;
        const int r = (lr % per_kind) / p.T, iq = lr % p.T;
        const int64_t trow = (mixed ? static_cast<int64_t>(p.T) * p.B : 0) + static_cast<int64_t>(iq) * p.B + rows[r];
        p.lse_t[trow * 2] = st.m, p.lse_t[trow * 2 + 1] = ls;
      }
    }
  }
  __syncthreads();  // tstat ready for build_targets (tpart stays untouched until the final cluster barrier)
}

// One round of student rows [r0, r0 + R) of a cluster block: loads into registers, partial statistics, the
// block and cluster merges, the gradient from the registers. Split in steps so that the pipelined kernel can
// issue the next round's loads before this round's barriers.
template <typename T, int VEC, int PPT, int R>
struct ClusterRounds {
  using Raw = Pack<T, VEC>[R][PPT];
  const DinoParams& p;
  PairRows pr;
  float *tg, *part, *wpart, *fin;
  int64_t k0, kcount;
  int lane, warp, nwarps, C, rank;
  float g_dino, g_src, g_mix;

  __device__ __forceinline__ void load(Raw& raw, int r0) const {
#pragma unroll
    for (int i = 0; i < R; ++i) {  // every load of the round in flight before any is used
      const int rr = r0 + i;
      if (rr >= pr.count) break;
      const T* src = student_row<T>(p, rr / pr.nr, pr.row(rr % pr.nr)) + k0;
#pragma unroll
      for (int u = 0; u < PPT; ++u) {
        const int64_t lc = (static_cast<int64_t>(u) * blockDim.x + threadIdx.x) * VEC;
        if (lc < kcount) raw[i][u] = load_pack<T, VEC>(src + lc);
      }
    }
  }

  __device__ __forceinline__ void stats(const Raw& raw, int r0) const {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int rr = r0 + i;
      if (rr >= pr.count) break;
      const int v = rr / pr.nr, r = rr % pr.nr;
      const RowTargets rt = row_targets(p, v);
      const float* t1 = target_slot(p, tg, r, rt.slot1);
      const float* t2 = rt.slot2 >= 0 ? target_slot(p, tg, r, rt.slot2) : t1;
      RowAcc acc = acc_empty();
#pragma unroll
      for (int u = 0; u < PPT; ++u) {
        const int64_t lc = (static_cast<int64_t>(u) * blockDim.x + threadIdx.x) * VEC;
        if (lc >= kcount) continue;
        if (rt.slot2 >= 0) {
          stats_pack<T, VEC, true>(p, raw[i][u], t1, t2, lc, acc);
        } else {
          stats_pack<T, VEC, false>(p, raw[i][u], t1, t1, lc, acc);
        }
      }
      acc = warp_acc_merge(acc);
      if (lane == 0) store_acc(wpart + (warp * R + i) * kAccFloats, acc);
    }
  }

  // Warp i merges row i: lane w takes warp w's partial, then (after the cluster barrier) lane c block c's, and
  // the butterfly leaves the same bits in every lane and every block (acc_merge is symmetric, and merging an
  // empty state is exact). All C remote reads of a row are in flight at once: one DSMEM round trip, not C.
  // Partials alternate between two buffers by round: a block can only be one round ahead of the slowest.
  __device__ __forceinline__ void merge(int r0, int round) const {
    float* my_part = part + (round & 1) * R * kAccFloats;
    __syncthreads();
    for (int i = warp; i < R && r0 + i < pr.count; i += nwarps) {
      const RowAcc a = lane < nwarps ? read_acc(wpart + (lane * R + i) * kAccFloats) : acc_empty();
      const RowAcc m = warp_acc_merge(a);
      if (lane == 0) store_acc(my_part + i * kAccFloats, m);
    }
    cluster_sync();  // every block's partials of this round are written and visible
    for (int i = warp; i < R && r0 + i < pr.count; i += nwarps) {
      const RowAcc a = lane < C ? read_acc(cluster_map(my_part, lane) + i * kAccFloats) : acc_empty();
      const RowAcc m = warp_acc_merge(a);
      if (lane == 0) {
        const int rr = r0 + i;
        const int v = rr / pr.nr, b = pr.row(rr % pr.nr), row = v * p.B + b;
        const float ls = logf(m.s);
        fin[i * 4 + 0] = m.m;
        fin[i * 4 + 1] = ls;
        fin[i * 4 + 2] = m.q1;
        fin[i * 4 + 3] = m.q2;
        if (rank == 0) publish_row(p, row, m, ls);  // one block writes what the backward and the terms read
      }
    }
    __syncthreads();
  }

  __device__ __forceinline__ void grad(const Raw& raw, int r0) const {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int rr = r0 + i;
      if (rr >= pr.count) break;
      const int v = rr / pr.nr, r = rr % pr.nr;
      T* dst = grad_row<T>(p, v, pr.row(r));
      if (dst == nullptr) continue;
      const RowTargets rt = row_targets(p, v);
      const bool two = rt.slot2 >= 0;
      const float* t1 = target_slot(p, tg, r, rt.slot1);
      const float* t2 = two ? target_slot(p, tg, r, rt.slot2) : t1;
      const float c1 = (two || rt.mixed) ? g_src : g_dino, c2 = two ? g_mix : 0.f;
      const float m = fin[i * 4 + 0], ls = fin[i * 4 + 1];
      const float csm = c1 * fin[i * 4 + 2] + (two ? c2 * fin[i * 4 + 3] : 0.f);
#pragma unroll
      for (int u = 0; u < PPT; ++u) {
        const int64_t lc = (static_cast<int64_t>(u) * blockDim.x + threadIdx.x) * VEC;
        if (lc >= kcount) continue;
        if (two) {
          grad_pack<T, VEC, true>(p, raw[i][u], t1, t2, lc, c1, c2, csm, m, ls, dst + k0 + lc);
        } else {
          grad_pack<T, VEC, false>(p, raw[i][u], t1, t2, lc, c1, c2, csm, m, ls, dst + k0 + lc);
        }
      }
    }
  }

  // Pipelined step: statistics of the round in `cur`, then the next round's loads into `next` (in flight during
  // this round's barriers and gradient), then the merges and the gradient.
  __device__ __forceinline__ void step(const Raw& cur, Raw& next, int r0, int round) const {
    stats(cur, r0);
    if (r0 + R < pr.count) load(next, r0 + R);
    merge(r0, round);
    grad(cur, r0);
  }
};

// R student rows per round; kPipe: two register buffers of R rows, the next round loaded during this one (the
// first during the target build).
template <typename T, int VEC, int PPT, int R, bool kPipe>
__global__ void __launch_bounds__(512, 1) cluster_forward_kernel(DinoParams p) {
  static_assert(R <= kClusterRows, "shared memory is laid out for kClusterRows rows per round");
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, nwarps = blockDim.x / kWarpSize;
  const int C = static_cast<int>(gridDim.x);  // a cluster spans the whole x dimension
  const int rank = cluster_rank();
  const int pair = blockIdx.y;
  const int64_t k0 = static_cast<int64_t>(rank) * p.kb_cols;
  const int64_t kcount = p.K - k0 < p.kb_cols ? p.K - k0 : p.kb_cols;
  constexpr int RS = kClusterRows;  // shared-memory layout (the launcher's size) for any R <= RS
  float* tg = reinterpret_cast<float*>(dynamic_smem());
  float* part = tg + static_cast<int64_t>(2) * num_slots(p) * p.kb_cols;  // [2 rounds][RS][kAccFloats]
  float* wpart = part + 2 * RS * kAccFloats;                                // [nwarps][RS][kAccFloats]
  float* fin = wpart + nwarps * RS * kAccFloats;                            // [RS][4] m, log s, q1, q2
  float* tpart = fin + RS * 4;                                              // [kClusterTeacherRows][2]
  float* tstat = tpart + kClusterTeacherRows * 2;                           // [kClusterTeacherRows][2]
  const float base = p.inv_tau_s * p.pair_norm;
  const ClusterRounds<T, VEC, PPT, R> cr{p, pair_rows(p, pair), tg, part, wpart, fin, k0, kcount, lane, warp, nwarps,
                                        C, rank, p.gw[0] * base, p.gw[1] * base * p.w_src,
                                        p.gw[2] * base * p.w_mix};
  const int count = cr.pr.count;
  Pack<T, VEC> a[R][PPT], b[R][PPT];  // round buffers (b: the pipelined kernel's second one)
  if constexpr (kPipe) cr.load(a, 0);  // the first rows in flight while the targets are built
  if (p.fold_teacher) {
    cluster_teacher_stats<T, VEC>(p, pair, k0, kcount, tpart, tstat, C);
    build_targets<T, VEC>(p, pair, k0, kcount, tg, tstat);
  } else {
    build_targets<T, VEC>(p, pair, k0, kcount, tg);
  }
  __syncthreads();
  if constexpr (kPipe) {
    for (int r0 = 0, round = 0; r0 < count; r0 += 2 * R, round += 2) {
      cr.step(a, b, r0, round);
      if (r0 + R >= count) break;
      cr.step(b, a, r0 + R, round + 1);
    }
  } else {
    for (int r0 = 0, round = 0; r0 < count; r0 += R, ++round) {
      cr.load(a, r0);
      cr.stats(a, r0);
      cr.merge(r0, round);
      cr.grad(a, r0);
    }
  }
  cluster_sync();  // no block leaves while another may still read its partials
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Cluster forward: kClusterThreads threads x VEC x PPT columns per block ($SDMP_DINO_CLUSTER_THREADS, a multiple
// of 32, overrides the threads: the CPU tests use small blocks to get several blocks per cluster).
constexpr int kClusterThreads = 512;
constexpr int kMaxClusterBlocks = 16;  // H100's non-portable cluster limit (8 is the portable one)

template <typename T>
constexpr int cluster_ppt() { return sizeof(T) == 4 ? 2 : 1; }  // 16-byte packs: 4096 columns per block


size_t cluster_smem_bytes(const DinoParams& p, int threads) {
  const size_t floats = static_cast<size_t>(2) * (kSlotGlobal + p.T) * p.kb_cols +
                        static_cast<size_t>(2 + threads / kWarpSize) * kClusterRows * kAccFloats + kClusterRows * 4 +
                        4 * kClusterTeacherRows;
  return floats * sizeof(float);
}

#ifndef SDMP_EMULATE
// Launch configuration with clusters of C blocks along x (attr: storage the configuration points to).
cudaLaunchConfig_t cluster_config(cudaLaunchAttribute* attr, int C, dim3 grid, dim3 block, size_t smem,
                                  Stream stream) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(C);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether kernel k can run as clusters of C blocks of `threads` threads with `smem` bytes each on the current
// device (sm_90, code compiled for sm_90, the shared memory and a GPC that fits the cluster), after setting its
// attributes. Asked once per (kernel, size, device): not on every launch, and not inside a CUDA-graph capture
// that follows a warm-up call.
bool cluster_ready(const void* k, size_t smem, int C, int threads) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  using Key = std::tuple<const void*, size_t, int, int, int>;
  static std::mutex mu;
  static std::map<Key, bool> known;
  const Key key{k, smem, C, threads, dev};
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = known.find(key); it != known.end()) return it->second;
  bool ok = false;
  int major = 0, optin = 0;
  cudaFuncAttributes fa;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
      major >= 9 && smem <= static_cast<size_t>(optin) &&
      // the cluster calls compile to no-ops below sm_90: code JIT-compiled from older PTX must not come here
      cudaFuncGetAttributes(&fa, k) == cudaSuccess && fa.ptxVersion >= 90 &&
      cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) == cudaSuccess &&
      (C <= 8 || cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess)) {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_config(&attr, C, dim3(static_cast<unsigned>(C)),
                                                  dim3(static_cast<unsigned>(threads)), smem, nullptr);
    int clusters = 0;  // 0: no GPC fits a cluster of this size with this shared memory
    ok = cudaOccupancyMaxActiveClusters(&clusters, k, &cfg) == cudaSuccess && clusters > 0;
  }
  (void)cudaGetLastError();  // a refusal above is "not here", not an error: the caller takes another path
  known.emplace(key, ok);
  return ok;
}
#endif

// Launches the cluster forward when this card and these shapes allow it; *launched says whether it did.
template <typename T>
Status launch_cluster(DinoParams p, Stream stream, bool* launched) {
  constexpr int V = 16 / sizeof(T), PPT = cluster_ppt<T>();
  *launched = false;
  if (!p.vec_ok) return cudaSuccess;
  const int threads = p.cluster_threads > 0 ? p.cluster_threads : kClusterThreads;
  p.kb_cols = static_cast<int64_t>(threads) * V * PPT;
  const int64_t C = ceil_div(p.K, p.kb_cols);
  if (C > kMaxClusterBlocks) return cudaSuccess;
  const size_t smem = cluster_smem_bytes(p, threads);
  const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(p.npairs)), block(threads);
  // pipelined: rounds of 4 rows, the next one loaded during this one's barriers (untimed).
  auto k = p.cluster_pipeline ? cluster_forward_kernel<T, V, PPT, kClusterRows / 2, true>
                              : cluster_forward_kernel<T, V, PPT, kClusterRows, false>;
#ifdef SDMP_EMULATE
  sdmp_emu::launch_cluster(grid, block, smem, static_cast<unsigned>(C), k, p);
#else
  if (!cluster_ready(reinterpret_cast<const void*>(k), smem, static_cast<int>(C), threads)) return cudaSuccess;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(&attr, static_cast<int>(C), grid, block, smem, stream);
  const Status st = cudaLaunchKernelEx(&cfg, k, p);
  if (st != cudaSuccess) return st;
#endif
  *launched = true;
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

Status dino_cluster_forward(const DinoParams& p, Stream stream, bool* launched) {
  Status st = cudaSuccess;
  *launched = false;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch_cluster<scalar_t>(p, stream, launched));
  if (st != cudaSuccess || !*launched) return st;
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

}  // namespace sdmp
