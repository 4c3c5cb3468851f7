#include <vector>

#include "../cpu/max_pool2d.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cpu_max_pool2d(py::module_& m) {
  m.def("max_pool2d", [](uintptr_t input, uintptr_t out, uintptr_t indices, const std::vector<int64_t>& geometry,
                         int dtype) {
    const Pool2dGeometry g = pool_geometry_from_list(geometry);
    py::gil_scoped_release nogil;
    cpu::max_pool2d(in_ptr(input), out_ptr(out), static_cast<int64_t*>(out_ptr(indices)), g, dtype);
  });
  m.def("max_pool2d_backward", [](uintptr_t grad_out, uintptr_t indices, uintptr_t grad_in,
                                  const std::vector<int64_t>& geometry, int dtype) {
    const Pool2dGeometry g = pool_geometry_from_list(geometry);
    py::gil_scoped_release nogil;
    cpu::max_pool2d_backward(in_ptr(grad_out), static_cast<const int64_t*>(in_ptr(indices)), out_ptr(grad_in), g,
                             dtype);
  });
}
}  // namespace fastcnn::bindings
