// conv2d on the shared GEMM core (implicit_gemm.cuh, problems in conv2d_problems.cuh), plus direct
// kernels for depthwise convolution, whose per-group GEMM would be a single column.
#include "conv2d.h"
#include "conv2d_problems.cuh"

namespace fastcnn::cuda {
namespace {

using gemm::ConvShape;

struct Strides4 {
  int64_t v[4];
};
Strides4 strides4(const int64_t* s) { return {{s[0], s[1], s[2], s[3]}}; }
Strides4 no_strides() { return {{0, 0, 0, 0}}; }

bool is_depthwise(const ConvGeometry& g) { return g.c_per_group() == 1 && g.k_per_group() == 1; }

// (n, c, h, w) of flat index i over [N, C, Hs, Ws]: channels fastest for channels_last tensors (coalesced),
// else w fastest.
__device__ __forceinline__ void split_index(int64_t i, int64_t C, int64_t Hs, int64_t Ws, bool channels_fastest,
                                            int64_t& n, int64_t& c, int64_t& h, int64_t& w) {
  if (channels_fastest) {
    c = i % C;
    i /= C;
    w = i % Ws;
    i /= Ws;
    h = i % Hs;
    n = i / Hs;
  } else {
    w = i % Ws;
    i /= Ws;
    h = i % Hs;
    i /= Hs;
    c = i % C;
    n = i / C;
  }
}

constexpr int kDirectThreads = 256;

template <class T>
__global__ void depthwise_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                         const T* __restrict__ residual, T* __restrict__ out, const ConvShape g,
                                         const Strides4 xs, const Strides4 ws, const Strides4 rs, const Strides4 os,
                                         const int act, const bool channels_fastest) {
  using F = dacc_t<T>;
  const int64_t total = g.N * g.C * g.OH * g.OW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow;
    split_index(i, g.C, g.OH, g.OW, channels_fastest, n, c, oh, ow);
    const T* xp = x + n * xs.v[0] + c * xs.v[1];
    const T* wp = w + c * ws.v[0];
    F acc = F(0);
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t ih = oh * g.sh - g.ph + r * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t iw = ow * g.sw - g.pw + s * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        acc += dload(xp, ih * xs.v[2] + iw * xs.v[3]) * dload(wp, r * ws.v[2] + s * ws.v[3]);
      }
    }
    if (bias != nullptr) acc += dload(bias, c);
    if (residual != nullptr) acc += dload(residual, n * rs.v[0] + c * rs.v[1] + oh * rs.v[2] + ow * rs.v[3]);
    dstore(out, n * os.v[0] + c * os.v[1] + oh * os.v[2] + ow * os.v[3], dapply_act<F>(acc, act));
  }
}

// Each input pixel gathers the (r, oh) pairs with oh * stride = ih + pad - r * dil.
template <class T>
__global__ void depthwise_input_grad_kernel(const T* __restrict__ grad, const T* __restrict__ w,
                                            T* __restrict__ grad_x, const ConvShape g, const Strides4 gs,
                                            const Strides4 ws, const Strides4 xs, const bool channels_fastest) {
  using F = dacc_t<T>;
  const int64_t total = g.N * g.C * g.H * g.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, ih, iw;
    split_index(i, g.C, g.H, g.W, channels_fastest, n, c, ih, iw);
    const T* gp = grad + n * gs.v[0] + c * gs.v[1];
    const T* wp = w + c * ws.v[0];
    F acc = F(0);
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t th = ih + g.ph - r * g.dh;
      if (th < 0 || th % g.sh != 0 || th / g.sh >= g.OH) continue;
      const int64_t oh = th / g.sh;
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t tw = iw + g.pw - s * g.dw;
        if (tw < 0 || tw % g.sw != 0 || tw / g.sw >= g.OW) continue;
        acc += dload(gp, oh * gs.v[2] + (tw / g.sw) * gs.v[3]) * dload(wp, r * ws.v[2] + s * ws.v[3]);
      }
    }
    dstore(grad_x, n * xs.v[0] + c * xs.v[1] + ih * xs.v[2] + iw * xs.v[3], acc);
  }
}

// grid (ceil(C / 32), R * S), block (32 channels, 8 pixel lanes): each lane sums a fixed stride of the
// N*OH*OW pixels, then lane sums are added in lane order. Deterministic, no atomics.
constexpr int kWgradLanes = 8;
template <class T>
__global__ void depthwise_weight_grad_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                             T* __restrict__ grad_w, const ConvShape g, const Strides4 gs,
                                             const Strides4 xs, const Strides4 wgs) {
  using F = dacc_t<T>;
  __shared__ F lane_sum[kWgradLanes][32];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const int64_t r = blockIdx.y / g.S, s = blockIdx.y % g.S;
  F acc = F(0);
  if (c < g.C) {
    const int64_t pixels = g.N * g.OH * g.OW;
    for (int64_t p = threadIdx.y; p < pixels; p += kWgradLanes) {
      const int64_t ow = p % g.OW, t = p / g.OW, oh = t % g.OH, n = t / g.OH;
      const int64_t ih = oh * g.sh - g.ph + r * g.dh, iw = ow * g.sw - g.pw + s * g.dw;
      if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
      acc += dload(grad, n * gs.v[0] + c * gs.v[1] + oh * gs.v[2] + ow * gs.v[3]) *
             dload(x, n * xs.v[0] + c * xs.v[1] + ih * xs.v[2] + iw * xs.v[3]);
    }
  }
  lane_sum[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < g.C) {
    F sum = lane_sum[0][threadIdx.x];
    for (int l = 1; l < kWgradLanes; ++l) sum += lane_sum[l][threadIdx.x];
    dstore(grad_w, c * wgs.v[0] + r * wgs.v[2] + s * wgs.v[3], sum);
  }
}

bool channels_fastest(const int64_t* stride) { return gemm::denser(stride[1], stride[3]); }

}  // namespace

int conv2d_forward(const void* x, const int64_t* x_stride, const void* w, const int64_t* w_stride,
                   const void* bias, const void* residual, const int64_t* residual_stride, void* out,
                   const int64_t* out_stride, const ConvGeometry& g, int dtype, int act, void* stream) {
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const T* wt = static_cast<const T*>(w);
    const T* bt = static_cast<const T*>(bias);
    const T* rt = static_cast<const T*>(residual);
    T* ot = static_cast<T*>(out);
    if (is_depthwise(g)) {
      const int64_t total = g.N * g.C * g.OH * g.OW;
      depthwise_forward_kernel<T><<<grid_for(total, kDirectThreads), kDirectThreads, 0, cudaStream_t(stream)>>>(
          xt, wt, bt, rt, ot, gemm::conv_shape(g), strides4(x_stride), strides4(w_stride),
          rt != nullptr ? strides4(residual_stride) : no_strides(), strides4(out_stride), act,
          channels_fastest(out_stride));
      return int(cudaGetLastError());
    }
    const auto prob =
        gemm::make_conv_forward<T>(xt, x_stride, wt, w_stride, bt, rt, residual_stride, ot, out_stride, g, act);
    return gemm::launch_gemm<T>(prob, prob.M, g.groups, gemm::SplitPlan{1, 0}, nullptr, stream);
  });
}

int conv2d_input_grad(const void* grad, const int64_t* grad_stride, const void* w, const int64_t* w_stride,
                      void* grad_x, const int64_t* grad_x_stride, const ConvGeometry& g, int dtype, void* stream) {
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gt = static_cast<const T*>(grad);
    const T* wt = static_cast<const T*>(w);
    T* xt = static_cast<T*>(grad_x);
    if (is_depthwise(g)) {
      const int64_t total = g.N * g.C * g.H * g.W;
      depthwise_input_grad_kernel<T><<<grid_for(total, kDirectThreads), kDirectThreads, 0, cudaStream_t(stream)>>>(
          gt, wt, xt, gemm::conv_shape(g), strides4(grad_stride), strides4(w_stride), strides4(grad_x_stride),
          channels_fastest(grad_x_stride));
      return int(cudaGetLastError());
    }
    const auto prob = gemm::make_conv_input_grad<T>(gt, grad_stride, wt, w_stride, xt, grad_x_stride, g);
    // Rows of the largest stride phase: ceil(H / stride) by ceil(W / stride) pixels per image.
    const int64_t max_M = g.N * gemm::ceil_div(g.H, g.stride_h) * gemm::ceil_div(g.W, g.stride_w);
    return gemm::launch_gemm<T>(prob, max_M, g.groups * g.stride_h * g.stride_w, gemm::SplitPlan{1, 0}, nullptr,
                                stream);
  });
}

int64_t conv2d_weight_grad_workspace(const ConvGeometry& g, int dtype) {
  if (is_depthwise(g)) return 0;
  const gemm::SplitPlan plan = gemm::conv_weight_grad_plan(g, dtype);
  return plan.splits > 1 ? plan.splits * g.groups * g.k_per_group() * g.R * g.S * g.c_per_group() : 0;
}

int conv2d_weight_grad(const void* grad, const int64_t* grad_stride, const void* x, const int64_t* x_stride,
                       void* grad_w, const int64_t* grad_w_stride, void* workspace, const ConvGeometry& g,
                       int dtype, void* stream) {
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gt = static_cast<const T*>(grad);
    const T* xt = static_cast<const T*>(x);
    T* wt = static_cast<T*>(grad_w);
    if (is_depthwise(g)) {
      const dim3 grid(unsigned(gemm::ceil_div(g.C, 32)), unsigned(g.R * g.S));
      if (grid.x > 0x7fffffffu || g.R * g.S > 65535) return int(cudaErrorInvalidConfiguration);
      depthwise_weight_grad_kernel<T><<<grid, dim3(32, kWgradLanes), 0, cudaStream_t(stream)>>>(
          gt, xt, wt, gemm::conv_shape(g), strides4(grad_stride), strides4(x_stride), strides4(grad_w_stride));
      return int(cudaGetLastError());
    }
    const auto prob = gemm::make_conv_weight_grad<T>(gt, grad_stride, xt, x_stride, wt, grad_w_stride, g);
    return gemm::launch_gemm<T>(prob, prob.M, g.groups, gemm::conv_weight_grad_plan(g, dtype), workspace, stream);
  });
}

}  // namespace fastcnn::cuda
