#include "../cpu/add_act.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cpu_add_act(py::module_& m) {
  m.def("add_act", [](uintptr_t a, uintptr_t b, uintptr_t out, int64_t n, int dtype, int act) {
    py::gil_scoped_release nogil;
    cpu::add_act(in_ptr(a), in_ptr(b), out_ptr(out), n, dtype, act);
  });
  m.def("add_act_backward", [](uintptr_t grad, uintptr_t out, uintptr_t grad_in, int64_t n, int dtype, int act) {
    py::gil_scoped_release nogil;
    cpu::add_act_backward(in_ptr(grad), in_ptr(out), out_ptr(grad_in), n, dtype, act);
  });
}
}  // namespace fastcnn::bindings
