// Device helpers shared by the sdmp_fast kernels.
//
// Every kernel source compiles two ways: with nvcc for the GPU, and -- with SDMP_EMULATE defined -- with the
// host C++ compiler against emulate.h, which runs each thread block as real std::threads with barriers and
// warp shuffles. The emulated build lets CPU-only machines check indexing, reductions and the cross-block
// protocol of the kernels against the PyTorch references; timing and memory behaviour need a real GPU.
#pragma once

#ifdef SDMP_EMULATE
#include "emulate.h"
#else
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "sdmp_types.h"

namespace sdmp {

constexpr int kWarpSize = 32;

// Dynamic shared memory of the running block (16-byte aligned).
#ifdef SDMP_EMULATE
inline unsigned char* dynamic_smem() { return sdmp_emu::ctx().blk->dyn_smem.data(); }
#else
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char sdmp_dynamic_smem[];
  return sdmp_dynamic_smem;
}
#endif

// A VEC-wide pack of T moved with one (16-byte at most) memory instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ src) {
  return *reinterpret_cast<const Pack<T, VEC>*>(src);
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack_floats(const Pack<T, VEC>& p, float (&out)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(p.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* __restrict__ src, float (&out)[VEC]) {
  const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(src);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(p.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* __restrict__ dst, const float (&in)[VEC]) {
  Pack<T, VEC> p;
#pragma unroll
  for (int i = 0; i < VEC; ++i) p.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(dst) = p;
}

// Rounds through T (identity for float): reproduces PyTorch's per-op rounding of half-precision tensors.
template <typename T>
__device__ __forceinline__ float round_through(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <>
__device__ __forceinline__ float round_through<float>(float x) {
  return x;
}

// Streaming log-sum-exp state: the row max m and sum of exp(x - m). m = -inf: nothing but -inf so far (s = 0),
// or a NaN seen among them (s = NaN, which every later step carries to the result, as the reference's NaN).
struct Lse {
  float m;
  float s;
};

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return Lse{-INFINITY, a.s + b.s};  // exp(-inf - -inf) would be NaN: masked columns
  return Lse{m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// Folds VEC new values into the running state with one rescale per pack (VEC + 1 exponentials).
template <int VEC>
__device__ __forceinline__ void lse_update(Lse& st, const float (&x)[VEC]) {
  float pm = x[0];
#pragma unroll
  for (int i = 1; i < VEC; ++i) pm = fmaxf(pm, x[i]);
  const float m = fmaxf(st.m, pm);
  if (m == -INFINITY) {  // only -inf (masked columns) or NaN (fmaxf skips it) so far: keep a NaN, add nothing
#pragma unroll
    for (int i = 0; i < VEC; ++i) st.s += x[i] == -INFINITY ? 0.f : x[i];
    return;
  }
  float s = st.s * __expf(st.m - m);  // m is finite here: an empty state (-inf, 0) adds 0, a NaN one NaN
#pragma unroll
  for (int i = 0; i < VEC; ++i) s += __expf(x[i] - m);
  st.m = m;
  st.s = s;
}

__device__ __forceinline__ float lse_value(Lse st) { return st.m + logf(st.s); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ Lse warp_lse(Lse st) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    Lse other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
    st = lse_merge(st, other);
  }
  return st;
}

// Block-wide log-sum-exp state, returned to every thread. blockDim.x must be a multiple of 32 (<= 1024).
__device__ __forceinline__ Lse block_lse(Lse st) {
  __shared__ float sm_m[32];
  __shared__ float sm_s[32];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  st = warp_lse(st);
  __syncthreads();  // the shared slots may still be read by a previous call
  if (lane == 0) {
    sm_m[warp] = st.m;
    sm_s[warp] = st.s;
  }
  __syncthreads();
  Lse r{-INFINITY, 0.f};
  if (lane < nwarps) r = Lse{sm_m[lane], sm_s[lane]};
  return warp_lse(r);  // every warp reduces the same slots: no second broadcast needed
}

// Block-wide sum, returned to every thread (deterministic: fixed shuffle tree).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float sm[32];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  float r = (lane < nwarps) ? sm[lane] : 0.f;
  return warp_sum(r);
}

// Cross-block flags (written after __threadfence, read bypassing L1).
__device__ __forceinline__ int load_flag(const int* p) {
#ifdef SDMP_EMULATE
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#else
  return *reinterpret_cast<const volatile int*>(p);
#endif
}

__device__ __forceinline__ void store_flag(int* p, int v) {
#ifdef SDMP_EMULATE
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
#else
  *reinterpret_cast<volatile int*>(p) = v;
#endif
}

__device__ __forceinline__ void backoff() {
#if defined(SDMP_EMULATE)
  sdmp_emu::yield();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  __nanosleep(64);
#endif
}

// Thread-block clusters (sm_90; the launcher never starts a cluster kernel on an older card): rank of this
// block in its cluster, a barrier of every thread of the cluster (with release/acquire of shared memory), and
// the address of the same shared-memory variable in another block of the cluster.
#ifdef SDMP_EMULATE
inline int cluster_rank() { return sdmp_emu::cluster_rank(); }
inline void cluster_sync() { sdmp_emu::cluster_sync(); }
template <typename T>
inline T* cluster_map(T* local, int rank) { return sdmp_emu::cluster_map(local, rank); }
#else
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#else
  return 0;
#endif
}
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#endif
}
template <typename T>
__device__ __forceinline__ T* cluster_map(T* local, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(local, static_cast<unsigned>(rank));
#else
  return local;
#endif
}
#endif

// Reads data written by other blocks of the same launch (skips the non-coherent L1).
template <typename T>
__device__ __forceinline__ T load_coherent(const T* p) {
#ifdef SDMP_EMULATE
  return *p;
#else
  return __ldcg(p);
#endif
}

}  // namespace sdmp
