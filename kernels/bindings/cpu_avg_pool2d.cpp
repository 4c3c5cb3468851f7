#include "../cpu/avg_pool2d.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cpu_avg_pool2d(py::module_& m) {
  m.def("avg_pool2d", [](uintptr_t input, uintptr_t output, const std::vector<int64_t>& geometry,
                         bool count_include_pad, int dtype) {
    const Pool2dGeometry g = pool_geometry_from_list(geometry);
    py::gil_scoped_release nogil;
    cpu::avg_pool2d(in_ptr(input), out_ptr(output), g, count_include_pad, dtype);
  });
  m.def("avg_pool2d_backward", [](uintptr_t grad_output, uintptr_t grad_input, const std::vector<int64_t>& geometry,
                                  bool count_include_pad, int dtype) {
    const Pool2dGeometry g = pool_geometry_from_list(geometry);
    py::gil_scoped_release nogil;
    cpu::avg_pool2d_backward(in_ptr(grad_output), out_ptr(grad_input), g, count_include_pad, dtype);
  });
}
}  // namespace fastcnn::bindings
