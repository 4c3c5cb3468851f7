// CPU local response normalisation across channels (AlexNet's LRN) and its backward,
// over dense NCHW or channels_last tensors that share one layout (the Python op
// guarantees it):
//   s[c] = k + alpha/size * sum of x[c']^2 for c' in [c - size/2, c + (size-1)/2] within [0, C)
//   y[c] = x[c] / s[c]^beta
#pragma once
#include <cstdint>

namespace fastcnn {

// The op's shape and hyper-parameters, as fastcnn/ops/local_response_norm.py sends them.
struct LrnParams {
  int64_t N, C, HW;
  bool channels_last;
  int64_t size;
  double alpha, beta, k;
};

namespace cpu {
void local_response_norm(const void* input, void* output, const LrnParams& p, int dtype);
// grad_input from grad_output and the input (s is recomputed, nothing else is saved).
void local_response_norm_backward(const void* grad_output, const void* input, void* grad_input,
                                  const LrnParams& p, int dtype);
}  // namespace cpu
}  // namespace fastcnn
