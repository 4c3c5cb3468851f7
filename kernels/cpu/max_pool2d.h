// CPU max_pool2d: output and int64 indices (flat h * W + w within the plane, as
// torch's max_pool2d_with_indices), and the backward that scatters the gradient
// back through the indices. Strides in the geometry are honoured; the output-side
// tensors (output and indices, or grad_output and indices) share one set of strides.
// indices may be null: the forward then writes the values only (inference).
#pragma once
#include <cstdint>

#include "fastcnn/pool_geometry.h"

namespace fastcnn::cpu {
void max_pool2d(const void* input, void* out, int64_t* indices, const Pool2dGeometry& g, int dtype);
void max_pool2d_backward(const void* grad_out, const int64_t* indices, void* grad_in, const Pool2dGeometry& g,
                         int dtype);
}  // namespace fastcnn::cpu
