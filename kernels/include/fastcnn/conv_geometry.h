// The shape of one 2-D convolution. Tensors are addressed by element strides in
// logical order: input/grad_input and output/grad_output/residual (N, C, H, W),
// weight (C_out, C / groups, KH, KW). Output position (oh, ow) reads input rows
// oh * stride_h - pad_h + kh * dil_h (and likewise for columns); positions outside
// the input are zero. pad_h/pad_w are the top/left padding: the bottom/right
// padding is implied by out_h/out_w, so uneven ("same") padding needs nothing more.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace fastcnn {

struct ConvGeometry {
  int64_t N, C, H, W;        // input
  int64_t K, R, S;           // output channels, kernel height, kernel width
  int64_t OH, OW;            // output size
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups;            // C and K are both divisible by groups

  int64_t c_per_group() const { return C / groups; }
  int64_t k_per_group() const { return K / groups; }
  // No padding on any side: every window lies inside the input. pad_h == pad_w == 0
  // alone leaves out the bottom and right padding ("same" with an even kernel).
  bool unpadded() const {
    return pad_h == 0 && pad_w == 0 && (OH - 1) * stride_h + (R - 1) * dil_h < H &&
           (OW - 1) * stride_w + (S - 1) * dil_w < W;
  }
};

// Built from the flat list fastcnn/ops/conv_geometry.py sends, in field order.
inline ConvGeometry conv_geometry_from_list(const std::vector<int64_t>& v) {
  if (v.size() != 16) throw std::invalid_argument("fastcnn: conv geometry needs 16 values");
  ConvGeometry g{};
  int64_t* fields[] = {&g.N,  &g.C,        &g.H,        &g.W,     &g.K,     &g.R,     &g.S,     &g.OH,
                       &g.OW, &g.stride_h, &g.stride_w, &g.pad_h, &g.pad_w, &g.dil_h, &g.dil_w, &g.groups};
  for (int i = 0; i < 16; ++i) *fields[i] = v[i];
  return g;
}

// Four element strides of a 4-D tensor, from the list Python sends.
inline void strides4_from_list(const std::vector<int64_t>& v, int64_t out[4]) {
  if (v.size() != 4) throw std::invalid_argument("fastcnn: a 4-D tensor needs 4 strides");
  for (int i = 0; i < 4; ++i) out[i] = v[i];
}

}  // namespace fastcnn
