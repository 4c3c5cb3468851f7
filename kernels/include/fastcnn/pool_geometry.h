// The shape of one 2-D pooling: sizes, window and the strides (in elements,
// order N, C, H, W) of the input-side and output-side tensors.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace fastcnn {

struct Pool2dGeometry {
  int64_t N, C, H, W, OH, OW;
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
  int64_t in_stride[4];   // input (forward) or grad_input (backward)
  int64_t out_stride[4];  // output (forward) or grad_output and indices (backward)
};

// Built from the flat list that fastcnn/ops/pool_geometry.py sends, in field order.
inline Pool2dGeometry pool_geometry_from_list(const std::vector<int64_t>& v) {
  if (v.size() != 22) throw std::invalid_argument("fastcnn: pool geometry needs 22 values");
  Pool2dGeometry g{};
  int64_t* fields[] = {&g.N,  &g.C,  &g.H,  &g.W,  &g.OH, &g.OW, &g.kH,
                       &g.kW, &g.sH, &g.sW, &g.pH, &g.pW, &g.dH, &g.dW};
  for (int i = 0; i < 14; ++i) *fields[i] = v[i];
  for (int i = 0; i < 4; ++i) {
    g.in_stride[i] = v[14 + i];
    g.out_stride[i] = v[18 + i];
  }
  return g;
}

}  // namespace fastcnn
