// CUDA local response normalisation across channels and its backward, over dense
// tensors that share one layout; element i is in channel (i / cs) % C, where cs,
// the channel stride, is H*W (NCHW) or 1 (channels_last). Returns a cudaError_t as int.
#pragma once
#include <cstdint>

namespace fastcnn::cuda {
int local_response_norm(const void* input, void* output, int64_t n, int64_t C, int64_t cs, int64_t size,
                        double alpha, double beta, double k, int dtype, void* stream);
// scratch: n elements of the accumulation type (float, double for float64), same layout.
int local_response_norm_backward(const void* grad_output, const void* input, void* scratch, void* grad_input,
                                 int64_t n, int64_t C, int64_t cs, int64_t size, double alpha, double beta,
                                 double k, int dtype, void* stream);
}  // namespace fastcnn::cuda
