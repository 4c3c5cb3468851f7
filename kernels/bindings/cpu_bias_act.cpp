#include "../cpu/bias_act.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cpu_bias_act(py::module_& m) {
  m.def("bias_act", [](uintptr_t x, uintptr_t bias, uintptr_t out, int64_t n, int64_t channels, int64_t inner,
                       int dtype, int act) {
    py::gil_scoped_release nogil;
    cpu::bias_act(in_ptr(x), in_ptr(bias), out_ptr(out), n, channels, inner, dtype, act);
  });
  m.def("bias_act_backward", [](uintptr_t grad, uintptr_t out, uintptr_t grad_x, uintptr_t grad_bias, int64_t n,
                                int64_t channels, int64_t inner, int dtype, int act) {
    py::gil_scoped_release nogil;
    cpu::bias_act_backward(in_ptr(grad), in_ptr(out), out_ptr(grad_x), out_ptr(grad_bias), n, channels, inner,
                           dtype, act);
  });
}
}  // namespace fastcnn::bindings
