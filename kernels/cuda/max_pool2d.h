// CUDA max_pool2d: output and int64 indices (flat h * W + w within the plane, as
// torch's max_pool2d_with_indices), and the backward as a gather (no atomics).
// Strides in the geometry are honoured; the output-side tensors share one set of
// strides. indices may be null: the forward then writes the values only (inference).
// Returns a cudaError_t as int (0 = success).
#pragma once
#include <cstdint>

#include "fastcnn/pool_geometry.h"

namespace fastcnn::cuda {
int max_pool2d(const void* input, void* out, int64_t* indices, const Pool2dGeometry& g, int dtype, void* stream);
int max_pool2d_backward(const void* grad_out, const int64_t* indices, void* grad_in, const Pool2dGeometry& g,
                        int dtype, void* stream);
}  // namespace fastcnn::cuda
