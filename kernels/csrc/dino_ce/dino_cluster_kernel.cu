// SDMP-DINO forward on thread-block clusters (sm_90): one read of the student logits, the row statistics
// exchanged over distributed shared memory. Shared device code and the math: dino_ce_device.cuh.
#include "dino_ce_device.cuh"

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

namespace sdmp {
namespace {

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
      if (row_unpaired(p, v)) {
        float z[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) z[j] = 0.f;
#pragma unroll
        for (int u = 0; u < PPT; ++u) {
          const int64_t lc = (static_cast<int64_t>(u) * blockDim.x + threadIdx.x) * VEC;
          if (lc < kcount) store_floats<T, VEC>(dst + k0 + lc, z);
        }
        continue;
      }
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

// How many clusters of C blocks of `threads` threads with `smem` bytes each kernel k can hold at once on the
// current device, after setting its attributes: 0 where it cannot run (not sm_90, code not compiled for sm_90,
// too much shared memory, no GPC that fits the cluster). Asked once per (kernel, size, device): not on every
// launch, and not inside a CUDA-graph capture that follows a warm-up call.
int cluster_capacity(const void* k, size_t smem, int C, int threads) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  using Key = std::tuple<const void*, size_t, int, int, int>;
  static std::mutex mu;
  static std::map<Key, int> known;
  const Key key{k, smem, C, threads, dev};
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = known.find(key); it != known.end()) return it->second;
  int clusters = 0;
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
    if (cudaOccupancyMaxActiveClusters(&clusters, k, &cfg) != cudaSuccess) clusters = 0;
  }
  (void)cudaGetLastError();  // a refusal above is "not here", not an error: the caller takes another path
  known.emplace(key, clusters);
  return clusters;
}
#endif

// The cluster forward's launch for p's sizes and settings: blocks of `threads` threads, kb_cols columns each,
// C blocks per cluster (one cluster per pair), smem bytes of shared memory per block.
struct ClusterLaunch {
  void (*kernel)(DinoParams);
  int threads;
  int64_t kb_cols, C;
  size_t smem;
};

template <typename T>
ClusterLaunch cluster_launch(const DinoParams& p) {
  constexpr int V = 16 / sizeof(T), PPT = cluster_ppt<T>();
  ClusterLaunch l;
  l.threads = p.cluster_threads > 0 ? p.cluster_threads : kClusterThreads;
  l.kb_cols = static_cast<int64_t>(l.threads) * V * PPT;
  // A K that one block covers gets a slice of K columns (rounded up to 256, the smallest slice any block size
  // makes), not of threads x VEC x PPT: the shared memory is sized by the slice, and 4 teacher crops at the full
  // 4,096 columns need 233,216 bytes, past the 232,448 a block may have (every load and store is guarded by K).
  l.kb_cols = std::min<int64_t>(l.kb_cols, ceil_div(p.K, int64_t{256}) * 256);
  l.C = ceil_div(p.K, l.kb_cols);
  DinoParams q = p;
  q.kb_cols = l.kb_cols;
  l.smem = cluster_smem_bytes(q, l.threads);
  // pipelined: rounds of 4 rows, the next one loaded during this one's barriers (untimed).
  l.kernel = p.cluster_pipeline ? cluster_forward_kernel<T, V, PPT, kClusterRows / 2, true>
                                : cluster_forward_kernel<T, V, PPT, kClusterRows, false>;
  return l;
}

// Launches the cluster forward when this card and these shapes allow it; *launched says whether it did.
template <typename T>
Status launch_cluster(DinoParams p, Stream stream, bool* launched) {
  *launched = false;
  if (!p.vec_ok) return cudaSuccess;
  const ClusterLaunch l = cluster_launch<T>(p);
  if (l.C > kMaxClusterBlocks) return cudaSuccess;
  p.kb_cols = l.kb_cols;
  const dim3 grid(static_cast<unsigned>(l.C), static_cast<unsigned>(p.npairs)), block(l.threads);
#ifdef SDMP_EMULATE
  // what cluster_capacity answers on an H100 for a block above its shared memory: not here (the default path)
  if (l.smem > sdmp_emu::kMaxDynamicSmem) return cudaSuccess;
  sdmp_emu::launch_cluster(grid, block, l.smem, static_cast<unsigned>(l.C), l.kernel, p);
#else
  const void* k = reinterpret_cast<const void*>(l.kernel);
  if (cluster_capacity(k, l.smem, static_cast<int>(l.C), l.threads) == 0) return cudaSuccess;
  // The shared-memory limit is one attribute per kernel and device, and the last value set wins: another size
  // (fewer teacher crops, other threads) answered from the cache above may have lowered it since. Not a stream
  // operation, so it may run inside a graph capture, as SDMP_LAUNCH does on every launch.
  Status st = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.smem));
  if (st != cudaSuccess) return st;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(&attr, static_cast<int>(l.C), grid, block, l.smem, stream);
  st = cudaLaunchKernelEx(&cfg, l.kernel, p);
  if (st != cudaSuccess) return st;
#endif
  *launched = true;
  return cudaGetLastError();
}

template <typename T>
void cluster_info(const DinoParams& p, int64_t* info) {
  const ClusterLaunch l = cluster_launch<T>(p);
  info[0] = l.C;
  info[1] = static_cast<int64_t>(l.smem);
  info[2] = l.threads;
#ifdef SDMP_EMULATE
  info[3] = -1;
#else
  info[3] = p.vec_ok && l.C <= kMaxClusterBlocks
                ? cluster_capacity(reinterpret_cast<const void*>(l.kernel), l.smem, static_cast<int>(l.C), l.threads)
                : 0;
#endif
}

}  // namespace

Status dino_cluster_forward(const DinoParams& p, Stream stream, bool* launched) {
  Status st = cudaSuccess;
  *launched = false;
  SDMP_DISPATCH_DTYPE(p.dtype, st = launch_cluster<scalar_t>(p, stream, launched));
  if (st != cudaSuccess || !*launched) return st;
  return dino_merge_and_terms(p, stream, false);
}

void dino_cluster_info(const DinoParams& p, int64_t info[4]) {
  SDMP_DISPATCH_DTYPE(p.dtype, cluster_info<scalar_t>(p, info));
}

}  // namespace sdmp
