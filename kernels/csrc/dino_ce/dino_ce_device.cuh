// Device code shared by the SDMP-DINO kernels (dino_ce_kernel.cu: teacher statistics, the pair-block paths,
// the backward; dino_cluster_kernel.cu: the cluster forward). See dino_ce.h for the layout.
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
#pragma once

#include "../common/sdmp_cuda.cuh"
#include "dino_ce.h"

namespace sdmp {
// Internal linkage on purpose: both kernel files include these helpers, and in the CPU emulation build (where
// __device__ is empty) they would otherwise be defined twice.
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

// Empty: no column yet. A state whose columns were all -inf holds NaN (x - m = -inf - -inf) and is not empty:
// the loss of a -inf student logit is not finite, as the reference's (inf, or NaN where its target is 0).
__device__ __forceinline__ bool acc_is_empty(const RowAcc& a) { return a.m == -INFINITY && a.s == 0.f; }

__device__ __forceinline__ void acc_fold(RowAcc& r, const RowAcc& a) {
  if (acc_is_empty(a)) return;  // s = d = q = 0
  const float dm = a.m - r.m;
  r.s += a.s * __expf(dm);
  r.d1 += a.d1 + a.q1 * dm;
  r.q1 += a.q1;
  r.d2 += a.d2 + a.q2 * dm;
  r.q2 += a.q2;
}

__device__ __forceinline__ RowAcc acc_merge(const RowAcc& a, const RowAcc& b) {
  RowAcc r{fmaxf(a.m, b.m), 0.f, 0.f, 0.f, 0.f, 0.f};
  if (acc_is_empty(a) && acc_is_empty(b)) return acc_empty();
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

// A clean global crop is paired with every other teacher crop: with one teacher crop, crop 0 (the teacher's own
// view) is in no pair. Its row is still streamed with its pair's rows but adds nothing, whatever it holds: no
// loss, a zero gradient (a NaN or -inf there made the terms NaN, as 0 x inf; the reference never reads it).
__device__ __forceinline__ bool row_unpaired(const DinoParams& p, int v) { return p.T == 1 && v == 0 && p.Sc > 0; }

template <typename T, int VEC>
__device__ __forceinline__ void zero_row(T* dst, int64_t kcount, int lane) {
  float z[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) z[j] = 0.f;
  for (int64_t lc = static_cast<int64_t>(lane) * VEC; lc < kcount; lc += static_cast<int64_t>(kWarpSize) * VEC)
    store_floats<T, VEC>(dst + lc, z);
}

__device__ __forceinline__ RowTargets row_targets(const DinoParams& p, int v) {
  if (v >= p.Sc) return RowTargets{kSlotSrc, p.t_mixed != nullptr ? kSlotMix : -1, true};
  if (v < p.T) return RowTargets{kSlotGlobal + v, -1, false};
  return RowTargets{kSlotA, -1, false};
}

// ---------------------------------------------------------------------------------------------- the units

// Student rows stream through registers kLoadGroup packs at a time: every lane issues that many 16-byte loads
// before using any, which keeps enough bytes in flight to cover HBM latency at modest occupancy.
constexpr int kLoadGroup = 4;

// One warp's pass over a row slice [0, kcount) (src already offset): the loads of kLoadGroup packs first, then
// fn(pack, column) for each.
template <typename T, int VEC, typename Fn>
__device__ __forceinline__ void for_each_row_pack(const T* src, int64_t kcount, int lane, Fn&& fn) {
  constexpr int64_t kStride = static_cast<int64_t>(kWarpSize) * VEC;
  for (int64_t base = static_cast<int64_t>(lane) * VEC; base < kcount; base += kLoadGroup * kStride) {
    Pack<T, VEC> raw[kLoadGroup];
#pragma unroll
    for (int g = 0; g < kLoadGroup; ++g)
      if (base + g * kStride < kcount) raw[g] = load_pack<T, VEC>(src + base + g * kStride);
#pragma unroll
    for (int g = 0; g < kLoadGroup; ++g) {
      const int64_t lc = base + g * kStride;
      if (lc >= kcount) break;
      fn(raw[g], lc);
    }
  }
}

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
  RowAcc acc = acc_empty();
  for_each_row_pack<T, VEC>(src, kcount, lane, [&](const Pack<T, VEC>& raw, int64_t lc) {
    stats_pack<T, VEC, kTwo>(p, raw, t1, t2, lc, acc);
  });
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
  const bool unpaired = row_unpaired(p, row / p.B);
  const float h1 = unpaired ? 0.f : acc.q1 * ls - acc.d1, h2 = acc.q2 * ls - acc.d2;  // H = -sum t (x - lse)
  const bool mixed = row / p.B >= p.Sc;
  float* st = p.row_stat + static_cast<int64_t>(row) * 4;
  st[0] = acc.m;  // an unpaired row's are never read: its gradient is written as zeros
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
  const float m = load_coherent(stat + 0), ls = load_coherent(stat + 1);
  const float csm = c1 * load_coherent(stat + 2) + (kTwo ? c2 * load_coherent(stat + 3) : 0.f);
  for_each_row_pack<T, VEC>(src, kcount, lane, [&](const Pack<T, VEC>& raw, int64_t lc) {
    grad_pack<T, VEC, kTwo>(p, raw, t1, t2, lc, c1, c2, csm, m, ls, dst + lc);
  });
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
    if (row_unpaired(p, v)) {
      zero_row<T, VEC>(dst + k0, kcount, lane);
      continue;
    }
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

}  // namespace
}  // namespace sdmp
