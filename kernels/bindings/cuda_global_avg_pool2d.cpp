#include "../cuda/global_avg_pool2d.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cuda_global_avg_pool2d(py::module_& m) {
  m.def("global_avg_pool2d",
        [](uintptr_t input, uintptr_t output, const std::vector<int64_t>& shape, int dtype, uintptr_t stream) {
          require_device();
          const GlobalPoolShape s = global_pool_shape_from_list(shape);
          py::gil_scoped_release nogil;
          check_cuda(cuda::global_avg_pool2d(in_ptr(input), out_ptr(output), s, dtype, stream_ptr(stream)),
                     "global_avg_pool2d");
        });
  m.def("global_avg_pool2d_backward",
        [](uintptr_t grad_output, uintptr_t grad_input, const std::vector<int64_t>& shape, int dtype,
           uintptr_t stream) {
          require_device();
          const GlobalPoolShape s = global_pool_shape_from_list(shape);
          py::gil_scoped_release nogil;
          check_cuda(cuda::global_avg_pool2d_backward(in_ptr(grad_output), out_ptr(grad_input), s, dtype,
                                                      stream_ptr(stream)),
                     "global_avg_pool2d_backward");
        });
}
}  // namespace fastcnn::bindings
