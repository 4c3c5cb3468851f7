// CPU global average pooling (the mean over H and W of each (n, c)) and its backward.
// GlobalPoolShape is plain C++ and shared with the CUDA kernels.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace fastcnn {

// Sizes and strides (elements): in_stride of input / grad_input (N, C, H, W);
// out_stride of output / grad_output (N, C; its H and W are 1).
struct GlobalPoolShape {
  int64_t N, C, H, W;
  int64_t in_stride[4];
  int64_t out_stride[2];
};

// From the flat list fastcnn/ops/global_avg_pool2d.py sends, in field order.
inline GlobalPoolShape global_pool_shape_from_list(const std::vector<int64_t>& v) {
  if (v.size() != 10) throw std::invalid_argument("fastcnn: global pool shape needs 10 values");
  return GlobalPoolShape{v[0], v[1], v[2], v[3], {v[4], v[5], v[6], v[7]}, {v[8], v[9]}};
}

namespace cpu {

// The input must be dense per plane (NCHW: H and W contiguous) or along C (channels_last).
void global_avg_pool2d(const void* input, void* output, const GlobalPoolShape& s, int dtype);
// grad_input must be dense per plane or along C; grad_output is read through its strides.
void global_avg_pool2d_backward(const void* grad_output, void* grad_input, const GlobalPoolShape& s, int dtype);

}  // namespace cpu
}  // namespace fastcnn
