// Average pooling as PyTorch's CPU kernel computes it: the window of output oh
// starts at oh*sH - pH and ends at min(start + kH, H + pH); that span is the
// divisor when padding counts, the part inside the image otherwise. Sums run in
// acc_t (float, or double for double) over ih then iw, as PyTorch's do.
//
// NCHW: each task is one output row; the row is built from whole input rows, so
// the inner loops run along W and vectorise. channels_last: each task is one
// output position and the inner loops run along C (the vector lane). The backward gathers: each
// input element sums grad / divisor over the windows that hold it, in (oh, ow)
// order, so it needs no atomics and gives the same bits every run.
#include "avg_pool2d.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "fastcnn/dispatch.h"

namespace fastcnn::cpu {
namespace {

// One axis of the pooling: where each window starts and what it divides by.
struct AxisWindows {
  std::vector<int64_t> begin, end;  // clipped to [0, size)
  std::vector<int64_t> divisor;     // span with padding, or the clipped count
};

AxisWindows axis_windows(int64_t size, int64_t out_size, int64_t k, int64_t s, int64_t p,
                         bool count_include_pad) {
  AxisWindows a;
  a.begin.resize(out_size);
  a.end.resize(out_size);
  a.divisor.resize(out_size);
  for (int64_t o = 0; o < out_size; ++o) {
    int64_t start = o * s - p;
    int64_t stop = std::min(start + k, size + p);
    const int64_t span = stop - start;
    start = std::max<int64_t>(start, 0);
    stop = std::min(stop, size);
    a.begin[o] = start;
    a.end[o] = std::max(stop, start);
    // An empty window (not reachable through the op's checks) averages to 0, as in PyTorch.
    a.divisor[o] = std::max<int64_t>(count_include_pad ? span : a.end[o] - a.begin[o], 1);
  }
  return a;
}

// For each input index i: the outputs [first, last) whose window holds it.
struct AxisCover {
  std::vector<int64_t> first, last;
};

AxisCover axis_cover(int64_t size, int64_t out_size, int64_t k, int64_t s, int64_t p) {
  AxisCover c;
  c.first.resize(size);
  c.last.resize(size);
  for (int64_t i = 0; i < size; ++i) {
    // o holds i when o*s - p <= i < o*s - p + k.
    const int64_t lo_num = i + p - k;
    const int64_t first = lo_num < 0 ? 0 : lo_num / s + 1;
    const int64_t last = std::min((i + p) / s + 1, out_size);
    c.first[i] = first;
    c.last[i] = std::max(last, first);
  }
  return c;
}

// Outputs o along W for which column o*s - p + kw is inside the image: [lo, hi).
void valid_outputs_for_tap(int64_t size, int64_t out_size, int64_t s, int64_t p, int64_t kw,
                           int64_t* lo, int64_t* hi) {
  const int64_t need = p - kw;  // o*s >= need
  int64_t first = need <= 0 ? 0 : (need + s - 1) / s;
  const int64_t top = size - 1 + p - kw;  // o*s <= top
  int64_t last = top < 0 ? 0 : top / s + 1;
  first = std::min(first, out_size);
  last = std::min(last, out_size);
  *lo = first;
  *hi = std::max(last, first);
}

// Adds input row `row` into acc over the outputs [lo, hi) for tap offset `off`.
template <class T, int kStride>
FASTCNN_ALWAYS_INLINE void add_tap(acc_t<T>* __restrict__ acc, const T* __restrict__ row, int64_t lo,
                                   int64_t hi, int64_t off, int64_t stride) {
  const int64_t s = kStride > 0 ? kStride : stride;
  for (int64_t o = lo; o < hi; ++o) acc[o] += load(row, o * s + off);
}

template <class T>
FASTCNN_ALWAYS_INLINE void avg_pool_nchw_body(const T* in, T* out, Pool2dGeometry g, const int64_t* h_begin,
                                              const int64_t* h_end, const int64_t* h_div,
                                              const int64_t* tap_lo, const int64_t* tap_hi,
                                              const int64_t* w_div, int64_t first_row, int64_t last_row) {
  using F = acc_t<T>;
  std::vector<F> acc(g.OW), divisor(g.OW);
  int64_t divisor_dh = -1;
  for (int64_t r = first_row; r < last_row; ++r) {
    const int64_t plane = r / g.OH, oh = r % g.OH;
    const int64_t n = plane / g.C, c = plane % g.C;
    const T* in_plane = in + n * g.in_stride[0] + c * g.in_stride[1];
    for (int64_t ow = 0; ow < g.OW; ++ow) acc[ow] = F(0);
    for (int64_t ih = h_begin[oh]; ih < h_end[oh]; ++ih) {
      const T* row = in_plane + ih * g.in_stride[2];
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        const int64_t off = kw - g.pW;
        if (g.sW == 1) add_tap<T, 1>(acc.data(), row, tap_lo[kw], tap_hi[kw], off, 1);
        else if (g.sW == 2) add_tap<T, 2>(acc.data(), row, tap_lo[kw], tap_hi[kw], off, 2);
        else add_tap<T, 0>(acc.data(), row, tap_lo[kw], tap_hi[kw], off, g.sW);
      }
    }
    if (h_div[oh] != divisor_dh) {  // rows share divisors except near the edges
      divisor_dh = h_div[oh];
      for (int64_t ow = 0; ow < g.OW; ++ow) divisor[ow] = F(divisor_dh * w_div[ow]);
    }
    T* out_row = out + n * g.out_stride[0] + c * g.out_stride[1] + oh * g.out_stride[2];
    for (int64_t ow = 0; ow < g.OW; ++ow) store(out_row, ow, acc[ow] / divisor[ow]);
  }
}
FASTCNN_ISA_VARIANTS(avg_pool_nchw_rows, avg_pool_nchw_body)

// The input positions of output position `pos`'s window, in (ih, iw) order;
// returns their count and sets n, oh, ow.
template <class T>
FASTCNN_ALWAYS_INLINE int64_t window_positions(const T* in, const Pool2dGeometry& g, const int64_t* h_begin,
                                               const int64_t* h_end, const int64_t* w_begin, const int64_t* w_end,
                                               int64_t pos, const T** window, int64_t& n, int64_t& oh,
                                               int64_t& ow) {
  n = pos / (g.OH * g.OW);
  const int64_t ohw = pos % (g.OH * g.OW);
  oh = ohw / g.OW;
  ow = ohw % g.OW;
  int64_t count = 0;
  for (int64_t ih = h_begin[oh]; ih < h_end[oh]; ++ih)
    for (int64_t iw = w_begin[ow]; iw < w_end[ow]; ++iw)
      window[count++] = in + n * g.in_stride[0] + ih * g.in_stride[2] + iw * g.in_stride[3];
  return count;
}

// Sums divided by `divisor`: a power of two divides exactly as a product by its
// reciprocal (same bits) and a multiply is several times cheaper than a divide.
template <class F>
struct Divide {
  F divisor, scale;
  bool exact_scale;
  explicit Divide(int64_t d) : divisor(F(d)), scale(F(1) / F(d)), exact_scale((d & (d - 1)) == 0) {}
};

// sum[c] = (sum[c] + last[c]) / divisor, stored to out[c]: the window's last tap.
template <class T, class F>
FASTCNN_ALWAYS_INLINE void finish_sums(const F* sum, const T* last, T* out, int64_t C, const Divide<F>& d) {
  if (d.exact_scale) {
    for (int64_t c = 0; c < C; ++c) store(out, c, (sum[c] + load(last, c)) * d.scale);
  } else {
    for (int64_t c = 0; c < C; ++c) store(out, c, (sum[c] + load(last, c)) / d.divisor);
  }
}

// channels_last, windows that do not overlap (each input read once): one pass
// over the channels per window position, so the reads are one contiguous stream;
// the first pass starts the sums and the last divides them into the output.
// When the output holds acc_t (float, double) the sums build up in the output
// itself: its cache lines are then fetched by the first pass rather than the
// last, which measured ~10% faster than a separate buffer (2x2/2 over 256 channels).
template <class T>
FASTCNN_ALWAYS_INLINE void avg_pool_cl_stream_body(const T* in, T* out, Pool2dGeometry g, const int64_t* h_begin,
                                                   const int64_t* h_end, const int64_t* h_div,
                                                   const int64_t* w_begin, const int64_t* w_end,
                                                   const int64_t* w_div, int64_t first_pos, int64_t last_pos) {
  using F = acc_t<T>;
  constexpr bool kSumInOutput = std::is_same_v<T, F>;
  const int64_t C = g.C;
  std::vector<F> acc_buf(kSumInOutput ? 0 : C);
  std::vector<const T*> window(g.kH * g.kW);
  for (int64_t pos = first_pos; pos < last_pos; ++pos) {
    int64_t n, oh, ow;
    const int64_t count = window_positions(in, g, h_begin, h_end, w_begin, w_end, pos, window.data(), n, oh, ow);
    const Divide<F> divide(h_div[oh] * w_div[ow]);
    T* po = out + n * g.out_stride[0] + oh * g.out_stride[2] + ow * g.out_stride[3];
    if (count <= 1) {  // (0 only for an empty window: the sum is 0)
      for (int64_t c = 0; c < C; ++c)
        store(po, c, (count ? F(0) + load(window[0], c) : F(0)) / divide.divisor);
      continue;
    }
    F* acc;
    if constexpr (kSumInOutput) acc = po;
    else acc = acc_buf.data();
    for (int64_t c = 0; c < C; ++c) acc[c] = F(0) + load(window[0], c);
    one_stream_barrier();
    for (int64_t k = 1; k + 1 < count; ++k) {
      const T* px = window[k];
      for (int64_t c = 0; c < C; ++c) acc[c] += load(px, c);
      one_stream_barrier();
    }
    finish_sums(acc, window[count - 1], po, C, divide);
  }
}
FASTCNN_ISA_VARIANTS(avg_pool_cl_stream_positions, avg_pool_cl_stream_body)

// channels_last, overlapping windows (stride < kernel: inputs are re-read from
// cache): blocks of 4 vectors of channels stay in registers over the whole window.
template <class T>
FASTCNN_ALWAYS_INLINE void avg_pool_cl_blocked_body(const T* in, T* out, Pool2dGeometry g, const int64_t* h_begin,
                                                    const int64_t* h_end, const int64_t* h_div,
                                                    const int64_t* w_begin, const int64_t* w_end,
                                                    const int64_t* w_div, int64_t first_pos, int64_t last_pos) {
  using F = acc_t<T>;
  using V = vec32_t<F>;
  constexpr int L = kLanes<F>;
  const int64_t C = g.C;
  std::vector<const T*> window(g.kH * g.kW);
  for (int64_t pos = first_pos; pos < last_pos; ++pos) {
    int64_t n, oh, ow;
    const int64_t count = window_positions(in, g, h_begin, h_end, w_begin, w_end, pos, window.data(), n, oh, ow);
    const F divisor = F(h_div[oh] * w_div[ow]);
    T* po = out + n * g.out_stride[0] + oh * g.out_stride[2] + ow * g.out_stride[3];
    int64_t c = 0;
    for (; c + 4 * L <= C; c += 4 * L) {
      V a[4] = {};
      for (int64_t k = 0; k < count; ++k) {
        const T* px = window[k] + c;
        for (int j = 0; j < 4; ++j) add_vec(a[j], px + j * L);
      }
      F sums[4 * L];
      std::memcpy(sums, a, sizeof sums);
      for (int j = 0; j < 4 * L; ++j) store(po, c + j, sums[j] / divisor);
    }
    for (; c < C; ++c) {
      F sum = F(0);
      for (int64_t k = 0; k < count; ++k) sum += load(window[k], c);
      store(po, c, sum / divisor);
    }
  }
}
FASTCNN_ISA_VARIANTS(avg_pool_cl_blocked_positions, avg_pool_cl_blocked_body)

template <class T>
FASTCNN_ALWAYS_INLINE void avg_pool_backward_nchw_body(const T* grad_out, T* grad_in, Pool2dGeometry g,
                                                       const int64_t* h_div, const int64_t* w_div,
                                                       const int64_t* h_first, const int64_t* h_last,
                                                       const int64_t* w_first, const int64_t* w_last,
                                                       int64_t first_plane, int64_t last_plane) {
  using F = acc_t<T>;
  std::vector<F> scaled(g.OH * g.OW), acc(g.W);
  for (int64_t plane = first_plane; plane < last_plane; ++plane) {
    const int64_t n = plane / g.C, c = plane % g.C;
    const T* go = grad_out + n * g.out_stride[0] + c * g.out_stride[1];
    for (int64_t oh = 0; oh < g.OH; ++oh)
      for (int64_t ow = 0; ow < g.OW; ++ow)
        scaled[oh * g.OW + ow] =
            load(go, oh * g.out_stride[2] + ow * g.out_stride[3]) / F(h_div[oh] * w_div[ow]);
    T* gi_plane = grad_in + n * g.in_stride[0] + c * g.in_stride[1];
    for (int64_t ih = 0; ih < g.H; ++ih) {
      for (int64_t iw = 0; iw < g.W; ++iw) acc[iw] = F(0);
      for (int64_t oh = h_first[ih]; oh < h_last[ih]; ++oh) {
        const F* srow = scaled.data() + oh * g.OW;
        for (int64_t iw = 0; iw < g.W; ++iw) {
          F sum = acc[iw];
          for (int64_t ow = w_first[iw]; ow < w_last[iw]; ++ow) sum += srow[ow];
          acc[iw] = sum;
        }
      }
      T* gi_row = gi_plane + ih * g.in_stride[2];
      for (int64_t iw = 0; iw < g.W; ++iw) store(gi_row, iw, acc[iw]);
    }
  }
}
FASTCNN_ISA_VARIANTS(avg_pool_backward_nchw_planes, avg_pool_backward_nchw_body)

// Rows (n, ih) of grad_input, a position at a time along W: one division per row, not per
// position (at LeNet's 16 channels the index math of each position cost more than its
// channels). A position in one window (stride >= kernel) takes its gradient directly; in
// several, their sum. Both start from 0 as PyTorch's sum does, so -0.0 comes out +0.0.
template <class T>
FASTCNN_ALWAYS_INLINE void avg_pool_backward_cl_body(const T* grad_out, T* grad_in, Pool2dGeometry g,
                                                     const int64_t* h_div, const int64_t* w_div,
                                                     const int64_t* h_first, const int64_t* h_last,
                                                     const int64_t* w_first, const int64_t* w_last,
                                                     int64_t first_row, int64_t last_row) {
  using F = acc_t<T>;
  std::vector<F> acc_buf(g.C);
  F* __restrict__ acc = acc_buf.data();
  const int64_t C = g.C;
  for (int64_t row = first_row; row < last_row; ++row) {
    const int64_t n = row / g.H, ih = row % g.H;
    const T* go_image = grad_out + n * g.out_stride[0];
    T* __restrict__ gi = grad_in + n * g.in_stride[0] + ih * g.in_stride[2];
    const int64_t oh0 = h_first[ih], oh1 = h_last[ih];
    for (int64_t iw = 0; iw < g.W; ++iw, gi += g.in_stride[3]) {
      const int64_t ow0 = w_first[iw], ow1 = w_last[iw];
      if (oh1 - oh0 == 1 && ow1 - ow0 == 1) {
        const F divisor = F(h_div[oh0] * w_div[ow0]);
        const T* __restrict__ go = go_image + oh0 * g.out_stride[2] + ow0 * g.out_stride[3];
        for (int64_t c = 0; c < C; ++c) store(gi, c, F(0) + load(go, c) / divisor);
        continue;
      }
      for (int64_t c = 0; c < C; ++c) acc[c] = F(0);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        for (int64_t ow = ow0; ow < ow1; ++ow) {
          const F divisor = F(h_div[oh] * w_div[ow]);
          const T* __restrict__ go = go_image + oh * g.out_stride[2] + ow * g.out_stride[3];
          for (int64_t c = 0; c < C; ++c) acc[c] += load(go, c) / divisor;
        }
      }
      for (int64_t c = 0; c < C; ++c) store(gi, c, acc[c]);
    }
  }
}
FASTCNN_ISA_VARIANTS(avg_pool_backward_cl_rows, avg_pool_backward_cl_body)

// channels_last when C is the unit-stride axis of both tensors (and there is
// more than one channel); NCHW when W is; anything else is the caller's bug.
// (A stride of a size-1 axis is arbitrary and never used.)
bool use_channels_last(const Pool2dGeometry& g) {
  const bool cl = (g.C == 1 || (g.in_stride[1] == 1 && g.out_stride[1] == 1));
  const bool nchw = (g.W == 1 || g.in_stride[3] == 1) && (g.OW == 1 || g.out_stride[3] == 1);
  if (cl && (g.C > 1 || !nchw)) return true;
  if (nchw) return false;
  throw std::invalid_argument("fastcnn avg_pool2d: tensors must be dense along W or along C");
}

bool use_channels_last_backward(const Pool2dGeometry& g) {
  // The NCHW backward reads grad_output through its strides; only grad_input must be dense along W.
  const bool cl = (g.C == 1 || (g.in_stride[1] == 1 && g.out_stride[1] == 1));
  const bool nchw = g.W == 1 || g.in_stride[3] == 1;
  if (cl && (g.C > 1 || !nchw)) return true;
  if (nchw) return false;
  throw std::invalid_argument("fastcnn avg_pool2d_backward: grad_input must be dense along W or along C");
}

constexpr int64_t kGrainElements = 16384;  // input elements read per task, at least

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(work_per_item, 1));
}

}  // namespace

void avg_pool2d(const void* input, void* output, const Pool2dGeometry& g, bool count_include_pad, int dtype) {
  if (g.N * g.C * g.OH * g.OW == 0) return;
  const AxisWindows hw = axis_windows(g.H, g.OH, g.kH, g.sH, g.pH, count_include_pad);
  const AxisWindows ww = axis_windows(g.W, g.OW, g.kW, g.sW, g.pW, count_include_pad);
  const bool cl = use_channels_last(g);
  std::vector<int64_t> tap_lo(g.kW), tap_hi(g.kW);
  for (int64_t kw = 0; kw < g.kW; ++kw) valid_outputs_for_tap(g.W, g.OW, g.sW, g.pW, kw, &tap_lo[kw], &tap_hi[kw]);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(input);
    T* out = static_cast<T*>(output);
    if (cl) {
      const bool overlapping = g.sH < g.kH || g.sW < g.kW;
      parallel_for(g.N * g.OH * g.OW, grain_for(g.C * g.kH * g.kW), [&](int64_t begin, int64_t end) {
        if (overlapping) {
          FASTCNN_ISA_CALL(avg_pool_cl_blocked_positions, T, in, out, g, hw.begin.data(), hw.end.data(),
                           hw.divisor.data(), ww.begin.data(), ww.end.data(), ww.divisor.data(), begin, end);
        } else {
          FASTCNN_ISA_CALL(avg_pool_cl_stream_positions, T, in, out, g, hw.begin.data(), hw.end.data(),
                           hw.divisor.data(), ww.begin.data(), ww.end.data(), ww.divisor.data(), begin, end);
        }
      });
    } else {
      parallel_for(g.N * g.C * g.OH, grain_for(g.OW * g.kH * g.kW), [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(avg_pool_nchw_rows, T, in, out, g, hw.begin.data(), hw.end.data(), hw.divisor.data(),
                         tap_lo.data(), tap_hi.data(), ww.divisor.data(), begin, end);
      });
    }
  });
}

void avg_pool2d_backward(const void* grad_output, void* grad_input, const Pool2dGeometry& g,
                         bool count_include_pad, int dtype) {
  if (g.N * g.C * g.H * g.W == 0) return;
  const AxisWindows hw = axis_windows(g.H, g.OH, g.kH, g.sH, g.pH, count_include_pad);
  const AxisWindows ww = axis_windows(g.W, g.OW, g.kW, g.sW, g.pW, count_include_pad);
  const AxisCover hc = axis_cover(g.H, g.OH, g.kH, g.sH, g.pH);
  const AxisCover wc = axis_cover(g.W, g.OW, g.kW, g.sW, g.pW);
  const bool cl = use_channels_last_backward(g);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* go = static_cast<const T*>(grad_output);
    T* gi = static_cast<T*>(grad_input);
    if (cl) {
      parallel_for(g.N * g.H, grain_for(g.W * g.C * g.kH * g.kW), [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(avg_pool_backward_cl_rows, T, go, gi, g, hw.divisor.data(), ww.divisor.data(),
                         hc.first.data(), hc.last.data(), wc.first.data(), wc.last.data(), begin, end);
      });
    } else {
      parallel_for(g.N * g.C, grain_for(g.H * g.W * g.kH * g.kW), [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(avg_pool_backward_nchw_planes, T, go, gi, g, hw.divisor.data(), ww.divisor.data(),
                         hc.first.data(), hc.last.data(), wc.first.data(), wc.last.data(), begin, end);
      });
    }
  });
}

}  // namespace fastcnn::cpu
