// Max pooling with indices, and its backward as a gather.
// Forward: one thread per output element, threads numbered in the output's memory
// order (channels fastest for channels_last), so neighbouring threads read
// neighbouring inputs. The window is scanned in torch's order; an element replaces
// the running max if greater or NaN (first max wins ties, last NaN wins). Without
// an indices pointer the Indices = false instance keeps no index (inference).
// Backward: one thread per grad_input element, which visits the output positions
// whose windows can hold it in a fixed order and sums the gradients whose index is
// its own: no atomics, the same bits every run.
#include "fastcnn/cuda_scalar.cuh"
#include "max_pool2d.h"

namespace fastcnn::cuda {
namespace {

constexpr int kThreads = 256;

struct Coord {
  int64_t n, c, y, x;
};

// Element i of an (N, C, Y, X) tensor counted in memory order.
template <bool ChannelsLast>
__device__ __forceinline__ Coord coord_of(int64_t i, int64_t C, int64_t Y, int64_t X) {
  Coord k;
  if (ChannelsLast) {
    k.c = i % C;
    i /= C;
    k.x = i % X;
    i /= X;
    k.y = i % Y;
    k.n = i / Y;
  } else {
    k.x = i % X;
    i /= X;
    k.y = i % Y;
    i /= Y;
    k.c = i % C;
    k.n = i / C;
  }
  return k;
}

template <class T, bool ChannelsLast, bool Indices>
__global__ void max_pool2d_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t* __restrict__ ind,
                                  Pool2dGeometry g, int64_t total) {
  using F = dacc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Coord k = coord_of<ChannelsLast>(i, g.C, g.OH, g.OW);
    int64_t h0 = k.y * g.sH - g.pH, w0 = k.x * g.sW - g.pW;
    const int64_t h_end = min(h0 + (g.kH - 1) * g.dH + 1, g.H);
    const int64_t w_end = min(w0 + (g.kW - 1) * g.dW + 1, g.W);
    if (h0 < 0) h0 += (-h0 + g.dH - 1) / g.dH * g.dH;
    if (w0 < 0) w0 += (-w0 + g.dW - 1) / g.dW * g.dW;
    const T* plane = in + k.n * g.in_stride[0] + k.c * g.in_stride[1];
    F best = F(-INFINITY);
    int64_t best_idx = h0 * g.W + w0;
    for (int64_t ih = h0; ih < h_end; ih += g.dH) {
      for (int64_t iw = w0; iw < w_end; iw += g.dW) {
        const F v = dload(plane, ih * g.in_stride[2] + iw * g.in_stride[3]);
        if (v > best || isnan(v)) {
          best = v;
          if (Indices) best_idx = ih * g.W + iw;
        }
      }
    }
    const int64_t o =
        k.n * g.out_stride[0] + k.c * g.out_stride[1] + k.y * g.out_stride[2] + k.x * g.out_stride[3];
    dstore(out, o, best);
    if (Indices) ind[o] = best_idx;
  }
}

template <class T, bool ChannelsLast>
__global__ void max_pool2d_backward_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ ind,
                                           T* __restrict__ grad_in, Pool2dGeometry g, int64_t total) {
  using F = dacc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Coord k = coord_of<ChannelsLast>(i, g.C, g.H, g.W);
    const int64_t self = k.y * g.W + k.x;
    const int64_t base = k.n * g.out_stride[0] + k.c * g.out_stride[1];
    F sum = F(0);
    // Output row oh holds row y as tap kh when y = oh * sH - pH + kh * dH. Taps from
    // the last down visit the windows in ascending output order, the order in which
    // PyTorch's kernels add.
    for (int64_t kh = g.kH - 1; kh >= 0; --kh) {
      const int64_t th = k.y + g.pH - kh * g.dH;
      if (th < 0 || th % g.sH != 0) continue;
      if (th / g.sH >= g.OH) break;
      const int64_t row = base + th / g.sH * g.out_stride[2];
      for (int64_t kw = g.kW - 1; kw >= 0; --kw) {
        const int64_t tw = k.x + g.pW - kw * g.dW;
        if (tw < 0 || tw % g.sW != 0) continue;
        if (tw / g.sW >= g.OW) break;
        const int64_t o = row + tw / g.sW * g.out_stride[3];
        if (ind[o] == self) sum += dload(grad_out, o);
      }
    }
    dstore(grad_in,
           k.n * g.in_stride[0] + k.c * g.in_stride[1] + k.y * g.in_stride[2] + k.x * g.in_stride[3], sum);
  }
}

}  // namespace

int max_pool2d(const void* input, void* out, int64_t* indices, const Pool2dGeometry& g, int dtype, void* stream) {
  const int64_t total = g.N * g.C * g.OH * g.OW;
  const bool channels_last = g.out_stride[1] < g.out_stride[3];
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned blocks = grid_for(total, kThreads);
    auto kernel = indices == nullptr
                      ? (channels_last ? max_pool2d_kernel<T, true, false> : max_pool2d_kernel<T, false, false>)
                      : (channels_last ? max_pool2d_kernel<T, true, true> : max_pool2d_kernel<T, false, true>);
    kernel<<<blocks, kThreads, 0, cudaStream_t(stream)>>>(static_cast<const T*>(input), static_cast<T*>(out),
                                                          indices, g, total);
    return int(cudaGetLastError());
  });
}

int max_pool2d_backward(const void* grad_out, const int64_t* indices, void* grad_in, const Pool2dGeometry& g,
                        int dtype, void* stream) {
  const int64_t total = g.N * g.C * g.H * g.W;
  const bool channels_last = g.in_stride[1] < g.in_stride[3];
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned blocks = grid_for(total, kThreads);
    auto kernel = channels_last ? max_pool2d_backward_kernel<T, true> : max_pool2d_backward_kernel<T, false>;
    kernel<<<blocks, kThreads, 0, cudaStream_t(stream)>>>(static_cast<const T*>(grad_out), indices,
                                                          static_cast<T*>(grad_in), g, total);
    return int(cudaGetLastError());
  });
}

}  // namespace fastcnn::cuda
