// Two-hot soft-label CE: argument checks, output allocation (caching allocator) and launch on the current
// stream. No host synchronisation: capturable in a CUDA graph.
#include "../common/api_common.h"
#include "two_hot_ce.h"

#include <tuple>

namespace sdmp {

namespace {

TwoHotParams make_params(const at::Tensor& logits, const at::Tensor& index_a, const at::Tensor& index_b,
                         const at::Tensor& weight_a, const at::Tensor& weight_b, double logit_div,
                         double out_scale) {
  SDMP_CHECK_DEVICE(logits);
  TORCH_CHECK(logits.dim() == 2, "logits must be [n, N], got ", logits.sizes());
  const int64_t n = logits.size(0), N = logits.size(1);
  // The column stride matters only where there are two columns to step between.
  TORCH_CHECK(logits.stride(1) == 1 || N <= 1 || n == 0, "logits must have a unit column stride");
  TORCH_CHECK(N > 0, "logits must have at least one column");
  // One block per row on gridDim.x (at most 2^31 - 1 of them).
  TORCH_CHECK(n <= INT32_MAX, "logits: at most 2^31 - 1 rows, got ", n);
  for (const at::Tensor* t : {&index_a, &index_b, &weight_a, &weight_b}) {
    CHECK_SAME_DEVICE(*t, logits);
    CHECK_CONTIGUOUS(*t);
  }
  CHECK_SHAPE(index_a, n);
  CHECK_SHAPE(index_b, n);
  CHECK_SHAPE(weight_a, n);
  CHECK_SHAPE(weight_b, n);
  CHECK_DTYPE(index_a, at::kLong);
  CHECK_DTYPE(index_b, at::kLong);
  CHECK_DTYPE(weight_a, at::kFloat);
  CHECK_DTYPE(weight_b, at::kFloat);
  TwoHotParams p;
  p.logits = logits.data_ptr();
  p.n = n;
  p.N = N;
  p.ld = n > 1 ? logits.stride(0) : N;
  p.dtype = dtype_tag(logits);
  const int64_t vec = 16 / logits.element_size();
  p.vec_ok = vec_aligned(logits, p.ld) && N % vec == 0;
  p.index_a = index_a.data_ptr<int64_t>();
  p.index_b = index_b.data_ptr<int64_t>();
  p.weight_a = weight_a.data_ptr<float>();
  p.weight_b = weight_b.data_ptr<float>();
  TORCH_CHECK(logit_div != 0.0, "logit_div must be non-zero");
  // PyTorch's CUDA `tensor / python_float` multiplies by the fp32 reciprocal: do the same.
  p.in_scale = 1.0f / static_cast<float>(logit_div);
  p.out_scale = static_cast<float>(out_scale);
  return p;
}

}  // namespace

// Returns (loss [n] fp32, lse [n] fp32).
std::tuple<at::Tensor, at::Tensor> two_hot_ce_fwd(const at::Tensor& logits, const at::Tensor& index_a,
                                                  const at::Tensor& index_b, const at::Tensor& weight_a,
                                                  const at::Tensor& weight_b, double logit_div, double out_scale) {
  DeviceGuard guard(logits);
  TwoHotParams p = make_params(logits, index_a, index_b, weight_a, weight_b, logit_div, out_scale);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = new_buffer({p.n}, f32), lse = new_buffer({p.n}, f32);
  p.loss = loss.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  SDMP_CHECK_STATUS(two_hot_ce_forward(p, current_stream(logits)));
  return {loss, lse};
}

// Returns grad_logits [n, N] (contiguous, logits dtype).
at::Tensor two_hot_ce_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& lse,
                          const at::Tensor& index_a, const at::Tensor& index_b, const at::Tensor& weight_a,
                          const at::Tensor& weight_b, double logit_div, double out_scale) {
  DeviceGuard guard(logits);
  TwoHotParams p = make_params(logits, index_a, index_b, weight_a, weight_b, logit_div, out_scale);
  CHECK_SAME_DEVICE(grad_loss, logits);
  CHECK_SAME_DEVICE(lse, logits);
  CHECK_DTYPE(grad_loss, at::kFloat);
  CHECK_DTYPE(lse, at::kFloat);
  CHECK_SHAPE(grad_loss, p.n);
  CHECK_SHAPE(lse, p.n);
  CHECK_CONTIGUOUS(lse);
  at::Tensor grad = new_buffer({p.n, p.N}, logits.options());
  p.lse = lse.data_ptr<float>();
  p.grad_loss = grad_loss.data_ptr<float>();
  p.grad_stride = grad_loss.stride(0);  // 0 for an expanded scalar gradient (loss.mean())
  p.grad_logits = grad.data_ptr();
  SDMP_CHECK_STATUS(two_hot_ce_backward(p, current_stream(logits)));
  return grad;
}

}  // namespace sdmp
