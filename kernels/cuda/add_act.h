// CUDA add_act: out = act(a + b); grad_in = grad * act'(out). Dense tensors of one layout.
// Returns a cudaError_t as int (0 = success).
#pragma once
#include <cstdint>

namespace fastcnn::cuda {
int add_act(const void* a, const void* b, void* out, int64_t n, int dtype, int act, void* stream);
int add_act_backward(const void* grad, const void* out, void* grad_in, int64_t n, int dtype, int act,
                     void* stream);
}  // namespace fastcnn::cuda
