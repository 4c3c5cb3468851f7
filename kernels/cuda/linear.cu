// linear on the shared GEMM core (implicit_gemm.cuh): plain strided operands, split-K for small M.
#include "linear.h"
#include "linear_problem.cuh"

namespace fastcnn::cuda {

int64_t linear_workspace(int64_t M, int64_t N, int64_t K, int dtype) {
  const gemm::SplitPlan plan = gemm::linear_plan(M, N, K, dtype);
  return plan.splits > 1 ? plan.splits * M * N : 0;
}

int linear(const void* a, int64_t a_stride_m, int64_t a_stride_k, const void* b, int64_t b_stride_n,
           int64_t b_stride_k, const void* bias, void* out, int64_t out_stride_m, int64_t out_stride_n,
           void* workspace, int64_t M, int64_t N, int64_t K, int dtype, int act, void* stream) {
  if (M <= 0 || N <= 0) return int(cudaSuccess);
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto prob = gemm::make_linear<T>(static_cast<const T*>(a), a_stride_m, a_stride_k, static_cast<const T*>(b),
                                           b_stride_n, b_stride_k, static_cast<const T*>(bias), static_cast<T*>(out),
                                           out_stride_m, out_stride_n, M, N, K, act);
    return gemm::launch_gemm<T>(prob, M, 1, gemm::linear_plan(M, N, K, dtype), workspace, stream);
  });
}

}  // namespace fastcnn::cuda
