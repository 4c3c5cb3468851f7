// Global average pooling: out[n, c] = sum over (h, w) of x[n, c, h, w] / (H*W).
//
// NCHW: each (n, c) plane is one contiguous row, summed with kLanes running
// partial sums (so the loop vectorises) that are then folded in a fixed tree.
// channels_last: the positions are summed in order with the channels as the
// vector lane. Either way the order of the additions depends on the shape only,
// never on the thread count: the result has the same bits every run.
#include "global_avg_pool2d.h"

#include <algorithm>
#include <vector>

#include "fastcnn/cpu_parallel.h"
#include "fastcnn/dispatch.h"

namespace fastcnn::cpu {
namespace {

constexpr int kLanes = 32;

template <class T>
FASTCNN_ALWAYS_INLINE acc_t<T> sum_row(const T* __restrict__ x, int64_t n) {
  using F = acc_t<T>;
  F part[kLanes];
  for (int j = 0; j < kLanes; ++j) part[j] = F(0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += load(x, i + j);
  for (int j = 0; i < n; ++i, ++j) part[j] += load(x, i);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) part[j] += part[j + width];
  return part[0];
}

template <class T>
FASTCNN_ALWAYS_INLINE void global_pool_nchw_body(const T* in, T* out, GlobalPoolShape s, int64_t first_plane,
                                                 int64_t last_plane) {
  using F = acc_t<T>;
  const int64_t hw = s.H * s.W;
  const F count = F(hw);
  for (int64_t plane = first_plane; plane < last_plane; ++plane) {
    const int64_t n = plane / s.C, c = plane % s.C;
    const F total = sum_row(in + n * s.in_stride[0] + c * s.in_stride[1], hw);
    store(out, n * s.out_stride[0] + c * s.out_stride[1], total / count);
  }
}
FASTCNN_ISA_VARIANTS(global_pool_nchw_planes, global_pool_nchw_body)

// Task t covers channels [block*cb, min(C, (block+1)*cb)) of image t / blocks.
template <class T>
FASTCNN_ALWAYS_INLINE void global_pool_cl_body(const T* in, T* out, GlobalPoolShape s, int64_t blocks,
                                               int64_t cb, int64_t first_task, int64_t last_task) {
  using F = acc_t<T>;
  std::vector<F> acc_buf(cb);
  F* __restrict__ acc = acc_buf.data();
  const F count = F(s.H * s.W);
  for (int64_t t = first_task; t < last_task; ++t) {
    const int64_t n = t / blocks, c0 = (t % blocks) * cb;
    const int64_t width = std::min(cb, s.C - c0);
    for (int64_t c = 0; c < width; ++c) acc[c] = F(0);
    const T* base = in + n * s.in_stride[0] + c0;
    for (int64_t h = 0; h < s.H; ++h) {
      for (int64_t w = 0; w < s.W; ++w) {
        const T* __restrict__ px = base + h * s.in_stride[2] + w * s.in_stride[3];
        for (int64_t c = 0; c < width; ++c) acc[c] += load(px, c);
      }
    }
    T* po = out + n * s.out_stride[0] + c0 * s.out_stride[1];
    if (s.out_stride[1] == 1) {
      for (int64_t c = 0; c < width; ++c) store(po, c, acc[c] / count);
    } else {
      for (int64_t c = 0; c < width; ++c) store(po, c * s.out_stride[1], acc[c] / count);
    }
  }
}
FASTCNN_ISA_VARIANTS(global_pool_cl_tasks, global_pool_cl_body)

template <class T>
FASTCNN_ALWAYS_INLINE void global_pool_backward_nchw_body(const T* grad_out, T* grad_in, GlobalPoolShape s,
                                                          int64_t first_plane, int64_t last_plane) {
  using F = acc_t<T>;
  const int64_t hw = s.H * s.W;
  const F count = F(hw);
  for (int64_t plane = first_plane; plane < last_plane; ++plane) {
    const int64_t n = plane / s.C, c = plane % s.C;
    const T value = from_acc<T>(load(grad_out, n * s.out_stride[0] + c * s.out_stride[1]) / count);
    T* __restrict__ gi = grad_in + n * s.in_stride[0] + c * s.in_stride[1];
    for (int64_t i = 0; i < hw; ++i) gi[i] = value;
  }
}
FASTCNN_ISA_VARIANTS(global_pool_backward_nchw_planes, global_pool_backward_nchw_body)

template <class T>
FASTCNN_ALWAYS_INLINE void global_pool_backward_cl_body(const T* grad_out, T* grad_in, GlobalPoolShape s,
                                                        int64_t first_pos, int64_t last_pos) {
  using F = acc_t<T>;
  const int64_t hw = s.H * s.W;
  const F count = F(hw);
  std::vector<T> row_buf(s.C);
  T* __restrict__ row = row_buf.data();
  int64_t row_n = -1;
  for (int64_t pos = first_pos; pos < last_pos; ++pos) {
    const int64_t n = pos / hw, p = pos % hw;
    if (n != row_n) {  // grad / (H*W) of image n, written to each of its positions
      row_n = n;
      for (int64_t c = 0; c < s.C; ++c)
        row[c] = from_acc<T>(load(grad_out, n * s.out_stride[0] + c * s.out_stride[1]) / count);
    }
    T* __restrict__ gi = grad_in + n * s.in_stride[0] + (p / s.W) * s.in_stride[2] + (p % s.W) * s.in_stride[3];
    for (int64_t c = 0; c < s.C; ++c) gi[c] = row[c];
  }
}
FASTCNN_ISA_VARIANTS(global_pool_backward_cl_positions, global_pool_backward_cl_body)

// NCHW when each plane is one contiguous row (what the row sum needs);
// channels_last when C is the unit stride.
bool planes_are_rows(const GlobalPoolShape& s) {
  return (s.in_stride[3] == 1 || s.W == 1) && (s.in_stride[2] == s.W || s.H == 1);
}

}  // namespace

void global_avg_pool2d(const void* input, void* output, const GlobalPoolShape& s, int dtype) {
  if (s.N * s.C == 0) return;
  const bool rows = planes_are_rows(s) && !(s.in_stride[1] == 1 && s.C > 1 && s.H * s.W > 1);
  if (!rows && s.in_stride[1] != 1)
    throw std::invalid_argument("fastcnn global_avg_pool2d: input must be dense per plane or along C");
  const int64_t threads = omp_get_max_threads();
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(input);
    T* out = static_cast<T*>(output);
    if (rows) {
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(s.H * s.W, 1));
      parallel_for(s.N * s.C, grain, [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(global_pool_nchw_planes, T, in, out, s, begin, end);
      });
    } else {
      // Whole images per task when there are enough of them, else channel blocks
      // (of at least 64) so that every thread gets work.
      int64_t blocks = 1;
      if (s.N < threads) blocks = std::min((threads + s.N - 1) / s.N, (s.C + 63) / 64);
      const int64_t cb = (s.C + blocks - 1) / blocks;
      blocks = (s.C + cb - 1) / cb;
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(s.H * s.W * cb, 1));
      parallel_for(s.N * blocks, grain, [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(global_pool_cl_tasks, T, in, out, s, blocks, cb, begin, end);
      });
    }
  });
}

void global_avg_pool2d_backward(const void* grad_output, void* grad_input, const GlobalPoolShape& s, int dtype) {
  if (s.N * s.C * s.H * s.W == 0) return;
  const bool rows = planes_are_rows(s) && !(s.in_stride[1] == 1 && s.C > 1 && s.H * s.W > 1);
  if (!rows && s.in_stride[1] != 1)
    throw std::invalid_argument("fastcnn global_avg_pool2d_backward: grad_input must be dense per plane or along C");
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* go = static_cast<const T*>(grad_output);
    T* gi = static_cast<T*>(grad_input);
    if (rows) {
      const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(s.H * s.W, 1));
      parallel_for(s.N * s.C, grain, [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(global_pool_backward_nchw_planes, T, go, gi, s, begin, end);
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(s.C, 1));
      parallel_for(s.N * s.H * s.W, grain, [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(global_pool_backward_cl_positions, T, go, gi, s, begin, end);
      });
    }
  });
}

}  // namespace fastcnn::cpu
