// Fused batch-flip mixing: argument checks, output allocation and one launch for all views on the current
// stream (no host synchronisation: capturable).
#include "../common/api_common.h"
#include "batch_mix.h"

#include <algorithm>
#include <vector>

namespace sdmp {

// Mixes every view [n, C, H, W] with its batch flip; per-view boxes y0/x0/cut_h/cut_w [n] (int64), shared
// lam [n] (fp32) and method [n] (int64). Returns the mixed views (new tensors; the inputs are not modified).
std::vector<at::Tensor> batch_mix_views(const std::vector<at::Tensor>& xs, const at::Tensor& lam,
                                        const at::Tensor& method, const std::vector<at::Tensor>& y0,
                                        const std::vector<at::Tensor>& x0, const std::vector<at::Tensor>& cut_h,
                                        const std::vector<at::Tensor>& cut_w, bool allow_resize) {
  TORCH_CHECK(!xs.empty(), "batch_mix: no views");
  TORCH_CHECK(static_cast<int>(xs.size()) <= kMixMaxViews, "batch_mix: at most ", kMixMaxViews, " views per launch");
  TORCH_CHECK(y0.size() == xs.size() && x0.size() == xs.size() && cut_h.size() == xs.size() &&
                  cut_w.size() == xs.size(),
              "batch_mix: one y0/x0/cut_h/cut_w per view");
  const at::Tensor& ref = xs[0];
  SDMP_CHECK_DEVICE(ref);
  DeviceGuard guard(ref);
  TORCH_CHECK(ref.dim() == 4, "batch_mix: views must be [n, C, H, W], got ", ref.sizes());
  const int64_t n = ref.size(0);
  TORCH_CHECK(n <= 2 * 65535, "batch_mix: batch size ", n, " above the launch limit 131070");
  MixParams p;
  p.n = static_cast<int>(n);
  p.nviews = static_cast<int>(xs.size());
  p.dtype = dtype_tag(ref);
  p.allow_resize = allow_resize;
  p.packs = static_cast<int>(tuning_env("SDMP_MIX_PACKS", 1, 1, 4, 1, "1, 2 or 4"));
  TORCH_CHECK(p.packs != 3, "SDMP_MIX_PACKS=3: expected 1, 2 or 4");
  p.staged = tuning_env("SDMP_MIX_STAGED", 0, 0, 1, 1, "0 or 1") == 1;
  CHECK_SAME_DEVICE(lam, ref);
  CHECK_SAME_DEVICE(method, ref);
  CHECK_SHAPE(lam, n);
  CHECK_SHAPE(method, n);
  CHECK_DTYPE(lam, at::kFloat);
  CHECK_DTYPE(method, at::kLong);
  CHECK_CONTIGUOUS(lam);
  CHECK_CONTIGUOUS(method);
  p.lam = lam.data_ptr<float>();
  p.method = method.data_ptr<int64_t>();
  const int64_t vec = 16 / ref.element_size();
  p.vec_ok = true;
  std::vector<at::Tensor> outs;
  outs.reserve(xs.size());
  for (size_t k = 0; k < xs.size(); ++k) {
    const at::Tensor& x = xs[k];
    CHECK_SAME_DEVICE(x, ref);
    CHECK_CONTIGUOUS(x);
    TORCH_CHECK(x.dim() == 4 && x.size(0) == n, "batch_mix: view ", k, " must be [", n, ", C, H, W], got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "batch_mix: all views must share one dtype");
    for (const at::Tensor* t : {&y0[k], &x0[k], &cut_h[k], &cut_w[k]}) {
      CHECK_SAME_DEVICE(*t, ref);
      CHECK_CONTIGUOUS(*t);
      CHECK_SHAPE(*t, n);
      CHECK_DTYPE(*t, at::kLong);
    }
    outs.push_back(new_like(x));
    MixView& v = p.views[k];
    v.x = x.data_ptr();
    v.out = outs.back().data_ptr();
    v.C = static_cast<int>(x.size(1));
    v.H = static_cast<int>(x.size(2));
    v.W = static_cast<int>(x.size(3));
    v.y0 = y0[k].data_ptr<int64_t>();
    v.x0 = x0[k].data_ptr<int64_t>();
    v.cut_h = cut_h[k].data_ptr<int64_t>();
    v.cut_w = cut_w[k].data_ptr<int64_t>();
    p.vec_ok = p.vec_ok && vec_aligned(x, v.W) && v.W % vec == 0;
    TORCH_CHECK(x.numel() / std::max<int64_t>(n, 1) < (int64_t{1} << 31), "batch_mix: view ", k,
                " has 2^31 or more elements per sample");
  }
  SDMP_CHECK_STATUS(batch_mix(p, current_stream(ref)));
  return outs;
}

}  // namespace sdmp
