// Fused batch-flip mixing (sdmp.md §1): interface between the API and the kernel.
#pragma once
#include "../common/sdmp_types.h"

namespace sdmp {

constexpr int kMixMaxViews = 8;
constexpr int kMixup = 0, kCutmix = 1, kResizemix = 2;

struct MixView {
  const void* x = nullptr;  // [n, C, H, W] contiguous, unmixed
  void* out = nullptr;      // [n, C, H, W]
  int C = 0, H = 0, W = 0;
  const int64_t* y0 = nullptr;  // [n] box top-left and size of this view
  const int64_t* x0 = nullptr;
  const int64_t* cut_h = nullptr;
  const int64_t* cut_w = nullptr;
};

struct MixParams {
  int n = 0;            // batch size (partner of i: n - 1 - i)
  int nviews = 0;
  MixView views[kMixMaxViews];
  const float* lam = nullptr;      // [n] shared by all views
  const int64_t* method = nullptr; // [n] 0 mixup, 1 cutmix, 2 resizemix
  bool allow_resize = true;        // false: resizemix samples are treated as cutmix (method_set without 2)
  DType dtype = DType::kFloat;
  bool vec_ok = false;             // W % VEC == 0 and aligned bases, every view
  int packs = 1;                   // packs of pixels per thread: 1, 2 or 4 ($SDMP_MIX_PACKS, tuning)
  bool staged = false;             // resizemix resampled in lane order through shared memory ($SDMP_MIX_STAGED)
  int row_table = 0;               // rows of a block's resizemix row table (set by the launcher)
};

Status batch_mix(const MixParams& p, Stream stream);

}  // namespace sdmp
