// Python bindings of megaswift's CUDA ops: the module megaswift._C (setup.py) or megaswift_C (JIT build,
// megaswift/ops/cuda_ext.py). The kernels are in linear_ce.cu and packing.cu; ops.h documents them.
#include <torch/csrc/utils/pybind.h>  // pybind11 + the at::Tensor caster (lighter than torch/extension.h)

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megaswift CUDA ops (linear cross entropy row passes, packing)";
  // extras and workspace mirror the torch reference's signature (megaswift/ops/linear_ce_rows.py): the
  // kernel always computes every statistic in one pass and needs no workspace.
  m.def(
      "row_stats",
      [](const at::Tensor& z, const at::Tensor& target, bool /*extras*/, const py::object& /*workspace*/) {
        return megaswift::row_stats(z, target);
      },
      py::arg("z"), py::arg("target"), py::arg("extras") = true, py::arg("workspace") = py::none(),
      "Per row of logits z [n, v]: (max, sumexp, target logit, sum, sumexpz, argmax) as [n, 6] float32.");
  m.def(
      "logit_grad_",
      [](const at::Tensor& z, const at::Tensor& lse, const at::Tensor& target, const at::Tensor& coef,
         const py::object& /*workspace*/) { return megaswift::logit_grad_(z, lse, target, coef); },
      py::arg("z"), py::arg("lse"), py::arg("target"), py::arg("coef"), py::arg("workspace") = py::none(),
      "In place: z <- exp(z - lse) * (A + B z) - C [j == target] - D, coef = (A, B, C, D) per row. Returns z.");
  m.def("position_ids", &megaswift::position_ids, py::arg("cu_seqlens"), py::arg("total") = -1,
        "Positions restarting at 0 at every cu_seqlens boundary, [total] int64 (total < 0: cu_seqlens[-1]).");
  m.def("pack", &megaswift::pack, py::arg("padded"), py::arg("cu_seqlens"), py::arg("total") = -1,
        "padded [B, S, *F] -> packed [T, *F] (T = total, or cu_seqlens[-1] when total < 0).");
  m.def("unpack", &megaswift::unpack, py::arg("packed"), py::arg("cu_seqlens"), py::arg("max_len"),
        py::arg("pad_value") = 0.0, "packed [T, *F] -> padded [B, max_len, *F], pad_value elsewhere.");
}
