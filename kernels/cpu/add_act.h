// CPU add_act: out = act(a + b); grad_in = grad * act'(out). Dense tensors of one layout.
#pragma once
#include <cstdint>

namespace fastcnn::cpu {
void add_act(const void* a, const void* b, void* out, int64_t n, int dtype, int act);
void add_act_backward(const void* grad, const void* out, void* grad_in, int64_t n, int dtype, int act);
}  // namespace fastcnn::cpu
