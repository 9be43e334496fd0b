// CPU emulation of the small CUDA subset the sdmp_fast kernels use (tests only, never shipped to a GPU).
//
// A launch runs its blocks one after another in blockIdx order (x fastest) on blockDim real std::threads:
// __syncthreads is a block barrier, warp shuffles exchange through a per-warp slot array between two warp
// barriers, __shared__ variables are function statics (one block is alive at a time), dynamic shared memory is
// a per-block buffer filled with 0xFF bytes (NaN as float) to expose reads of unwritten slots.
// Atomics map to GCC builtins. Thread-block clusters (launch_cluster) run their blocks concurrently with a
// cluster barrier and mapped dynamic shared memory. This checks indexing, reductions and the cross-block protocol of the kernels,
// not their speed or their memory-model corner cases.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace sdmp_emu {

class Barrier {
 public:
  explicit Barrier(int n = 1) : n_(n) {}
  void reset(int n) { n_ = n; count_ = 0; gen_ = 0; }
  void wait() {
    std::unique_lock<std::mutex> lk(mu_);
    const unsigned long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen != gen_; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_;
  int count_ = 0;
  unsigned long gen_ = 0;
};

struct Block {
  dim3 idx, dim, grid;
  Barrier bar;
  std::vector<std::unique_ptr<Barrier>> warp_bar;
  std::vector<uint64_t> slots;  // 32 per warp
  std::vector<unsigned char> dyn_smem;
};

// The blocks of one thread-block cluster (launch_cluster): they run at the same time, meet at one barrier and
// see each other's dynamic shared memory.
struct Cluster {
  Barrier bar;
  std::vector<Block*> blocks;  // by rank
};

struct Thread {
  Block* blk = nullptr;
  Cluster* cluster = nullptr;
  int rank = 0;  // block rank in its cluster
  dim3 tid;
  int linear = 0;
};

inline Thread& ctx() {
  static thread_local Thread t;
  return t;
}

inline void yield() { std::this_thread::yield(); }

template <typename T>
inline T shfl(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  Thread& t = ctx();
  const int warp = t.linear / 32, lane = t.linear % 32;
  uint64_t* slots = t.blk->slots.data() + warp * 32;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  slots[lane] = raw;
  t.blk->warp_bar[warp]->wait();
  uint64_t got = slots[src_lane & 31];
  t.blk->warp_bar[warp]->wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

// What a real launch on an H100 would refuse ("invalid configuration argument" / "invalid argument"), refused
// here too, so a CPU test catches a grid or a shared-memory request that only a GPU would reject.
constexpr size_t kMaxDynamicSmem = 232448;  // an H100's opt-in limit per block

inline void check_launch(dim3 grid, dim3 block, size_t smem, unsigned cluster_x) {
  auto refuse = [](const std::string& why) { throw std::runtime_error("emulated launch refused: " + why); };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    refuse("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
           ") outside CUDA's limits (x < 2^31, y and z <= 65,535)");
  if (static_cast<uint64_t>(block.x) * block.y * block.z > 1024 || block.z > 64)
    refuse("more than 1,024 threads per block");
  if (smem > kMaxDynamicSmem) refuse(std::to_string(smem) + " bytes of dynamic shared memory (an H100 grants 232,448)");
  if (cluster_x > 16) refuse("clusters of more than 16 blocks");
}

// Clusters of cluster_x consecutive blocks along x (grid.x a multiple of cluster_x): the blocks of a cluster run
// concurrently, each on its own blockDim threads; clusters run one after another. Kernels launched this way
// must keep block-local data in dynamic shared memory (function-static __shared__ is one copy here).
template <typename... KArgs, typename... Args>
void launch_cluster(dim3 grid, dim3 block, size_t smem, unsigned cluster_x, void (*kernel)(KArgs...), Args... args) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads % 32 != 0 || cluster_x == 0 || grid.x % cluster_x != 0) std::abort();
  check_launch(grid, block, smem, cluster_x);
  const long nclusters = static_cast<long>(grid.x / cluster_x) * grid.y * grid.z;
  const int cx = static_cast<int>(cluster_x);
  std::vector<std::unique_ptr<Block>> blocks;
  Cluster cl;
  cl.bar.reset(nthreads * cx);
  for (int r = 0; r < cx; ++r) {
    blocks.emplace_back(new Block);
    Block& b = *blocks.back();
    b.dim = block;
    b.grid = grid;
    b.bar.reset(nthreads);
    b.warp_bar.resize(nthreads / 32);
    for (auto& w : b.warp_bar) w.reset(new Barrier(32));
    b.slots.assign(nthreads, 0);
    cl.blocks.push_back(&b);
  }
  Barrier between(nthreads * cx);
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(nthreads) * cx);
  for (int r = 0; r < cx; ++r) {
    for (int t = 0; t < nthreads; ++t) {
      threads.emplace_back([&, r, t] {
        Thread& c = ctx();
        c.blk = cl.blocks[r];
        c.cluster = &cl;
        c.rank = r;
        c.linear = t;
        c.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        for (long ci = 0; ci < nclusters; ++ci) {
          if (t == 0) {
            const long gx = static_cast<long>(grid.x / cluster_x);
            const long cxi = ci % gx, rest = ci / gx;
            c.blk->idx = dim3(static_cast<unsigned>(cxi * cx + r), static_cast<unsigned>(rest % grid.y),
                              static_cast<unsigned>(rest / grid.y));
            c.blk->dyn_smem.assign(smem, 0xFF);
          }
          between.wait();
          kernel(args...);
          between.wait();
        }
      });
    }
  }
  for (auto& th : threads) th.join();
}

// A plain launch: clusters of one block, i.e. every block in blockIdx order (x fastest), one at a time.
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, void (*kernel)(KArgs...), Args... args) {
  launch_cluster(grid, block, smem, 1u, kernel, args...);
}

inline void cluster_sync() { ctx().cluster->bar.wait(); }

// The same byte of dynamic shared memory in block `rank` of the cluster.
template <typename T>
inline T* cluster_map(T* local, int rank) {
  Thread& t = ctx();
  const std::ptrdiff_t off = reinterpret_cast<unsigned char*>(local) - t.blk->dyn_smem.data();
  return reinterpret_cast<T*>(t.cluster->blocks[rank]->dyn_smem.data() + off);
}

inline int cluster_rank() { return ctx().rank; }

}  // namespace sdmp_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define threadIdx (::sdmp_emu::ctx().tid)
#define blockIdx (::sdmp_emu::ctx().blk->idx)
#define blockDim (::sdmp_emu::ctx().blk->dim)
#define gridDim (::sdmp_emu::ctx().blk->grid)

inline void __syncthreads() { ::sdmp_emu::ctx().blk->bar.wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  auto& t = ::sdmp_emu::ctx();
  t.blk->warp_bar[t.linear / 32]->wait();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  return ::sdmp_emu::shfl(v, (::sdmp_emu::ctx().linear % 32) ^ mask);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) {
  return ::sdmp_emu::shfl(v, src);
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* p, float v) {
  float old, sum;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  do {
    sum = old + v;
  } while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { volatile double r = a + b; return r; }
inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
inline double __ddiv_rn(double a, double b) { volatile double r = a / b; return r; }
inline float __double2float_rn(double a) { return static_cast<float>(a); }
using std::fmaxf;
using std::fminf;
