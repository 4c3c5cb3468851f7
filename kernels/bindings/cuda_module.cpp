// fastcnn._cuda: the CUDA kernels, called with raw device pointers and torch's
// current stream handle (ints) from fastcnn/ops. The CUDA runtime is linked
// statically, so this imports on a machine without a GPU and says so when called.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fastcnn/bindings.h"

namespace fastcnn::bindings {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the "no device" error
    return 0;
  }
  return count;
}

void require_device() {
  if (device_count() == 0)
    throw std::runtime_error("fastcnn._cuda: no CUDA device is visible on this machine");
}

void check_cuda(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string("fastcnn._cuda.") + what + ": " +
                             cudaGetErrorString(cudaError_t(err)));
}

}  // namespace fastcnn::bindings

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastcnn CUDA kernels (static CUDA runtime, sm_80/sm_90 + PTX)";
  m.def("device_count", &fastcnn::bindings::device_count);
  m.def("runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
#define FASTCNN_BIND(op) fastcnn::bindings::bind_cuda_##op(m);
  FASTCNN_FOR_EACH_OP(FASTCNN_BIND)
#undef FASTCNN_BIND
}
