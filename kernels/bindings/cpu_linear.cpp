#include "../cpu/linear.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cpu_linear(py::module_& m) {
  m.def("linear", [](uintptr_t a, int64_t a_stride_m, int64_t a_stride_k, uintptr_t b, int64_t b_stride_n,
                     int64_t b_stride_k, uintptr_t bias, uintptr_t out, int64_t out_stride_m, int64_t out_stride_n,
                     int64_t M, int64_t N, int64_t K, int dtype, int act) {
    py::gil_scoped_release nogil;
    cpu::linear(in_ptr(a), a_stride_m, a_stride_k, in_ptr(b), b_stride_n, b_stride_k, in_ptr(bias), out_ptr(out),
                out_stride_m, out_stride_n, M, N, K, dtype, act);
  });
}
}  // namespace fastcnn::bindings
