// Fused SDMP-DINO loss: argument checks, workspace allocation (caching allocator) and launches on the current
// stream. No host synchronisation anywhere: forward and backward are capturable in a CUDA graph.
#include "../common/api_common.h"
#include <ATen/Context.h>
#include "dino_ce.h"

#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

namespace sdmp {

namespace {

// $SDMP_DINO_CLUSTER: "1" the one-read cluster forward where the card and shapes allow it (opt-in until timed
// on a GPU), "require" the same but an error where it cannot run (benchmarks and tests: no silent fallback).
enum class ClusterMode { kOff, kPrefer, kRequire };

// Forward-path choices from the environment (the launch settings go into DinoParams).
struct DinoPaths {
  ClusterMode cluster = ClusterMode::kOff;
  bool fold_teacher = false;  // $SDMP_DINO_CLUSTER_TEACHER=1: the clusters compute the teacher statistics too
  int chunk_pairs = 0;        // $SDMP_DINO_CHUNK_PAIRS=N: the two-launch path N pairs at a time (L2 reuse)
};

struct DinoInputs {
  at::Tensor s_clean, s_mixed, t_clean, t_mixed, center, lam;
  DinoParams p;
  DinoPaths paths;
};

// Every $SDMP_DINO_* setting the C++ side reads, read once per call and checked: a bad value is an error naming
// it, not a silent fallback to the default.
void read_settings(DinoInputs& in) {
  DinoParams& p = in.p;
  p.block_cols_setting = tuning_env("SDMP_DINO_BLOCK_COLS", 0, 256, 1L << 20, 256);
  p.pair_warps_setting = static_cast<int>(tuning_env("SDMP_DINO_PAIR_WARPS", 0, 4, kDinoPairThreads / 32));
  p.cluster_threads = static_cast<int>(tuning_env("SDMP_DINO_CLUSTER_THREADS", 0, 32, 512, 32));
  p.cluster_pipeline = tuning_env("SDMP_DINO_CLUSTER_PIPELINE", 0, 0, 1) == 1;
  in.paths.fold_teacher = tuning_env("SDMP_DINO_CLUSTER_TEACHER", 0, 0, 1) == 1;
  in.paths.chunk_pairs = static_cast<int>(tuning_env("SDMP_DINO_CHUNK_PAIRS", 0, 0, (1L << 30) - 1));
  const char* c = std::getenv("SDMP_DINO_CLUSTER");
  const bool off = c == nullptr || c[0] == '\0' || std::strcmp(c, "0") == 0;
  TORCH_CHECK(off || std::strcmp(c, "1") == 0 || std::strcmp(c, "require") == 0, "SDMP_DINO_CLUSTER=", c,
              ": expected 0, 1 or require");
  in.paths.cluster = off ? ClusterMode::kOff : (c[0] == '1' ? ClusterMode::kPrefer : ClusterMode::kRequire);
}

DinoInputs check_inputs(const at::Tensor& s_clean, const std::optional<at::Tensor>& s_mixed,
                        const at::Tensor& t_clean, const std::optional<at::Tensor>& t_mixed,
                        const at::Tensor& center, const std::optional<at::Tensor>& lam, double tau_s,
                        double tau_t, double mix_weight) {
  SDMP_CHECK_DEVICE(s_clean);
  TORCH_CHECK(s_clean.dim() == 3, "student_clean must be [Sc, B, K], got ", s_clean.sizes());
  TORCH_CHECK(t_clean.dim() == 3, "teacher_clean must be [T, B, K], got ", t_clean.sizes());
  const int64_t Sc = s_clean.size(0), B = s_clean.size(1), K = s_clean.size(2);
  const int64_t T = t_clean.size(0);
  TORCH_CHECK(T >= 1 && T <= kDinoMaxTeacher, "teacher_clean: 1 to ", kDinoMaxTeacher, " teacher crops, got ", T);
  TORCH_CHECK(B >= 1 && K >= 1, "empty batch or prototype dimension");
  // The launches put the pairs of partner rows on gridDim.y (at most 65,535 of them).
  TORCH_CHECK(B <= 2 * 65535, "sdmp_dino_terms: batch size ", B, " above the launch limit 131070");
  TORCH_CHECK(Sc + (s_mixed.has_value() && s_mixed->defined() ? s_mixed->size(0) : 0) <= INT32_MAX / B,
              "sdmp_dino_terms: student crops x batch size above 2^31 - 1 rows");
  CHECK_SHAPE(t_clean, T, B, K);
  DinoInputs in;
  read_settings(in);
  in.s_clean = s_clean;
  in.t_clean = t_clean;
  in.center = center;
  const bool has_mixed = s_mixed.has_value() && s_mixed->defined() && s_mixed->size(0) > 0;
  const int64_t Sm = has_mixed ? s_mixed->size(0) : 0;
  if (has_mixed) {
    CHECK_SHAPE(*s_mixed, Sm, B, K);
    in.s_mixed = *s_mixed;
    TORCH_CHECK(lam.has_value() && lam->defined(), "lam is required with mixed student crops");
    in.lam = *lam;
    CHECK_SHAPE(in.lam, B);
    CHECK_DTYPE(in.lam, at::kFloat);
  }
  const bool has_tm = t_mixed.has_value() && t_mixed->defined();
  if (has_tm) {
    CHECK_SHAPE(*t_mixed, T, B, K);
    in.t_mixed = *t_mixed;
  }
  CHECK_SHAPE(center, K);
  CHECK_DTYPE(center, at::kFloat);
  for (const at::Tensor* t : {&in.s_clean, &in.s_mixed, &in.t_clean, &in.t_mixed, &in.center, &in.lam}) {
    if (!t->defined()) continue;
    CHECK_SAME_DEVICE(*t, s_clean);
    CHECK_CONTIGUOUS(*t);
  }
  for (const at::Tensor* t : {&in.s_mixed, &in.t_clean, &in.t_mixed}) {
    if (t->defined()) CHECK_DTYPE(*t, s_clean.scalar_type());
  }
  TORCH_CHECK(tau_s > 0 && tau_t > 0, "tau_s and tau_t must be > 0");
  const int64_t n_pairs = T * Sc - std::min(T, Sc) + T * Sm;
  TORCH_CHECK(n_pairs > 0, "no (teacher, student) pair: need a local crop or a second global crop");

  DinoParams& p = in.p;
  p.s_clean = s_clean.data_ptr();
  p.s_mixed = has_mixed ? in.s_mixed.data_ptr() : nullptr;
  p.t_clean = t_clean.data_ptr();
  p.t_mixed = has_tm ? in.t_mixed.data_ptr() : nullptr;
  p.center = center.data_ptr<float>();
  p.lam = has_mixed ? in.lam.data_ptr<float>() : nullptr;
  p.Sc = static_cast<int>(Sc);
  p.Sm = static_cast<int>(Sm);
  p.T = static_cast<int>(T);
  p.B = static_cast<int>(B);
  p.K = K;
  p.dtype = dtype_tag(s_clean);
  const int64_t vec = 16 / s_clean.element_size();
  p.vec_ok = K % vec == 0;
  for (const at::Tensor* t : {&in.s_clean, &in.s_mixed, &in.t_clean, &in.t_mixed}) {
    if (t->defined()) p.vec_ok = p.vec_ok && vec_aligned(*t, K);
  }
  // PyTorch's CUDA `tensor / python_float` multiplies by the fp32 reciprocal: do the same.
  p.inv_tau_s = 1.0f / static_cast<float>(tau_s);
  p.inv_tau_t = 1.0f / static_cast<float>(tau_t);
  p.w_src = static_cast<float>(has_tm ? mix_weight : 2.0 * mix_weight);
  p.w_mix = static_cast<float>(has_tm ? mix_weight : 0.0);
  p.pair_norm = static_cast<float>(1.0 / (static_cast<double>(n_pairs) * static_cast<double>(B)));
  p.t_tiles = ceil_div(K, dino_teacher_tile_cols(p.dtype, p.vec_ok));
  p.t_groups_clean = static_cast<int>(ceil_div(T * B, 64));
  p.t_groups_mixed = has_tm ? p.t_groups_clean : 0;
  p.kb_cols = dino_block_cols(p.T, p.block_cols_setting);
  if (p.block_cols_setting > 0) {  // the default always fits (96 KiB); a tuning value may not
    const int64_t need = static_cast<int64_t>(dino_smem_bytes(p)), limit = max_dynamic_smem(s_clean);
    TORCH_CHECK(need <= limit, "SDMP_DINO_BLOCK_COLS=", p.block_cols_setting, ": with ", T,
                " teacher crop(s) a block needs ", need, " bytes of shared memory, above this card's ", limit,
                "; at most ", limit / (need / p.block_cols_setting) / 256 * 256, " columns fit");
  }
  const int64_t kblocks = ceil_div(K, p.kb_cols), npairs = (B + 1) / 2;
  // The gradient kernels count (pair, column block) units in int32: checked here, the hot kernel left as it is.
  TORCH_CHECK(npairs * kblocks <= INT32_MAX, "sdmp_dino_terms: ", npairs, " pairs of rows x ", kblocks,
              " column blocks of K = ", K, " above 2^31 - 1 units");
  p.n_kblocks = static_cast<int>(kblocks);
  p.npairs = static_cast<int>(npairs);
  return in;
}

// Statistics both passes need: teacher (max, log sum) rows and the center statistic.
void run_teacher_stats(DinoInputs& in, at::Tensor& lse_t, at::Tensor& center_mean, Stream stream) {
  DinoParams& p = in.p;
  auto f32 = in.s_clean.options().dtype(at::kFloat);
  const int64_t TB = static_cast<int64_t>(p.T) * p.B;
  at::Tensor t_part = new_buffer({(p.t_mixed ? 2 : 1) * TB, p.t_tiles, 2}, f32);
  at::Tensor col_part = new_buffer({p.t_groups_clean, p.K}, f32);
  lse_t = new_buffer({2 * TB, 2}, f32);
  center_mean = new_buffer({p.K}, f32);
  p.t_part = t_part.data_ptr<float>();
  p.col_part = col_part.data_ptr<float>();
  p.lse_t = lse_t.data_ptr<float>();
  p.center_mean = center_mean.data_ptr<float>();
  SDMP_CHECK_STATUS(dino_teacher_stats(p, stream));
}

void set_grad_outputs(DinoInputs& in, bool grad_clean, bool grad_mixed, at::Tensor& g_clean, at::Tensor& g_mixed) {
  g_clean = grad_clean ? new_like(in.s_clean) : at::empty({0}, in.s_clean.options());
  g_mixed = (grad_mixed && in.p.Sm > 0) ? new_like(in.s_mixed) : at::empty({0}, in.s_clean.options());
  in.p.g_clean = grad_clean ? g_clean.data_ptr() : nullptr;
  in.p.g_mixed = (grad_mixed && in.p.Sm > 0) ? g_mixed.data_ptr() : nullptr;
}

void use_saved_stats(DinoInputs& in, const at::Tensor& row_stat, const at::Tensor& lse_t) {
  const int64_t rows = static_cast<int64_t>(in.p.Sc + in.p.Sm) * in.p.B;
  CHECK_SHAPE(row_stat, rows, 4);
  CHECK_SHAPE(lse_t, 2 * static_cast<int64_t>(in.p.T) * in.p.B, 2);
  for (const at::Tensor* t : {&row_stat, &lse_t}) {
    CHECK_SAME_DEVICE(*t, in.s_clean);
    CHECK_CONTIGUOUS(*t);
    CHECK_DTYPE(*t, at::kFloat);
  }
  in.p.row_stat = const_cast<float*>(row_stat.data_ptr<float>());
  in.p.lse_t = const_cast<float*>(lse_t.data_ptr<float>());
}

at::Tensor check_grad_terms(const at::Tensor& g_terms, const at::Tensor& ref) {
  CHECK_SAME_DEVICE(g_terms, ref);
  CHECK_SHAPE(g_terms, 3);
  CHECK_DTYPE(g_terms, at::kFloat);
  CHECK_CONTIGUOUS(g_terms);
  return g_terms;
}

}  // namespace

// Returns {terms [4] = (dino, mix_source, mix_teacher, loss), center_mean [K], row_stat [V*B, 4], lse_t [2TB, 2],
// grad_clean, grad_mixed}. With grad_* set, the gradients of terms.sum() (upstream gradient 1 for every term)
// are computed in the same pass (`fused`: one launch that re-reads each pair's rows right after their
// statistics, mostly from L2); the backward then only corrects them when its upstream gradient differs.
std::vector<at::Tensor> dino_fwd(const at::Tensor& s_clean, const std::optional<at::Tensor>& s_mixed,
                                 const at::Tensor& t_clean, const std::optional<at::Tensor>& t_mixed,
                                 const at::Tensor& center, const std::optional<at::Tensor>& lam, double tau_s,
                                 double tau_t, double mix_weight, bool grad_clean, bool grad_mixed, bool fused,
                                 int64_t group_pairs) {
  DeviceGuard guard(s_clean);
  DinoInputs in = check_inputs(s_clean, s_mixed, t_clean, t_mixed, center, lam, tau_s, tau_t, mix_weight);
  DinoParams& p = in.p;
  const Stream stream = current_stream(s_clean);
  auto f32 = s_clean.options().dtype(at::kFloat);
  const ClusterMode cluster = in.paths.cluster;
  at::Tensor lse_t, center_mean;
  // the folded center statistic is summed with atomics: not under torch.use_deterministic_algorithms(True)
  if (cluster != ClusterMode::kOff && in.paths.fold_teacher && !at::globalContext().deterministicAlgorithms()) {
    // the cluster forward computes them (run_teacher_stats below if it cannot run)
    lse_t = new_buffer({2 * static_cast<int64_t>(p.T) * p.B, 2}, f32);
    center_mean = at::zeros({p.K}, f32);  // accumulated by the clusters
    p.lse_t = lse_t.data_ptr<float>();
    p.center_mean = center_mean.data_ptr<float>();
    p.fold_teacher = true;
  } else {
    run_teacher_stats(in, lse_t, center_mean, stream);
  }
  const int64_t rows = static_cast<int64_t>(p.Sc + p.Sm) * p.B;
  at::Tensor s_part = new_buffer({rows, p.n_kblocks, 6}, f32);
  at::Tensor row_stat = new_buffer({rows, 4}, f32);
  at::Tensor row_loss = new_buffer({rows, 3}, f32);
  at::Tensor terms = new_buffer({4}, f32);
  p.s_part = s_part.data_ptr<float>();
  p.row_stat = row_stat.data_ptr<float>();
  p.row_loss = row_loss.data_ptr<float>();
  p.terms = terms.data_ptr<float>();
  at::Tensor g_clean, g_mixed;
  set_grad_outputs(in, grad_clean, grad_mixed, g_clean, g_mixed);
  const bool want_grad = p.g_clean != nullptr || p.g_mixed != nullptr;
  at::Tensor ones;  // upstream gradient 1 per term for the precomputed gradient
  if (want_grad || cluster != ClusterMode::kOff) {
    ones = at::ones({3}, f32);
    p.gw = ones.data_ptr<float>();
  }
  bool launched = false;
  if (cluster != ClusterMode::kOff) SDMP_CHECK_STATUS(dino_cluster_forward(p, stream, &launched));
  TORCH_CHECK(launched || cluster != ClusterMode::kRequire,
              "SDMP_DINO_CLUSTER=require: the cluster forward cannot run here (needs sm_90, K a multiple of ",
              16 / s_clean.element_size(), " and at most 16 blocks of columns, shared memory for the targets (at "
              "most 3 teacher crops where K > 3,840), and a cluster that fits the card); unset it or set it to 1 to "
              "fall back");
  if (!launched && p.fold_teacher) {
    p.fold_teacher = false;
    run_teacher_stats(in, lse_t, center_mean, stream);
  }
  if (launched) {
    // statistics, terms and (when wanted) the gradient are done
  } else if (!want_grad) {
    SDMP_CHECK_STATUS(dino_student_stats(p, stream));
  } else {
    if (fused) {
      TORCH_CHECK(group_pairs >= 1, "group_pairs must be >= 1");
      at::Tensor counters = at::zeros({1 + 2 * static_cast<int64_t>(p.npairs)}, s_clean.options().dtype(at::kInt));
      p.counters = counters.data_ptr<int>();
      p.group_pairs = static_cast<int>(std::min<int64_t>(group_pairs, p.npairs));
      SDMP_CHECK_STATUS(dino_fused_forward(p, stream));
    } else if (const int chunk = in.paths.chunk_pairs; chunk > 0 && chunk < p.npairs) {
      SDMP_CHECK_STATUS(dino_chunked_forward(p, chunk, stream));
    } else {
      SDMP_CHECK_STATUS(dino_student_stats(p, stream));
      SDMP_CHECK_STATUS(dino_student_grad(p, stream));
    }
  }
  if (p.t_mixed == nullptr) {
    // Rows [TB, 2TB) hold the mixed teacher's statistics, none here: defined values (T*B floats), so the output
    // never carries uninitialised memory (torch.library.opcheck compares it). Here: run_teacher_stats above may
    // have allocated lse_t anew.
    const int64_t TB = static_cast<int64_t>(p.T) * p.B;
    lse_t.narrow(0, TB, TB).zero_();
  }
  return {terms, center_mean, row_stat, lse_t, g_clean, g_mixed};
}

// The cluster forward's launch for these logits under the current $SDMP_DINO_* settings: {blocks per cluster,
// shared-memory bytes per block, threads per block, clusters the card holds at once (0: cannot run here, -1:
// emulated build)}. The benchmark prints it beside the cluster rows: the occupancy behind their time.
std::vector<int64_t> dino_cluster_info(const at::Tensor& s_clean, const at::Tensor& t_clean) {
  DeviceGuard guard(s_clean);
  TORCH_CHECK(s_clean.dim() == 3 && t_clean.dim() == 3, "student_clean and teacher_clean must be [crops, B, K]");
  DinoInputs in;
  read_settings(in);
  DinoParams& p = in.p;
  p.T = static_cast<int>(t_clean.size(0));
  p.K = s_clean.size(2);
  p.dtype = dtype_tag(s_clean);
  p.vec_ok = p.K % (16 / s_clean.element_size()) == 0;
  int64_t info[4] = {0, 0, 0, 0};
  dino_cluster_info(p, info);
  return {info[0], info[1], info[2], info[3]};
}

// Gradient for upstream gradients g_terms [3] (fp32) from the saved statistics. Returns {grad_clean, grad_mixed}.
std::vector<at::Tensor> dino_grad(const at::Tensor& g_terms, const at::Tensor& s_clean,
                                  const std::optional<at::Tensor>& s_mixed, const at::Tensor& t_clean,
                                  const std::optional<at::Tensor>& t_mixed, const at::Tensor& center,
                                  const std::optional<at::Tensor>& lam, const at::Tensor& row_stat,
                                  const at::Tensor& lse_t, double tau_s, double tau_t, double mix_weight,
                                  bool grad_clean, bool grad_mixed) {
  DeviceGuard guard(s_clean);
  DinoInputs in = check_inputs(s_clean, s_mixed, t_clean, t_mixed, center, lam, tau_s, tau_t, mix_weight);
  use_saved_stats(in, row_stat, lse_t);
  in.p.gw = check_grad_terms(g_terms, s_clean).data_ptr<float>();
  at::Tensor g_clean, g_mixed;
  set_grad_outputs(in, grad_clean, grad_mixed, g_clean, g_mixed);
  if (in.p.g_clean != nullptr || in.p.g_mixed != nullptr) {
    SDMP_CHECK_STATUS(dino_student_grad(in.p, current_stream(s_clean)));
  }
  return {g_clean, g_mixed};
}

// Turns gradients precomputed by dino_fwd (upstream gradient 1 per term) into those for g_terms, in place:
// nothing when every active term has gradient 1, a rescale when they are all equal, a recompute otherwise.
// The choice is made on the device (no host synchronisation).
void dino_grad_fixup(at::Tensor& g_clean, at::Tensor& g_mixed, const at::Tensor& g_terms,
                     const at::Tensor& s_clean, const std::optional<at::Tensor>& s_mixed,
                     const at::Tensor& t_clean, const std::optional<at::Tensor>& t_mixed, const at::Tensor& center,
                     const std::optional<at::Tensor>& lam, const at::Tensor& row_stat, const at::Tensor& lse_t,
                     double tau_s, double tau_t, double mix_weight) {
  DeviceGuard guard(s_clean);
  DinoInputs in = check_inputs(s_clean, s_mixed, t_clean, t_mixed, center, lam, tau_s, tau_t, mix_weight);
  DinoParams& p = in.p;
  use_saved_stats(in, row_stat, lse_t);
  p.gw = check_grad_terms(g_terms, s_clean).data_ptr<float>();
  if (g_clean.numel() > 0) {
    TORCH_CHECK(g_clean.sizes() == s_clean.sizes() && g_clean.dtype() == s_clean.dtype() && g_clean.is_contiguous(),
                "grad_clean does not match student_clean");
    p.g_clean = g_clean.data_ptr();
  }
  if (g_mixed.numel() > 0) {
    TORCH_CHECK(p.Sm > 0 && g_mixed.sizes() == in.s_mixed.sizes() && g_mixed.dtype() == s_clean.dtype() &&
                    g_mixed.is_contiguous(),
                "grad_mixed does not match student_mixed");
    p.g_mixed = g_mixed.data_ptr();
  }
  if (p.g_clean == nullptr && p.g_mixed == nullptr) return;
  at::Tensor ctl = at::empty({2}, s_clean.options().dtype(at::kInt));
  p.ctl = ctl.data_ptr<int>();
  const int64_t n_clean_pairs = static_cast<int64_t>(p.T) * p.Sc - std::min(p.T, p.Sc);
  // Terms that reach a gradient we hold: their upstream gradients decide the mode.
  const bool active[3] = {p.g_clean != nullptr && n_clean_pairs > 0, p.g_mixed != nullptr,
                          p.g_mixed != nullptr && p.t_mixed != nullptr};
  SDMP_CHECK_STATUS(dino_grad_fixup(p, active, current_stream(s_clean)));
}

}  // namespace sdmp
