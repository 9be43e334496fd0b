// Python bindings of the sdmp_fast kernels (wrapped as torch.library custom ops in sdmp_fast.kernels).
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace sdmp {
std::tuple<at::Tensor, at::Tensor> two_hot_ce_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, double, double);
at::Tensor two_hot_ce_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double);
std::vector<at::Tensor> dino_fwd(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, double, double, double, bool, bool, bool,
                                 int64_t);
std::vector<at::Tensor> dino_grad(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                  const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double,
                                  double, double, bool, bool);
std::vector<int64_t> dino_cluster_info(const at::Tensor&, const at::Tensor&);
void dino_grad_fixup(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
                     const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                     double, double, double);
std::vector<at::Tensor> batch_mix_views(const std::vector<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                        const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                                        const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, bool);
}  // namespace sdmp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sdmp_fast CUDA kernels (two-hot CE, fused DINO CE, batch-flip mixing)";
#ifdef SDMP_EMULATE
  m.attr("emulated") = true;
#else
  m.attr("emulated") = false;
#endif
#ifdef SDMP_BUILD_TAG  // built at install (setup.py): which sources and torch, checked before the module is used
#define SDMP_STRINGIFY_(x) #x
#define SDMP_STRINGIFY(x) SDMP_STRINGIFY_(x)
  m.attr("build_tag") = SDMP_STRINGIFY(SDMP_BUILD_TAG);
  m.attr("build_archs") = SDMP_STRINGIFY(SDMP_BUILD_ARCHS);  // e.g. 80_90: the GPUs its code runs on
#endif
  m.def("two_hot_ce_fwd", &sdmp::two_hot_ce_fwd, "two-hot soft-label CE forward -> (loss, lse)");
  m.def("two_hot_ce_bwd", &sdmp::two_hot_ce_bwd, "two-hot soft-label CE backward -> grad_logits");
  m.def("dino_fwd", &sdmp::dino_fwd, "fused SDMP-DINO CE forward");
  m.def("dino_grad", &sdmp::dino_grad, "fused SDMP-DINO CE gradient from saved statistics");
  m.def("dino_grad_fixup", &sdmp::dino_grad_fixup, "in-place correction of forward-computed DINO gradients");
  m.def("dino_cluster_info", &sdmp::dino_cluster_info,
        "cluster forward launch: blocks per cluster, smem bytes, threads, resident clusters");
  m.def("batch_mix_views", &sdmp::batch_mix_views, "fused batch-flip mixing of all views");
}
