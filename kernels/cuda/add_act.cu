// Residual add + activation and its backward over dense, same-layout tensors.
#include "add_act.h"
#include "fastcnn/cuda_scalar.cuh"

namespace fastcnn::cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void add_act_kernel(const T* __restrict__ a, const T* __restrict__ b,
                               T* __restrict__ out, int64_t n, int act) {
  using F = dacc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const F v = dload(a, i) + dload(b, i);
    dstore(out, i, dapply_act<F>(v, act));
  }
}

template <class T>
__global__ void add_act_backward_kernel(const T* __restrict__ grad, const T* __restrict__ out,
                                        T* __restrict__ grad_in, int64_t n, int act) {
  using F = dacc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    dstore(grad_in, i, dact_grad_from_output<F>(dload(grad, i), dload(out, i), act));
  }
}

}  // namespace

int add_act(const void* a, const void* b, void* out, int64_t n, int dtype, int act, void* stream) {
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    add_act_kernel<T><<<grid_for(n, kThreads), kThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out), n, act);
    return int(cudaGetLastError());
  });
}

int add_act_backward(const void* grad, const void* out, void* grad_in, int64_t n, int dtype,
                     int act, void* stream) {
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    add_act_backward_kernel<T><<<grid_for(n, kThreads), kThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(grad), static_cast<const T*>(out), static_cast<T*>(grad_in), n,
        act);
    return int(cudaGetLastError());
  });
}

}  // namespace fastcnn::cuda
