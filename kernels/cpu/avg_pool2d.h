// CPU avg_pool2d and its backward, with PyTorch's window and divisor rules.
// Geometry strides: input (forward) / grad_input (backward) and output / grad_output.
// The tensors must be dense along W (NCHW) or along C (channels_last).
#pragma once
#include <cstdint>

#include "fastcnn/pool_geometry.h"

namespace fastcnn::cpu {
void avg_pool2d(const void* input, void* output, const Pool2dGeometry& g, bool count_include_pad, int dtype);
void avg_pool2d_backward(const void* grad_output, void* grad_input, const Pool2dGeometry& g,
                         bool count_include_pad, int dtype);
}  // namespace fastcnn::cpu
