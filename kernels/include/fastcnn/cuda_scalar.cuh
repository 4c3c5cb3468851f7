// Device-side loads and stores: every storage type is computed in its
// accumulation type (float for the 16-bit types).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fastcnn/scalar.h"

namespace fastcnn::cuda {

template <class T> struct dacc { using type = float; };
template <> struct dacc<double> { using type = double; };
template <class T> using dacc_t = typename dacc<T>::type;

__device__ __forceinline__ float dload(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double dload(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float dload(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float dload(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void dstore(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void dstore(double* p, int64_t i, double v) { p[i] = v; }
__device__ __forceinline__ void dstore(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void dstore(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

template <class F> __device__ __forceinline__ F dapply_act(F v, int act) {
  switch (Act(act)) {
    case Act::relu: return v < F(0) ? F(0) : v;
    case Act::tanh: return tanh(v);
    case Act::sigmoid: return F(1) / (F(1) + exp(-v));
    default: return v;
  }
}

template <class F> __device__ __forceinline__ F dact_grad_from_output(F grad, F y, int act) {
  switch (Act(act)) {
    case Act::relu: return y <= F(0) ? F(0) : grad;  // NaN output passes grad, as torch does
    case Act::tanh: return grad * (F(1) - y * y);
    case Act::sigmoid: return grad * y * (F(1) - y);
    default: return grad;
  }
}

// Runs fn(T{}) with T the CUDA storage type of a DType code.
template <class Fn> inline int dispatch_cuda_dtype(int dtype, const Fn& fn) {
  switch (DType(dtype)) {
    case DType::float32: return fn(float{});
    case DType::float64: return fn(double{});
    case DType::float16: return fn(__half{});
    case DType::bfloat16: return fn(__nv_bfloat16{});
    default: return int(cudaErrorInvalidValue);
  }
}

// Enough blocks to fill any current GPU several times over; kernels loop.
inline unsigned grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = int64_t(132) * 32;
  if (blocks > cap) blocks = cap;
  return unsigned(blocks < 1 ? 1 : blocks);
}

}  // namespace fastcnn::cuda
