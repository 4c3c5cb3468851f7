#include "../cuda/bias_act.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cuda_bias_act(py::module_& m) {
  m.def("bias_act", [](uintptr_t x, uintptr_t bias, uintptr_t out, int64_t n, int64_t channels, int64_t inner,
                       int dtype, int act, uintptr_t stream) {
    require_device();
    py::gil_scoped_release nogil;
    check_cuda(cuda::bias_act(in_ptr(x), in_ptr(bias), out_ptr(out), n, channels, inner, dtype, act,
                              stream_ptr(stream)),
               "bias_act");
  });
  // Needs no device: the Python op allocates this much scratch before the launch.
  m.def("bias_act_backward_workspace", &cuda::bias_act_backward_workspace);
  m.def("bias_act_backward", [](uintptr_t grad, uintptr_t out, uintptr_t grad_x, uintptr_t grad_bias,
                                uintptr_t workspace, int64_t n, int64_t channels, int64_t inner, int dtype, int act,
                                uintptr_t stream) {
    require_device();
    py::gil_scoped_release nogil;
    check_cuda(cuda::bias_act_backward(in_ptr(grad), in_ptr(out), out_ptr(grad_x), out_ptr(grad_bias),
                                       out_ptr(workspace), n, channels, inner, dtype, act, stream_ptr(stream)),
               "bias_act_backward");
  });
}
}  // namespace fastcnn::bindings
