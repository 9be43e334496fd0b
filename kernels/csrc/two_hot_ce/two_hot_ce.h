// Two-hot soft-label cross-entropy (SDMP-MoCo, sdmp.md §3): interface between the API and the kernels.
#pragma once
#include "../common/sdmp_types.h"

namespace sdmp {

struct TwoHotParams {
  const void* logits = nullptr;  // [n, N] rows `ld` elements apart, unit column stride
  int64_t n = 0, N = 0, ld = 0;
  DType dtype = DType::kFloat;
  bool vec_ok = false;           // 16-byte aligned rows: vector loads/stores
  const int64_t* index_a = nullptr;  // [n] target columns
  const int64_t* index_b = nullptr;
  const float* weight_a = nullptr;   // [n]
  const float* weight_b = nullptr;
  float in_scale = 1.f;   // logits are multiplied by this before the softmax (MoCo: 1/tau)
  float out_scale = 1.f;  // the loss is multiplied by this (MoCo: 2*tau)
  // forward outputs
  float* loss = nullptr;  // [n]
  float* lse = nullptr;   // [n] log-sum-exp of in_scale * logits (saved for the backward)
  // backward
  const float* grad_loss = nullptr;  // [n], element i at grad_loss[i * grad_stride] (stride 0: broadcast)
  int64_t grad_stride = 1;
  void* grad_logits = nullptr;       // [n, N] contiguous, logits dtype
};

Status two_hot_ce_forward(const TwoHotParams& p, Stream stream);
Status two_hot_ce_backward(const TwoHotParams& p, Stream stream);

}  // namespace sdmp
