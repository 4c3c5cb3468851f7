// The three convolution GEMMs, described for the core in implicit_gemm.cuh by their element addresses.
// Reduction orders put the channel index fastest, so channels_last tensors load along contiguous memory.
#pragma once
#include "fastcnn/conv_geometry.h"
#include "implicit_gemm.cuh"

namespace fastcnn::cuda::gemm {

// The geometry fields the device needs, as plain numbers (ConvGeometry's helpers are host-only).
struct ConvShape {
  int64_t N, C, H, W, K, R, S, OH, OW, sh, sw, ph, pw, dh, dw, groups, cg, kg;
};
inline ConvShape conv_shape(const ConvGeometry& g) {
  return {g.N,        g.C,        g.H,     g.W,     g.K,     g.R,     g.S,      g.OH,           g.OW,
          g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w, g.groups, g.c_per_group(), g.k_per_group()};
}

// Forward. M = N*OH*OW output pixels, N = output channels of the group, K = R*S*Cg as (r, s, c), c fastest.
// A = x gathered (padding by bounds), B[k, n] = w[group*Kg + n, c, r, s].
template <class T> struct ConvForwardProb : GemmOperands<T> {
  using F = dacc_t<T>;
  struct EpRow {
    int64_t out, res;
  };
  ConvShape g;
  int64_t xs[4], ws[4], rs[4], os[4];
  const T* bias;
  const T* residual;
  T* out;
  int act;
  int64_t group;

  FASTCNN_HD void select(int64_t z) { group = z; }
  FASTCNN_HD Entry a_outer(int64_t m) const {
    const int64_t ow = m % g.OW, t = m / g.OW, oh = t % g.OH, n = t / g.OH;
    const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
    return {n * xs[0] + ih0 * xs[2] + iw0 * xs[3], int32_t(ih0), int32_t(iw0)};
  }
  FASTCNN_HD Entry a_inner(int64_t k) const {
    const int64_t c = k % g.cg, rs_ = k / g.cg, s = rs_ % g.S, r = rs_ / g.S;
    const int64_t dy = r * g.dh, dx = s * g.dw;
    return {(group * g.cg + c) * xs[1] + dy * xs[2] + dx * xs[3], int32_t(dy), int32_t(dx)};
  }
  FASTCNN_HD Entry b_outer(int64_t n) const { return plain_entry((group * g.kg + n) * ws[0]); }
  FASTCNN_HD Entry b_inner(int64_t k) const {
    const int64_t c = k % g.cg, rs_ = k / g.cg, s = rs_ % g.S, r = rs_ / g.S;
    return plain_entry(c * ws[1] + r * ws[2] + s * ws[3]);
  }
  FASTCNN_HD EpRow ep_row(int64_t m) const {
    const int64_t ow = m % g.OW, t = m / g.OW, oh = t % g.OH, n = t / g.OH;
    return {n * os[0] + oh * os[2] + ow * os[3], n * rs[0] + oh * rs[2] + ow * rs[3]};
  }
  FASTCNN_HD void emit(const EpRow& e, int64_t, int64_t n, F v) const {
    const int64_t k = group * g.kg + n;
    if (bias != nullptr) v += F(to_acc(bias[k]));
    if (residual != nullptr) v += F(to_acc(residual[e.res + k * rs[1]]));
    store_acc(out + e.out + k * os[1], activate<F>(v, act));
  }
};

template <class T>
ConvForwardProb<T> make_conv_forward(const T* x, const int64_t* x_stride, const T* w, const int64_t* w_stride,
                                     const T* bias, const T* residual, const int64_t* residual_stride, T* out,
                                     const int64_t* out_stride, const ConvGeometry& geom, int act) {
  ConvForwardProb<T> p{};
  p.g = conv_shape(geom);
  for (int i = 0; i < 4; ++i) {
    p.xs[i] = x_stride[i];
    p.ws[i] = w_stride[i];
    p.rs[i] = residual != nullptr ? residual_stride[i] : 0;
    p.os[i] = out_stride[i];
  }
  p.a = x;
  p.b = w;
  p.M = geom.N * geom.OH * geom.OW;
  p.N = p.g.kg;
  p.K = geom.R * geom.S * p.g.cg;
  p.a_bound_h = int32_t(geom.H);
  p.a_bound_w = int32_t(geom.W);
  p.b_bound_h = p.b_bound_w = 1;
  p.a_along_k = denser(p.xs[1], p.xs[3]);  // channels_last: c is contiguous
  p.b_along_k = denser(p.ws[1], p.ws[0]);
  // Padding makes validity vary along output pixels, so x vectorises along channels only.
  p.a_vec = p.a_along_k && vec_ok(x, p.xs[1], {p.xs[0], p.xs[2], p.xs[3]}, p.g.cg);
  p.b_vec = p.b_along_k ? vec_ok(w, p.ws[1], {p.ws[0], p.ws[2], p.ws[3]}, p.g.cg)
                        : vec_ok(w, p.ws[0], {p.ws[1], p.ws[2], p.ws[3]}, p.g.kg);
  p.bias = bias;
  p.residual = residual;
  p.out = out;
  p.act = act;
  return p;
}

// The stride phase of one axis for the input gradient. Input rows i with (i + pad) % stride == rho are
// reached exactly by the taps r with (r * dil) % stride == rho, an arithmetic progression r0 + t * step,
// from output row (i + pad - r * dil) / stride = q - p with q = (i + pad) / stride, p = (r * dil - rho) / stride.
struct AxisPhase {
  int64_t first, count;  // input rows first + j * stride, j < count
  int64_t q_first;       // q of the first row
  int64_t r0, step, taps;
};
FASTCNN_HD int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}
FASTCNN_HD AxisPhase axis_phase(int64_t rho, int64_t size, int64_t stride, int64_t pad, int64_t dil, int64_t R) {
  AxisPhase a{};
  a.first = ((rho - pad) % stride + stride) % stride;
  a.count = a.first < size ? (size - 1 - a.first) / stride + 1 : 0;
  a.q_first = (a.first + pad) / stride;
  a.step = stride / gcd64(dil, stride);
  a.r0 = -1;
  for (int64_t r = 0; r < R && r < a.step; ++r)
    if ((r * dil) % stride == rho) {
      a.r0 = r;
      break;
    }
  a.taps = a.r0 < 0 ? 0 : (R - 1 - a.r0) / a.step + 1;
  return a;
}

// Input gradient, one GEMM per (group, stride phase): z = group * sh * sw + rho_h * sw + rho_w.
// M = N*count_h*count_w input pixels of the phase, N = Cg, K = taps_h*taps_w*Kg as (tap, k), k fastest.
// A = grad gathered at (q - p) (out-of-range output rows by bounds), B[k, c] = w[group*Kg + k, c, r, s].
template <class T> struct ConvInputGradProb : GemmOperands<T> {
  using F = dacc_t<T>;
  struct EpRow {
    int64_t off;
  };
  ConvShape g;
  int64_t gs[4], ws[4], xs[4];
  T* grad_x;
  int64_t group, rho_h, rho_w;
  AxisPhase ph_h, ph_w;

  FASTCNN_HD void select(int64_t z) {
    const int64_t phases = g.sh * g.sw, phase = z % phases;
    group = z / phases;
    rho_h = phase / g.sw;
    rho_w = phase % g.sw;
    ph_h = axis_phase(rho_h, g.H, g.sh, g.ph, g.dh, g.R);
    ph_w = axis_phase(rho_w, g.W, g.sw, g.pw, g.dw, g.S);
    this->M = g.N * ph_h.count * ph_w.count;
    this->K = ph_h.taps * ph_w.taps * g.kg;
  }
  // Tap index (r, s) and output offsets (p_h, p_w) of reduction index k.
  FASTCNN_HD void tap(int64_t k, int64_t& kk, int64_t& r, int64_t& s, int64_t& p_h, int64_t& p_w) const {
    kk = k % g.kg;
    const int64_t t = k / g.kg, th = t / ph_w.taps, tw = t % ph_w.taps;
    r = ph_h.r0 + th * ph_h.step;
    s = ph_w.r0 + tw * ph_w.step;
    p_h = (r * g.dh - rho_h) / g.sh;
    p_w = (s * g.dw - rho_w) / g.sw;
  }
  FASTCNN_HD void pixel(int64_t m, int64_t& n, int64_t& jh, int64_t& jw) const {
    jw = m % ph_w.count;
    const int64_t t = m / ph_w.count;
    jh = t % ph_h.count;
    n = t / ph_h.count;
  }
  FASTCNN_HD Entry a_outer(int64_t m) const {
    int64_t n, jh, jw;
    pixel(m, n, jh, jw);
    const int64_t qh = ph_h.q_first + jh, qw = ph_w.q_first + jw;
    return {n * gs[0] + qh * gs[2] + qw * gs[3], int32_t(qh), int32_t(qw)};
  }
  FASTCNN_HD Entry a_inner(int64_t k) const {
    int64_t kk, r, s, p_h, p_w;
    tap(k, kk, r, s, p_h, p_w);
    return {(group * g.kg + kk) * gs[1] - p_h * gs[2] - p_w * gs[3], int32_t(-p_h), int32_t(-p_w)};
  }
  FASTCNN_HD Entry b_outer(int64_t c) const { return plain_entry(c * ws[1]); }
  FASTCNN_HD Entry b_inner(int64_t k) const {
    int64_t kk, r, s, p_h, p_w;
    tap(k, kk, r, s, p_h, p_w);
    return plain_entry((group * g.kg + kk) * ws[0] + r * ws[2] + s * ws[3]);
  }
  FASTCNN_HD EpRow ep_row(int64_t m) const {
    int64_t n, jh, jw;
    pixel(m, n, jh, jw);
    const int64_t ih = ph_h.first + jh * g.sh, iw = ph_w.first + jw * g.sw;
    return {n * xs[0] + ih * xs[2] + iw * xs[3]};
  }
  FASTCNN_HD void emit(const EpRow& e, int64_t, int64_t c, F v) const {
    store_acc(grad_x + e.off + (group * g.cg + c) * xs[1], v);
  }
};

template <class T>
ConvInputGradProb<T> make_conv_input_grad(const T* grad, const int64_t* grad_stride, const T* w,
                                          const int64_t* w_stride, T* grad_x, const int64_t* grad_x_stride,
                                          const ConvGeometry& geom) {
  ConvInputGradProb<T> p{};
  p.g = conv_shape(geom);
  for (int i = 0; i < 4; ++i) {
    p.gs[i] = grad_stride[i];
    p.ws[i] = w_stride[i];
    p.xs[i] = grad_x_stride[i];
  }
  p.a = grad;
  p.b = w;
  p.N = p.g.cg;  // M and K are set per phase by select()
  p.a_bound_h = int32_t(geom.OH);
  p.a_bound_w = int32_t(geom.OW);
  p.b_bound_h = p.b_bound_w = 1;
  p.a_along_k = denser(p.gs[1], p.gs[3]);
  p.b_along_k = denser(p.ws[0], p.ws[1]);
  p.a_vec = p.a_along_k && vec_ok(grad, p.gs[1], {p.gs[0], p.gs[2], p.gs[3]}, p.g.kg);
  p.b_vec = p.b_along_k ? vec_ok(w, p.ws[0], {p.ws[1], p.ws[2], p.ws[3]}, p.g.kg)
                        : vec_ok(w, p.ws[1], {p.ws[0], p.ws[2], p.ws[3]}, p.g.cg);
  p.grad_x = grad_x;
  return p;
}

// Weight gradient, one GEMM per group. M = Kg output channels, N = R*S*Cg as (r, s, c), c fastest,
// K = N*OH*OW output pixels. A[m, p] = grad[n, group*Kg + m, oh, ow], B[p, (r, s, c)] = x gathered.
template <class T> struct ConvWeightGradProb : GemmOperands<T> {
  using F = dacc_t<T>;
  struct EpRow {
    int64_t off;
  };
  ConvShape g;
  int64_t gs[4], xs[4], wgs[4];
  T* grad_w;
  int64_t group;

  FASTCNN_HD void select(int64_t z) { group = z; }
  FASTCNN_HD Entry a_outer(int64_t m) const { return plain_entry((group * g.kg + m) * gs[1]); }
  FASTCNN_HD Entry a_inner(int64_t k) const {
    const int64_t ow = k % g.OW, t = k / g.OW, oh = t % g.OH, n = t / g.OH;
    return plain_entry(n * gs[0] + oh * gs[2] + ow * gs[3]);
  }
  FASTCNN_HD Entry b_outer(int64_t col) const {
    const int64_t c = col % g.cg, rs_ = col / g.cg, s = rs_ % g.S, r = rs_ / g.S;
    const int64_t dy = r * g.dh, dx = s * g.dw;
    return {(group * g.cg + c) * xs[1] + dy * xs[2] + dx * xs[3], int32_t(dy), int32_t(dx)};
  }
  FASTCNN_HD Entry b_inner(int64_t k) const {
    const int64_t ow = k % g.OW, t = k / g.OW, oh = t % g.OH, n = t / g.OH;
    const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
    return {n * xs[0] + ih0 * xs[2] + iw0 * xs[3], int32_t(ih0), int32_t(iw0)};
  }
  FASTCNN_HD EpRow ep_row(int64_t m) const { return {(group * g.kg + m) * wgs[0]}; }
  FASTCNN_HD void emit(const EpRow& e, int64_t, int64_t col, F v) const {
    const int64_t c = col % g.cg, rs_ = col / g.cg, s = rs_ % g.S, r = rs_ / g.S;
    store_acc(grad_w + e.off + c * wgs[1] + r * wgs[2] + s * wgs[3], v);
  }
};

template <class T>
ConvWeightGradProb<T> make_conv_weight_grad(const T* grad, const int64_t* grad_stride, const T* x,
                                            const int64_t* x_stride, T* grad_w, const int64_t* grad_w_stride,
                                            const ConvGeometry& geom) {
  ConvWeightGradProb<T> p{};
  p.g = conv_shape(geom);
  for (int i = 0; i < 4; ++i) {
    p.gs[i] = grad_stride[i];
    p.xs[i] = x_stride[i];
    p.wgs[i] = grad_w_stride[i];
  }
  p.a = grad;
  p.b = x;
  p.M = p.g.kg;
  p.N = geom.R * geom.S * p.g.cg;
  p.K = geom.N * geom.OH * geom.OW;
  p.a_bound_h = p.a_bound_w = 1;
  p.b_bound_h = int32_t(geom.H);
  p.b_bound_w = int32_t(geom.W);
  p.a_along_k = denser(p.gs[3], p.gs[1]);  // channels_last grad: output channels (m) are contiguous
  p.b_along_k = denser(p.xs[3], p.xs[1]);  // channels_last x: c (n of the GEMM) is contiguous
  p.a_vec = p.a_along_k ? vec_ok(grad, p.gs[3], {p.gs[0], p.gs[1], p.gs[2]}, geom.OW)
                        : vec_ok(grad, p.gs[1], {p.gs[0], p.gs[2], p.gs[3]}, p.g.kg);
  p.b_vec = !p.b_along_k && vec_ok(x, p.xs[1], {p.xs[0], p.xs[2], p.xs[3]}, p.g.cg);
  p.grad_w = grad_w;
  return p;
}

inline SplitPlan conv_weight_grad_plan(const ConvGeometry& geom, int dtype) {
  const TileShape t = tile_shape(dtype);
  const int64_t M = geom.k_per_group(), N = geom.R * geom.S * geom.c_per_group(), K = geom.N * geom.OH * geom.OW;
  return plan_split(geom.groups * ceil_div(M, t.bm) * ceil_div(N, t.bn), K, t.bk);
}

}  // namespace fastcnn::cuda::gemm
