#include <vector>

#include "../cpu/conv2d.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cpu_conv2d(py::module_& m) {
  using Strides = std::vector<int64_t>;
  m.def("conv2d_forward", [](uintptr_t x, const Strides& xs, uintptr_t w, const Strides& ws, uintptr_t bias,
                             uintptr_t residual, const Strides& rs, uintptr_t out, const Strides& os,
                             const std::vector<int64_t>& geometry, int dtype, int act, uintptr_t packed_w) {
    int64_t x_stride[4], w_stride[4], r_stride[4], o_stride[4];
    strides4_from_list(xs, x_stride);
    strides4_from_list(ws, w_stride);
    strides4_from_list(rs, r_stride);
    strides4_from_list(os, o_stride);
    const ConvGeometry g = conv_geometry_from_list(geometry);
    py::gil_scoped_release nogil;
    cpu::conv2d_forward(in_ptr(x), x_stride, in_ptr(w), w_stride, in_ptr(bias), in_ptr(residual), r_stride,
                        out_ptr(out), o_stride, g, dtype, act, in_ptr(packed_w));
  }, py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("w_stride"), py::arg("bias"), py::arg("residual"),
     py::arg("residual_stride"), py::arg("out"), py::arg("out_stride"), py::arg("geometry"), py::arg("dtype"),
     py::arg("act"), py::arg("packed_w") = 0);
  m.def("conv2d_forward_by_channel", [](const std::vector<int64_t>& geometry, const Strides& xs, const Strides& os) {
    int64_t x_stride[4], o_stride[4];
    strides4_from_list(xs, x_stride);
    strides4_from_list(os, o_stride);
    return cpu::conv2d_forward_by_channel(conv_geometry_from_list(geometry), x_stride, o_stride);
  }, py::arg("geometry"), py::arg("x_stride"), py::arg("out_stride"));
  m.def("conv2d_packed_weight_bytes", [](const std::vector<int64_t>& geometry, int dtype) {
    return cpu::conv2d_packed_weight_bytes(conv_geometry_from_list(geometry), dtype);
  });
  m.def("conv2d_pack_weight", [](uintptr_t w, const Strides& ws, const std::vector<int64_t>& geometry, int dtype,
                                 uintptr_t packed_w) {
    int64_t w_stride[4];
    strides4_from_list(ws, w_stride);
    const ConvGeometry g = conv_geometry_from_list(geometry);
    py::gil_scoped_release nogil;
    cpu::conv2d_pack_weight(in_ptr(w), w_stride, g, dtype, out_ptr(packed_w));
  });
  m.def("conv2d_input_grad", [](uintptr_t grad, const Strides& gs, uintptr_t w, const Strides& ws, uintptr_t grad_x,
                                const Strides& gxs, const std::vector<int64_t>& geometry, int dtype) {
    int64_t g_stride[4], w_stride[4], gx_stride[4];
    strides4_from_list(gs, g_stride);
    strides4_from_list(ws, w_stride);
    strides4_from_list(gxs, gx_stride);
    const ConvGeometry g = conv_geometry_from_list(geometry);
    py::gil_scoped_release nogil;
    cpu::conv2d_input_grad(in_ptr(grad), g_stride, in_ptr(w), w_stride, out_ptr(grad_x), gx_stride, g, dtype);
  });
  m.def("conv2d_weight_grad", [](uintptr_t grad, const Strides& gs, uintptr_t x, const Strides& xs, uintptr_t grad_w,
                                 const Strides& gws, const std::vector<int64_t>& geometry, int dtype) {
    int64_t g_stride[4], x_stride[4], gw_stride[4];
    strides4_from_list(gs, g_stride);
    strides4_from_list(xs, x_stride);
    strides4_from_list(gws, gw_stride);
    const ConvGeometry g = conv_geometry_from_list(geometry);
    py::gil_scoped_release nogil;
    cpu::conv2d_weight_grad(in_ptr(grad), g_stride, in_ptr(x), x_stride, out_ptr(grad_w), gw_stride, g, dtype);
  });
}
}  // namespace fastcnn::bindings
