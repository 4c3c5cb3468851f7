// CPU conv2d: forward with fused bias + residual + activation, input and weight
// gradients; implicit GEMMs on the blocked core (gemm_blocked.h). Tensors are
// addressed by 4 element strides in logical order (N, C, H, W) / (K, Cg, R, S).
#pragma once
#include <cstdint>

#include "fastcnn/conv_geometry.h"

namespace fastcnn::cpu {
// Whether conv2d_forward computes this call with output channels as GEMM rows (NCHW
// output, input dense along W, one input and at most 16 output channels per group):
// it then reads the input as it is (no channels_last copy) and ignores packed_w.
bool conv2d_forward_by_channel(const ConvGeometry& g, const int64_t* x_stride, const int64_t* out_stride);
// packed_w: the weight as conv2d_pack_weight left it, or null to pack it in the call.
void conv2d_forward(const void* x, const int64_t* x_stride, const void* w, const int64_t* w_stride,
                    const void* bias, const void* residual, const int64_t* residual_stride, void* out,
                    const int64_t* out_stride, const ConvGeometry& g, int dtype, int act, const void* packed_w);
// The forward's weight packed once for many calls (inference): its size in bytes (0
// where the forward packs nothing: depthwise), and the packing. Valid for every
// input size; only the weight's values, strides, dtype and the groups matter.
int64_t conv2d_packed_weight_bytes(const ConvGeometry& g, int dtype);
void conv2d_pack_weight(const void* w, const int64_t* w_stride, const ConvGeometry& g, int dtype, void* packed_w);
void conv2d_input_grad(const void* grad, const int64_t* grad_stride, const void* w, const int64_t* w_stride,
                       void* grad_x, const int64_t* grad_x_stride, const ConvGeometry& g, int dtype);
void conv2d_weight_grad(const void* grad, const int64_t* grad_stride, const void* x, const int64_t* x_stride,
                        void* grad_w, const int64_t* grad_w_stride, const ConvGeometry& g, int dtype);
}  // namespace fastcnn::cpu
