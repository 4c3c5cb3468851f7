// CUDA avg_pool2d and its backward, with PyTorch's window and divisor rules.
// Geometry strides: input (forward) / grad_input (backward) and output / grad_output;
// any strides work. Returns a cudaError_t as int (0 = success).
#pragma once
#include <cstdint>

#include "fastcnn/pool_geometry.h"

namespace fastcnn::cuda {
int avg_pool2d(const void* input, void* output, const Pool2dGeometry& g, bool count_include_pad, int dtype,
               void* stream);
int avg_pool2d_backward(const void* grad_output, void* grad_input, const Pool2dGeometry& g,
                        bool count_include_pad, int dtype, void* stream);
}  // namespace fastcnn::cuda
