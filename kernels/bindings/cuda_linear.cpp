#include "../cuda/linear.h"
#include "fastcnn/bindings.h"

namespace py = pybind11;

namespace fastcnn::bindings {
void bind_cuda_linear(py::module_& m) {
  m.def("linear_workspace",
        [](int64_t M, int64_t N, int64_t K, int dtype) { return cuda::linear_workspace(M, N, K, dtype); });
  m.def("linear", [](uintptr_t a, int64_t a_stride_m, int64_t a_stride_k, uintptr_t b, int64_t b_stride_n,
                     int64_t b_stride_k, uintptr_t bias, uintptr_t out, int64_t out_stride_m, int64_t out_stride_n,
                     uintptr_t workspace, int64_t M, int64_t N, int64_t K, int dtype, int act, uintptr_t stream) {
    require_device();
    py::gil_scoped_release nogil;
    check_cuda(cuda::linear(in_ptr(a), a_stride_m, a_stride_k, in_ptr(b), b_stride_n, b_stride_k, in_ptr(bias),
                            out_ptr(out), out_stride_m, out_stride_n, out_ptr(workspace), M, N, K, dtype, act,
                            stream_ptr(stream)),
               "linear");
  });
}
}  // namespace fastcnn::bindings
