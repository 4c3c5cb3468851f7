// CPU bias_act: out = act(x + bias[c]), and its fused backward
// grad_x = grad * act'(out), grad_bias[c] = sum of grad_x over channel c.
// Dense tensors of one layout, as flat arrays of n elements where element i has
// channel (i / inner) % channels (inner = 1 when channels are the fastest axis).
#pragma once
#include <cstdint>

namespace fastcnn::cpu {
void bias_act(const void* x, const void* bias, void* out, int64_t n, int64_t channels, int64_t inner,
              int dtype, int act);
// grad_bias (channels elements, x's dtype) is summed in float (double for float64)
// over a partition fixed by the shape alone, so its bits never depend on the thread count.
void bias_act_backward(const void* grad, const void* out, void* grad_x, void* grad_bias, int64_t n,
                       int64_t channels, int64_t inner, int dtype, int act);
}  // namespace fastcnn::cpu
