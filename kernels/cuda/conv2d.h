// CUDA conv2d: forward with fused bias, residual and activation, input gradient and weight gradient,
// all as tiled implicit GEMMs (kernels/cuda/implicit_gemm.cuh); depthwise (groups = C = K) uses direct
// kernels. Tensors are addressed through 4 element strides each (logical N, C, H, W / K, Cg, R, S), so
// any layout and channel-slice views work. bias, residual may be null. The weight gradient needs
// conv2d_weight_grad_workspace(g, dtype) elements of scratch (float, double for float64), null if 0.
// Everything runs on `stream`; the return value is a cudaError_t as int (0 = success).
#pragma once
#include <cstdint>

#include "fastcnn/conv_geometry.h"

namespace fastcnn::cuda {
int conv2d_forward(const void* x, const int64_t* x_stride, const void* w, const int64_t* w_stride,
                   const void* bias, const void* residual, const int64_t* residual_stride, void* out,
                   const int64_t* out_stride, const ConvGeometry& g, int dtype, int act, void* stream);
int conv2d_input_grad(const void* grad, const int64_t* grad_stride, const void* w, const int64_t* w_stride,
                      void* grad_x, const int64_t* grad_x_stride, const ConvGeometry& g, int dtype, void* stream);
int64_t conv2d_weight_grad_workspace(const ConvGeometry& g, int dtype);
int conv2d_weight_grad(const void* grad, const int64_t* grad_stride, const void* x, const int64_t* x_stride,
                       void* grad_w, const int64_t* grad_w_stride, void* workspace, const ConvGeometry& g,
                       int dtype, void* stream);
}  // namespace fastcnn::cuda
