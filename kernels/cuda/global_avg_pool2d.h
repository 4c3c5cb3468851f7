// CUDA global average pooling (the mean over H and W of each (n, c)) and its
// backward; any strides work. Returns a cudaError_t as int (0 = success).
#pragma once
#include <cstdint>

#include "../cpu/global_avg_pool2d.h"  // GlobalPoolShape (plain C++)

namespace fastcnn::cuda {
int global_avg_pool2d(const void* input, void* output, const GlobalPoolShape& s, int dtype, void* stream);
int global_avg_pool2d_backward(const void* grad_output, void* grad_input, const GlobalPoolShape& s, int dtype,
                               void* stream);
}  // namespace fastcnn::cuda
