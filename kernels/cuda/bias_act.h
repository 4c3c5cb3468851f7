// CUDA bias_act: out = act(x + bias[c]), and its fused backward
// grad_x = grad * act'(out), grad_bias[c] = sum of grad_x over channel c.
// Dense tensors of one layout, as flat arrays of n elements where element i has
// channel (i / inner) % channels (inner = 1 when channels are the fastest axis).
// Returns a cudaError_t as int (0 = success).
#pragma once
#include <cstdint>

namespace fastcnn::cuda {
int bias_act(const void* x, const void* bias, void* out, int64_t n, int64_t channels, int64_t inner, int dtype,
             int act, void* stream);
// Elements of float (double for float64) scratch the backward needs: one partial
// sum per channel per split, the splits fixed by the shape alone (deterministic).
int64_t bias_act_backward_workspace(int64_t n, int64_t channels, int64_t inner);
int bias_act_backward(const void* grad, const void* out, void* grad_x, void* grad_bias, void* workspace,
                      int64_t n, int64_t channels, int64_t inner, int dtype, int act, void* stream);
}  // namespace fastcnn::cuda
