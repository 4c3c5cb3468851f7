#include "../cuda/local_response_norm.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cuda_local_response_norm(py::module_& m) {
  m.def("local_response_norm", [](uintptr_t input, uintptr_t output, int64_t n, int64_t C, int64_t cs,
                                  int64_t size, double alpha, double beta, double k, int dtype, uintptr_t stream) {
    require_device();
    py::gil_scoped_release nogil;
    check_cuda(cuda::local_response_norm(in_ptr(input), out_ptr(output), n, C, cs, size, alpha, beta, k, dtype,
                                         stream_ptr(stream)),
               "local_response_norm");
  });
  m.def("local_response_norm_backward",
        [](uintptr_t grad_output, uintptr_t input, uintptr_t scratch, uintptr_t grad_input, int64_t n, int64_t C,
           int64_t cs, int64_t size, double alpha, double beta, double k, int dtype, uintptr_t stream) {
          require_device();
          py::gil_scoped_release nogil;
          check_cuda(cuda::local_response_norm_backward(in_ptr(grad_output), in_ptr(input), out_ptr(scratch),
                                                        out_ptr(grad_input), n, C, cs, size, alpha, beta, k, dtype,
                                                        stream_ptr(stream)),
                     "local_response_norm_backward");
        });
}
}  // namespace fastcnn::bindings
