// Average pooling, one thread per output element (forward) or per input element
// (backward, a gather over the windows that hold it: no atomics, fixed order).
// Threads walk the elements in memory order of their layout so that loads and
// stores coalesce in NCHW and in channels_last alike.
#include "avg_pool2d.h"
#include "fastcnn/cuda_scalar.cuh"

namespace fastcnn::cuda {
namespace {

constexpr int kThreads = 256;

// Divisor of window o along one axis: its span up to size + p with padding
// counted, else the part inside [0, size); at least 1, so that an empty window
// (not reachable through the op's checks) averages to 0 as in PyTorch.
__device__ __forceinline__ int64_t axis_divisor(int64_t o, int64_t size, int64_t k, int64_t s, int64_t p,
                                                bool count_include_pad) {
  const int64_t start = o * s - p;
  const int64_t stop = min(start + k, size + p);
  const int64_t d = count_include_pad ? stop - start : min(stop, size) - max(start, int64_t(0));
  return max(d, int64_t(1));
}

// Splits a flat index into (n, c, y, x) in NCHW or channels_last order.
__device__ __forceinline__ void unflatten(int64_t i, int64_t C, int64_t Y, int64_t X, bool channels_last,
                                          int64_t& n, int64_t& c, int64_t& y, int64_t& x) {
  if (channels_last) {
    c = i % C; i /= C;
    x = i % X; i /= X;
    y = i % Y; n = i / Y;
  } else {
    x = i % X; i /= X;
    y = i % Y; i /= Y;
    c = i % C; n = i / C;
  }
}

template <class T>
__global__ void avg_pool2d_kernel(const T* __restrict__ in, T* __restrict__ out, Pool2dGeometry g,
                                  bool count_include_pad, bool channels_last, int64_t total) {
  using F = dacc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow;
    unflatten(i, g.C, g.OH, g.OW, channels_last, n, c, oh, ow);
    const int64_t h0 = max(oh * g.sH - g.pH, int64_t(0)), h1 = min(oh * g.sH - g.pH + g.kH, g.H);
    const int64_t w0 = max(ow * g.sW - g.pW, int64_t(0)), w1 = min(ow * g.sW - g.pW + g.kW, g.W);
    const T* base = in + n * g.in_stride[0] + c * g.in_stride[1];
    F sum = F(0);
    for (int64_t ih = h0; ih < h1; ++ih)
      for (int64_t iw = w0; iw < w1; ++iw) sum += dload(base, ih * g.in_stride[2] + iw * g.in_stride[3]);
    const int64_t divisor = axis_divisor(oh, g.H, g.kH, g.sH, g.pH, count_include_pad) *
                            axis_divisor(ow, g.W, g.kW, g.sW, g.pW, count_include_pad);
    dstore(out, n * g.out_stride[0] + c * g.out_stride[1] + oh * g.out_stride[2] + ow * g.out_stride[3],
           sum / F(divisor));
  }
}

template <class T>
__global__ void avg_pool2d_backward_kernel(const T* __restrict__ grad_out, T* __restrict__ grad_in,
                                           Pool2dGeometry g, bool count_include_pad, bool channels_last,
                                           int64_t total) {
  using F = dacc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, ih, iw;
    unflatten(i, g.C, g.H, g.W, channels_last, n, c, ih, iw);
    // Output o holds input i when o*s - p <= i < o*s - p + k.
    const int64_t oh0 = ih + g.pH < g.kH ? 0 : (ih + g.pH - g.kH) / g.sH + 1;
    const int64_t oh1 = min((ih + g.pH) / g.sH + 1, g.OH);
    const int64_t ow0 = iw + g.pW < g.kW ? 0 : (iw + g.pW - g.kW) / g.sW + 1;
    const int64_t ow1 = min((iw + g.pW) / g.sW + 1, g.OW);
    const T* base = grad_out + n * g.out_stride[0] + c * g.out_stride[1];
    F sum = F(0);
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const int64_t dh = axis_divisor(oh, g.H, g.kH, g.sH, g.pH, count_include_pad);
      for (int64_t ow = ow0; ow < ow1; ++ow) {
        const int64_t dw = axis_divisor(ow, g.W, g.kW, g.sW, g.pW, count_include_pad);
        sum += dload(base, oh * g.out_stride[2] + ow * g.out_stride[3]) / F(dh * dw);
      }
    }
    dstore(grad_in, n * g.in_stride[0] + c * g.in_stride[1] + ih * g.in_stride[2] + iw * g.in_stride[3], sum);
  }
}

}  // namespace

int avg_pool2d(const void* input, void* output, const Pool2dGeometry& g, bool count_include_pad, int dtype,
               void* stream) {
  const int64_t total = g.N * g.C * g.OH * g.OW;
  if (total == 0) return 0;
  const bool channels_last = g.out_stride[1] < g.out_stride[3];
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    avg_pool2d_kernel<T><<<grid_for(total, kThreads), kThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(input), static_cast<T*>(output), g, count_include_pad, channels_last, total);
    return int(cudaGetLastError());
  });
}

int avg_pool2d_backward(const void* grad_output, void* grad_input, const Pool2dGeometry& g,
                        bool count_include_pad, int dtype, void* stream) {
  const int64_t total = g.N * g.C * g.H * g.W;
  if (total == 0) return 0;
  const bool channels_last = g.in_stride[1] < g.in_stride[3];
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    avg_pool2d_backward_kernel<T><<<grid_for(total, kThreads), kThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(grad_output), static_cast<T*>(grad_input), g, count_include_pad, channels_last,
        total);
    return int(cudaGetLastError());
  });
}

}  // namespace fastcnn::cuda
