// CUDA linear: out[m, n] = act(sum_k a[m, k] * b[n, k] + bias[n]) with arbitrary element strides on
// a, b and out (the backward passes transposed views), on the tiled GEMM core of implicit_gemm.cuh.
// bias may be null. Small M with long K is split over K deterministically through
// linear_workspace(M, N, K, dtype) elements of scratch (float, double for float64), null if 0.
// Runs on `stream`; returns a cudaError_t as int (0 = success).
#pragma once
#include <cstdint>

namespace fastcnn::cuda {
int64_t linear_workspace(int64_t M, int64_t N, int64_t K, int dtype);
int linear(const void* a, int64_t a_stride_m, int64_t a_stride_k, const void* b, int64_t b_stride_n,
           int64_t b_stride_k, const void* bias, void* out, int64_t out_stride_m, int64_t out_stride_n,
           void* workspace, int64_t M, int64_t N, int64_t K, int dtype, int act, void* stream);
}  // namespace fastcnn::cuda
