// Global average pooling: out[n, c] = sum over (h, w) of x[n, c, h, w] / (H*W).
//
// NCHW: each (n, c) plane is one contiguous row, summed in vector lanes that are
// then folded in a fixed tree.
// channels_last: the positions are summed in order with the channels as the
// vector lane. Either way the order of the additions depends on the shape only,
// never on the thread count: the result has the same bits every run.
#include "global_avg_pool2d.h"

#include "avg_pool2d.h"  // vector helpers

#include <algorithm>
#include <cstring>
#include <vector>

#include "fastcnn/cpu_parallel.h"
#include "fastcnn/dispatch.h"

namespace fastcnn::cpu {
namespace {

// One row's sum before its lanes fold: two vector accumulators run over x[0, n)
// (more were slower on the 49-element rows of a 7x7 image, no faster on long
// rows) and the elements left over go to a scalar.
template <class T>
FASTCNN_ALWAYS_INLINE void row_partials(const T* __restrict__ x, int64_t n, vec32_t<acc_t<T>>& lanes,
                                        acc_t<T>& tail) {
  using F = acc_t<T>;
  using V = vec32_t<F>;
  constexpr int L = kLanes<F>;
  V a0 = {}, a1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    add_vec(a0, x + i);
    add_vec(a1, x + i + L);
  }
  for (; i + L <= n; i += L) add_vec(a0, x + i);
  F rest = F(0);
  for (; i < n; ++i) rest += load(x, i);
  lanes = a0 + a1;
  tail = rest;
}

// The lanes of one row fold in a fixed tree: lane j += lane j + L/2, then
// j += j + L/4, ..., then the tail is added.
template <class F>
FASTCNN_ALWAYS_INLINE F fold_row(const vec32_t<F>& v, F tail) {
  constexpr int L = kLanes<F>;
  F lanes[L];
  std::memcpy(lanes, &v, sizeof v);
  for (int width = L / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0] + tail;
}

// fold_row for L rows at once, with the same tree for every row (so a row's sum
// does not depend on which rows share its batch): the rows' sums, in order. Each
// step adds the two halves of every row's remaining lanes, two rows per vector.
typedef int32_t mask8 __attribute__((vector_size(32)));
typedef int64_t mask4 __attribute__((vector_size(32)));

template <class V, class M>
FASTCNN_ALWAYS_INLINE void add_shuffled(const V& a, const V& b, const M& first, const M& second, V& out) {
  out = __builtin_shuffle(a, b, first) + __builtin_shuffle(a, b, second);
}

FASTCNN_ALWAYS_INLINE void fold_rows(const vec32_t<float>* v, vec32_t<float>& sums) {
  const mask8 lo4{0, 1, 2, 3, 8, 9, 10, 11}, hi4{4, 5, 6, 7, 12, 13, 14, 15};  // [a0+a4 .. a3+a7, b0+b4 ..]
  const mask8 lo2{0, 1, 8, 9, 4, 5, 12, 13}, hi2{2, 3, 10, 11, 6, 7, 14, 15};  // [a a c c b b d d]
  const mask8 lo1{0, 8, 2, 10, 4, 12, 6, 14}, hi1{1, 9, 3, 11, 5, 13, 7, 15};  // [a e c g b f d h]
  vec32_t<float> ab, cd, ef, gh, abcd, efgh, aecgbfdh;
  add_shuffled(v[0], v[1], lo4, hi4, ab);
  add_shuffled(v[2], v[3], lo4, hi4, cd);
  add_shuffled(v[4], v[5], lo4, hi4, ef);
  add_shuffled(v[6], v[7], lo4, hi4, gh);
  add_shuffled(ab, cd, lo2, hi2, abcd);
  add_shuffled(ef, gh, lo2, hi2, efgh);
  add_shuffled(abcd, efgh, lo1, hi1, aecgbfdh);
  sums = __builtin_shuffle(aecgbfdh, mask8{0, 4, 2, 6, 1, 5, 3, 7});
}

FASTCNN_ALWAYS_INLINE void fold_rows(const vec32_t<double>* v, vec32_t<double>& sums) {
  const mask4 lo2{0, 1, 4, 5}, hi2{2, 3, 6, 7};  // [a0+a2, a1+a3, b0+b2, b1+b3]
  const mask4 lo1{0, 2, 4, 6}, hi1{1, 3, 5, 7};  // [a b c d]
  vec32_t<double> ab, cd;
  add_shuffled(v[0], v[1], lo2, hi2, ab);
  add_shuffled(v[2], v[3], lo2, hi2, cd);
  add_shuffled(ab, cd, lo1, hi1, sums);
}

// Offset of plane p = n*C + c along a tensor's N and C strides: one multiply when
// the planes are evenly spaced (dense tensors), else a division.
FASTCNN_ALWAYS_INLINE int64_t plane_offset(int64_t p, int64_t C, int64_t stride_n, int64_t stride_c, bool even) {
  return even ? p * stride_c : (p / C) * stride_n + (p % C) * stride_c;
}

// Planes [first_plane, last_plane), L at a time where they can be: small planes
// (a 7x7 map) spend as much time folding lanes and storing as summing.
template <class T>
FASTCNN_ALWAYS_INLINE void global_pool_nchw_body(const T* in, T* out, GlobalPoolShape s, int64_t first_plane,
                                                 int64_t last_plane) {
  using F = acc_t<T>;
  using V = vec32_t<F>;
  constexpr int L = kLanes<F>;
  const int64_t hw = s.H * s.W;
  const F count = F(hw);
  const bool even_in = s.in_stride[0] == s.C * s.in_stride[1];
  const bool even_out = s.out_stride[0] == s.C * s.out_stride[1];
  int64_t plane = first_plane;
  for (; plane + L <= last_plane; plane += L) {
    V partial[L];
    V tails;
    for (int k = 0; k < L; ++k) {
      F tail;
      row_partials(in + plane_offset(plane + k, s.C, s.in_stride[0], s.in_stride[1], even_in), hw, partial[k],
                   tail);
      tails[k] = tail;
    }
    V sums;
    fold_rows(partial, sums);
    const V means = (sums + tails) / count;
    for (int k = 0; k < L; ++k)
      store(out, plane_offset(plane + k, s.C, s.out_stride[0], s.out_stride[1], even_out), means[k]);
  }
  for (; plane < last_plane; ++plane) {
    V partial;
    F tail;
    row_partials(in + plane_offset(plane, s.C, s.in_stride[0], s.in_stride[1], even_in), hw, partial, tail);
    store(out, plane_offset(plane, s.C, s.out_stride[0], s.out_stride[1], even_out), fold_row(partial, tail) / count);
  }
}
FASTCNN_ISA_VARIANTS(global_pool_nchw_planes, global_pool_nchw_body)

// Task t covers channels [block*cb, min(C, (block+1)*cb)) of image t / blocks.
template <class T>
FASTCNN_ALWAYS_INLINE void global_pool_cl_body(const T* in, T* out, GlobalPoolShape s, int64_t blocks,
                                               int64_t cb, int64_t first_task, int64_t last_task) {
  using F = acc_t<T>;
  std::vector<F> acc_buf(cb);
  F* acc = acc_buf.data();
  const F positions = F(s.H * s.W);
  for (int64_t t = first_task; t < last_task; ++t) {
    const int64_t n = t / blocks, c0 = (t % blocks) * cb;
    const int64_t width = std::min(cb, s.C - c0);
    // One position at a time, each a contiguous run of channels.
    for (int64_t c = 0; c < width; ++c) acc[c] = F(0);
    const T* base = in + n * s.in_stride[0] + c0;
    for (int64_t h = 0; h < s.H; ++h) {
      for (int64_t w = 0; w < s.W; ++w) {
        const T* px = base + h * s.in_stride[2] + w * s.in_stride[3];
        for (int64_t c = 0; c < width; ++c) acc[c] += load(px, c);
        one_stream_barrier();
      }
    }
    T* po = out + n * s.out_stride[0] + c0 * s.out_stride[1];
    if (s.out_stride[1] == 1) {
      for (int64_t c = 0; c < width; ++c) store(po, c, acc[c] / positions);
    } else {
      for (int64_t c = 0; c < width; ++c) store(po, c * s.out_stride[1], acc[c] / positions);
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
  if (!rows && s.C > 1 && s.in_stride[1] != 1)
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
  if (!rows && s.C > 1 && s.in_stride[1] != 1)
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
