// Global average pooling. NCHW: one warp per (n, c) plane, each lane summing a
// strided share of it, then a shuffle tree. channels_last: a block of 32
// channels x kRows lanes per (n, channel group), each row summing every kRows-th
// position, then the rows folded in order through shared memory. The order of
// the additions depends on the shape only: the same bits every run.
#include "global_avg_pool2d.h"
#include "fastcnn/cuda_scalar.cuh"

namespace fastcnn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kRows = 8;  // channels_last: position lanes per block

// Offset of position p = h*W + w: one multiply when the positions are evenly
// spaced (dense tensors, which is what the ops send), else a 64-bit division.
__device__ __forceinline__ int64_t position_offset(int64_t p, const GlobalPoolShape& s, int64_t pos_stride) {
  return pos_stride >= 0 ? p * pos_stride : (p / s.W) * s.in_stride[2] + (p % s.W) * s.in_stride[3];
}

// The spacing of the positions if it is even, else -1.
int64_t even_position_stride(const GlobalPoolShape& s) {
  if (s.W == 1) return s.in_stride[2];
  if (s.H == 1 || s.in_stride[2] == s.W * s.in_stride[3]) return s.in_stride[3];
  return -1;
}

template <class T>
__global__ void global_pool_planes_kernel(const T* __restrict__ in, T* __restrict__ out, GlobalPoolShape s,
                                          int64_t pos_stride) {
  using F = dacc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  const int64_t hw = s.H * s.W;
  for (int64_t plane = blockIdx.x * int64_t(blockDim.x / kWarp) + threadIdx.x / kWarp; plane < s.N * s.C;
       plane += warps) {
    const int64_t n = plane / s.C, c = plane % s.C;
    const T* base = in + n * s.in_stride[0] + c * s.in_stride[1];
    F sum = F(0);
    for (int64_t p = lane; p < hw; p += kWarp) sum += dload(base, position_offset(p, s, pos_stride));
    for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) dstore(out, n * s.out_stride[0] + c * s.out_stride[1], sum / F(hw));
  }
}

template <class T>
__global__ void global_pool_channels_kernel(const T* __restrict__ in, T* __restrict__ out, GlobalPoolShape s,
                                            int64_t pos_stride) {
  using F = dacc_t<T>;
  __shared__ F partial[kRows][kWarp];
  const int64_t hw = s.H * s.W;
  const int64_t groups = (s.C + kWarp - 1) / kWarp;
  for (int64_t task = blockIdx.x; task < s.N * groups; task += gridDim.x) {
    const int64_t n = task / groups, c = (task % groups) * kWarp + threadIdx.x;
    F sum = F(0);
    if (c < s.C) {
      const T* base = in + n * s.in_stride[0] + c * s.in_stride[1];
      for (int64_t p = threadIdx.y; p < hw; p += kRows) sum += dload(base, position_offset(p, s, pos_stride));
    }
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < s.C) {
      F total = partial[0][threadIdx.x];
      for (int r = 1; r < kRows; ++r) total += partial[r][threadIdx.x];
      dstore(out, n * s.out_stride[0] + c * s.out_stride[1], total / F(hw));
    }
    __syncthreads();  // partial is rewritten by the next task
  }
}

template <class T>
__global__ void global_pool_backward_kernel(const T* __restrict__ grad_out, T* __restrict__ grad_in,
                                            GlobalPoolShape s, bool channels_last, int64_t total) {
  using F = dacc_t<T>;
  const F count = F(s.H * s.W);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, h, w, rest = i;
    if (channels_last) {
      c = rest % s.C; rest /= s.C;
      w = rest % s.W; rest /= s.W;
      h = rest % s.H; n = rest / s.H;
    } else {
      w = rest % s.W; rest /= s.W;
      h = rest % s.H; rest /= s.H;
      c = rest % s.C; n = rest / s.C;
    }
    const F g = dload(grad_out, n * s.out_stride[0] + c * s.out_stride[1]);
    dstore(grad_in, n * s.in_stride[0] + c * s.in_stride[1] + h * s.in_stride[2] + w * s.in_stride[3], g / count);
  }
}

}  // namespace

int global_avg_pool2d(const void* input, void* output, const GlobalPoolShape& s, int dtype, void* stream) {
  if (s.N * s.C == 0) return 0;
  const bool channels_last = s.in_stride[1] < s.in_stride[3] && s.H * s.W > 1;
  const int64_t pos_stride = even_position_stride(s);
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(input);
    T* out = static_cast<T*>(output);
    if (channels_last) {
      const int64_t tasks = s.N * ((s.C + kWarp - 1) / kWarp);
      const unsigned blocks = unsigned(tasks < 132 * 32 ? tasks : 132 * 32);
      global_pool_channels_kernel<T><<<blocks, dim3(kWarp, kRows), 0, cudaStream_t(stream)>>>(in, out, s,
                                                                                             pos_stride);
    } else {
      global_pool_planes_kernel<T><<<grid_for(s.N * s.C * kWarp, kThreads), kThreads, 0,
                                     cudaStream_t(stream)>>>(in, out, s, pos_stride);
    }
    return int(cudaGetLastError());
  });
}

int global_avg_pool2d_backward(const void* grad_output, void* grad_input, const GlobalPoolShape& s, int dtype,
                               void* stream) {
  const int64_t total = s.N * s.C * s.H * s.W;
  if (total == 0) return 0;
  const bool channels_last = s.in_stride[1] < s.in_stride[3];
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    global_pool_backward_kernel<T><<<grid_for(total, kThreads), kThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(grad_output), static_cast<T*>(grad_input), s, channels_last, total);
    return int(cudaGetLastError());
  });
}

}  // namespace fastcnn::cuda
