// Per-channel bias + activation and its backward over dense tensors viewed as
// [outer, channels, inner] flat arrays. The backward's bias gradient is a
// two-stage reduction over a split fixed by the shape: no atomics, same bits every run.
#include "bias_act.h"
#include "fastcnn/cuda_scalar.cuh"

namespace fastcnn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileChannels = 32;  // inner == 1: a warp reads 32 consecutive channels
constexpr int kTileRows = kThreads / kTileChannels;
constexpr int64_t kElemsPerSplit = 4096;  // inner > 1: elements of one channel per block
constexpr int64_t kRowsPerSplit = 64;     // inner == 1: rows per block
constexpr int64_t kMaxSplits = 256;

// Written so that a NaN output passes the gradient, as torch's threshold_backward does.
template <class F> __device__ __forceinline__ F grad_from_output(F grad, F y, int act) {
  if (Act(act) == Act::relu) return y <= F(0) ? F(0) : grad;
  return dact_grad_from_output<F>(grad, y, act);
}

// n / d by a multiply and a shift, for n < 2^31 (Granlund and Montgomery, as in
// CUTLASS's FastDivmod): a hardware integer division per element would cost more
// than the memory traffic.
struct Div32 {
  using index = uint32_t;
  uint32_t d, mul = 0, shift = 0;
  explicit Div32(int64_t divisor) : d(uint32_t(divisor)) {
    if (d > 1) {
      uint32_t log2_ceil = 0;
      while ((uint64_t(1) << log2_ceil) < d) ++log2_ceil;
      mul = uint32_t(((uint64_t(1) << (31 + log2_ceil)) + d - 1) / d);
      shift = log2_ceil - 1;
    }
  }
  __device__ __forceinline__ uint32_t operator()(uint32_t n) const {
    return d == 1 ? n : __umulhi(n, mul) >> shift;
  }
};

// Indices of 2^31 elements and more.
struct Div64 {
  using index = int64_t;
  int64_t d;
  explicit Div64(int64_t divisor) : d(divisor) {}
  __device__ __forceinline__ int64_t operator()(int64_t n) const { return n / d; }
};

template <class T, class Div>
__global__ void bias_act_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                                typename Div::index n, Div inner, Div channels, int act) {
  using F = dacc_t<T>;
  using I = typename Div::index;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    const I plane = inner(i);
    const I c = plane - channels(plane) * I(channels.d);
    dstore(out, i, dapply_act<F>(dload(x, i) + dload(bias, c), act));
  }
}

// inner > 1: block b handles channel b / splits over its elements
// k = o * inner + j in split b % splits, then a fixed-shape tree sum.
template <class T, class Div>
__global__ void backward_planes_kernel(const T* __restrict__ grad, const T* __restrict__ out,
                                       T* __restrict__ grad_x, dacc_t<T>* __restrict__ partial,
                                       typename Div::index channels, Div inner, typename Div::index per_channel,
                                       typename Div::index split_len, typename Div::index splits, int act) {
  using F = dacc_t<T>;
  using I = typename Div::index;
  __shared__ F sums[kThreads];
  const I c = I(blockIdx.x) / splits, s = I(blockIdx.x) % splits;
  const I k0 = s * split_len;
  const I k1 = per_channel - k0 < split_len ? per_channel : k0 + split_len;
  F acc = F(0);
  for (I k = k0 + threadIdx.x; k < k1; k += kThreads) {
    const I o = inner(k);
    const I i = (o * channels + c) * I(inner.d) + (k - o * I(inner.d));
    const F g = grad_from_output<F>(dload(grad, i), dload(out, i), act);
    dstore(grad_x, i, g);
    acc += g;
  }
  sums[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[s * channels + c] = sums[0];
}

// inner == 1: block b handles channels [tile * 32, +32) over the rows of split
// b % splits; threadIdx.x walks channels (coalesced), threadIdx.y rows.
template <class T, class I>
__global__ void backward_rows_kernel(const T* __restrict__ grad, const T* __restrict__ out,
                                     T* __restrict__ grad_x, dacc_t<T>* __restrict__ partial, I channels,
                                     I rows, I split_len, I splits, int act) {
  using F = dacc_t<T>;
  __shared__ F sums[kTileRows][kTileChannels + 1];
  const I tile = I(blockIdx.x) / splits, s = I(blockIdx.x) % splits;
  const I c = tile * kTileChannels + threadIdx.x;
  const I r0 = s * split_len;
  const I r1 = rows - r0 < split_len ? rows : r0 + split_len;
  F acc = F(0);
  if (c < channels) {
    for (I o = r0 + threadIdx.y; o < r1; o += kTileRows) {
      const I i = o * channels + c;
      const F g = grad_from_output<F>(dload(grad, i), dload(out, i), act);
      dstore(grad_x, i, g);
      acc += g;
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    F total = F(0);
    for (int r = 0; r < kTileRows; ++r) total += sums[r][threadIdx.x];
    partial[s * channels + c] = total;
  }
}

// Splits in order, one thread per channel.
template <class T>
__global__ void sum_partials_kernel(const dacc_t<T>* __restrict__ partial, T* __restrict__ grad_bias,
                                    int64_t channels, int64_t splits) {
  using F = dacc_t<T>;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < channels;
       c += int64_t(gridDim.x) * blockDim.x) {
    F total = F(0);
    for (int64_t s = 0; s < splits; ++s) total += partial[s * channels + c];
    dstore(grad_bias, c, total);
  }
}

struct Split {
  int64_t splits, len;  // len: elements (inner > 1) or rows (inner == 1) per split
};

Split split_for(int64_t n, int64_t channels, int64_t inner) {
  const int64_t per_channel = channels > 0 ? n / channels : 0;  // outer * inner
  const int64_t unit = inner == 1 ? kRowsPerSplit : kElemsPerSplit;
  int64_t splits = (per_channel + unit - 1) / unit;
  splits = splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
  const int64_t len = per_channel > 0 ? (per_channel + splits - 1) / splits : 1;
  splits = per_channel > 0 ? (per_channel + len - 1) / len : 1;  // no empty split
  return {splits, len};
}

bool fits_u32(int64_t n) { return n < (int64_t(1) << 31); }

}  // namespace

int bias_act(const void* x, const void* bias, void* out, int64_t n, int64_t channels, int64_t inner, int dtype,
             int act, void* stream) {
  if (n <= 0) return 0;
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto grid = grid_for(n, kThreads);
    const auto s = cudaStream_t(stream);
    const auto* xs = static_cast<const T*>(x);
    const auto* b = static_cast<const T*>(bias);
    auto* o = static_cast<T*>(out);
    if (fits_u32(n)) {
      bias_act_kernel<T, Div32><<<grid, kThreads, 0, s>>>(xs, b, o, uint32_t(n), Div32(inner), Div32(channels), act);
    } else {
      bias_act_kernel<T, Div64><<<grid, kThreads, 0, s>>>(xs, b, o, n, Div64(inner), Div64(channels), act);
    }
    return int(cudaGetLastError());
  });
}

int64_t bias_act_backward_workspace(int64_t n, int64_t channels, int64_t inner) {
  return split_for(n, channels, inner).splits * channels;
}

int bias_act_backward(const void* grad, const void* out, void* grad_x, void* grad_bias, void* workspace,
                      int64_t n, int64_t channels, int64_t inner, int dtype, int act, void* stream) {
  if (channels <= 0) return 0;
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = dacc_t<T>;
    const auto st = cudaStream_t(stream);
    const Split sp = split_for(n, channels, inner);
    auto* partial = static_cast<F*>(workspace);
    const auto* g = static_cast<const T*>(grad);
    const auto* y = static_cast<const T*>(out);
    auto* gx = static_cast<T*>(grad_x);
    if (n > 0) {
      const int64_t per_channel = n / channels;
      if (inner == 1) {
        const int64_t tiles = (channels + kTileChannels - 1) / kTileChannels;
        const dim3 block(kTileChannels, kTileRows);
        const auto blocks = unsigned(tiles * sp.splits);
        if (fits_u32(n)) {
          backward_rows_kernel<T, uint32_t><<<blocks, block, 0, st>>>(
              g, y, gx, partial, uint32_t(channels), uint32_t(per_channel), uint32_t(sp.len),
              uint32_t(sp.splits), act);
        } else {
          backward_rows_kernel<T, int64_t><<<blocks, block, 0, st>>>(g, y, gx, partial, channels, per_channel,
                                                                     sp.len, sp.splits, act);
        }
      } else {
        const auto blocks = unsigned(channels * sp.splits);
        if (fits_u32(n)) {
          backward_planes_kernel<T, Div32><<<blocks, kThreads, 0, st>>>(
              g, y, gx, partial, uint32_t(channels), Div32(inner), uint32_t(per_channel), uint32_t(sp.len),
              uint32_t(sp.splits), act);
        } else {
          backward_planes_kernel<T, Div64><<<blocks, kThreads, 0, st>>>(
              g, y, gx, partial, channels, Div64(inner), per_channel, sp.len, sp.splits, act);
        }
      }
      const int err = int(cudaGetLastError());
      if (err != 0) return err;
    } else {
      const int err = int(cudaMemsetAsync(partial, 0, size_t(sp.splits * channels) * sizeof(F), st));
      if (err != 0) return err;
    }
    sum_partials_kernel<T><<<grid_for(channels, kThreads), kThreads, 0, st>>>(
        partial, static_cast<T*>(grad_bias), channels, sp.splits);
    return int(cudaGetLastError());
  });
}

}  // namespace fastcnn::cuda
