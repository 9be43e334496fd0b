// Fused SDMP-DINO soft-target cross-entropy (sdmp.md §4): interface between the API and the kernels.
//
// Student rows are indexed row = v * B + b with v < Sc the clean crops (v < T are the global crops the teacher
// saw) and Sc <= v < Sc + Sm the mixed crops. Teacher rows: clean iq * B + b, mixed T * B + iq * B + b.
// Batch-flip partner of b: B - 1 - b. Work is split by (partner pair, column block): a block owns both rows of
// a pair {b, B-1-b}, so the teacher targets of the pair (which mix b with its partner) are built once per
// column and shared by every student crop of both rows.
#pragma once
#include "../common/sdmp_types.h"

namespace sdmp {

constexpr int kDinoMaxTeacher = 4;
constexpr int kDinoThreads = 256;      // teacher statistics and small kernels
constexpr int kDinoPairThreads = 384;  // most threads of a pair block (4 to 12 warps, one student row each)

struct DinoParams {
  // inputs (contiguous)
  const void* s_clean = nullptr;  // [Sc, B, K]
  const void* s_mixed = nullptr;  // [Sm, B, K] (Sm == 0: unused)
  const void* t_clean = nullptr;  // [T, B, K]
  const void* t_mixed = nullptr;  // [T, B, K] or null
  const float* center = nullptr;  // [K]
  const float* lam = nullptr;     // [B] (Sm == 0: unused)
  int Sc = 0, Sm = 0, T = 0, B = 0;
  int64_t K = 0;
  DType dtype = DType::kFloat;
  bool vec_ok = false;
  float inv_tau_s = 1.f, inv_tau_t = 1.f;
  float w_src = 0.f;      // pair weight of the source-teacher term (mix_weight, or 2*mix_weight without teacher_mixed)
  float w_mix = 0.f;      // pair weight of the mix-teacher term (mix_weight; 0 without teacher_mixed)
  float pair_norm = 0.f;  // 1 / (number of pairs * B)

  // teacher statistics
  int64_t t_tiles = 0;      // column tiles of the teacher-stats kernel
  int t_groups_clean = 0;   // row groups (clean teacher rows)
  int t_groups_mixed = 0;
  float* t_part = nullptr;     // [2*T*B, t_tiles, 2] partial (max, sum)
  float* col_part = nullptr;   // [t_groups_clean, K] partial column sums of the clean teacher logits
  float* lse_t = nullptr;      // [2*T*B, 2] (max, log sum) of u = (t - center) / tau_t: P = exp((u - max) - log sum)
  float* center_mean = nullptr;  // [K] mean of the clean teacher logits (the DINO center statistic)

  // student statistics
  int64_t kb_cols = 0;  // columns per block
  int n_kblocks = 0;
  int npairs = 0;       // ceil(B / 2)
  float* s_part = nullptr;    // [V*B, n_kblocks, 4] partial (max, sum, dot1, dot2)
  float* row_stat = nullptr;  // [V*B, 4] (max, log sum) of x = student / tau_s, target masses q1, q2
  float* row_loss = nullptr;  // [V*B, 3] (dino, mix_source, mix_teacher) contribution of each row
  float* terms = nullptr;     // [4] dino, mix_source, mix_teacher, their sum

  // gradient
  void* g_clean = nullptr;  // [Sc, B, K] or null (not wanted)
  void* g_mixed = nullptr;  // [Sm, B, K] or null
  const float* gw = nullptr;   // [3] upstream gradients of (dino, mix_source, mix_teacher)
  const int* mode = nullptr;   // grad kernels run only when *mode == run_mode (null: always)
  int run_mode = 0;
  int* ctl = nullptr;          // [2] backward control: mode (int), scale factor (float bits)

  // fused forward (stats + merge + gradient in one launch)
  int* counters = nullptr;  // [1 + 2 * npairs], zeroed: ticket, per-pair done count, per-pair ready flag
  int group_pairs = 4;

  // chunked two-launch path: statistics, merge and gradient for pairs [pair0, pair0 + pair_count) at a time,
  // so the gradient pass re-reads rows the statistics pass just read, from L2 (pair_count 0: every pair)
  int pair0 = 0;
  int pair_count = 0;

  // cluster forward: teacher statistics folded in (lse_t and center_mean written by it; center_mean zeroed)
  bool fold_teacher = false;

  // launch settings ($SDMP_DINO_*, read and checked by the API on every call; 0: automatic)
  int64_t block_cols_setting = 0;  // columns per pair block
  int pair_warps_setting = 0;      // warps per pair block
  int cluster_threads = 0;         // threads per cluster block
  bool cluster_pipeline = false;   // pipelined cluster rounds
};

// Host-side layout helpers (shared by the API and the launchers).
int64_t dino_teacher_tile_cols(DType dt, bool vec_ok);
int64_t dino_block_cols(int T, int64_t setting);  // setting > 0: that many
int dino_pair_threads(const DinoParams& p);
size_t dino_smem_bytes(const DinoParams& p);

Status dino_teacher_stats(const DinoParams& p, Stream stream);          // lse_t, center_mean
Status dino_student_stats(const DinoParams& p, Stream stream);          // s_part -> lse_s, row_loss, terms
Status dino_fused_forward(const DinoParams& p, Stream stream);          // stats + grad (gw) in one launch, terms
Status dino_student_grad(const DinoParams& p, Stream stream);           // gradient from lse_s, lse_t, gw
// Statistics + gradient chunk by chunk of `chunk` pairs, then the terms ($SDMP_DINO_CHUNK_PAIRS).
Status dino_chunked_forward(const DinoParams& p, int chunk, Stream stream);
// One read of the student logits: thread-block clusters exchange the row statistics through distributed shared
// memory (sm_90). *launched is false (and nothing ran) where the card or the shapes do not allow it.
Status dino_cluster_forward(const DinoParams& p, Stream stream, bool* launched);
// Its launch for p's sizes and settings: {blocks per cluster, shared-memory bytes per block, threads per block,
// clusters the card holds at once (0: it cannot run here; -1: the emulated build, no card to ask)}.
void dino_cluster_info(const DinoParams& p, int64_t info[4]);
// Merge of the row partials (merge) and the loss terms: the last launches of every forward path.
Status dino_merge_and_terms(const DinoParams& p, Stream stream, bool merge);
Status dino_grad_fixup(const DinoParams& p, const bool active[3], Stream stream);  // rescale or recompute

}  // namespace sdmp
