// CPU linear: out[m, n] = act(sum_k a[m, k] * b[n, k] + bias[n]) on the blocked
// GEMM core, any element strides (the backward passes transposed views).
#pragma once
#include <cstdint>

namespace fastcnn::cpu {
void linear(const void* a, int64_t a_stride_m, int64_t a_stride_k, const void* b, int64_t b_stride_n,
            int64_t b_stride_k, const void* bias, void* out, int64_t out_stride_m, int64_t out_stride_n,
            int64_t M, int64_t N, int64_t K, int dtype, int act);
}  // namespace fastcnn::cpu
