#include "../cpu/local_response_norm.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cpu_local_response_norm(py::module_& m) {
  m.def("local_response_norm", [](uintptr_t input, uintptr_t output, int64_t N, int64_t C, int64_t HW,
                                  bool channels_last, int64_t size, double alpha, double beta, double k,
                                  int dtype) {
    const LrnParams p{N, C, HW, channels_last, size, alpha, beta, k};
    py::gil_scoped_release nogil;
    cpu::local_response_norm(in_ptr(input), out_ptr(output), p, dtype);
  });
  m.def("local_response_norm_backward",
        [](uintptr_t grad_output, uintptr_t input, uintptr_t grad_input, int64_t N, int64_t C, int64_t HW,
           bool channels_last, int64_t size, double alpha, double beta, double k, int dtype) {
          const LrnParams p{N, C, HW, channels_last, size, alpha, beta, k};
          py::gil_scoped_release nogil;
          cpu::local_response_norm_backward(in_ptr(grad_output), in_ptr(input), out_ptr(grad_input), p, dtype);
        });
}
}  // namespace fastcnn::bindings
