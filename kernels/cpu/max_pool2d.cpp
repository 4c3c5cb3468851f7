// Max pooling with indices and its backward.
//
// Forward: each window is scanned in torch's order (row by row); an element
// replaces the running max if it is greater or NaN, so the first max wins ties
// and the last NaN wins over everything. The running max starts at -inf with the
// index of the window's first in-bounds position, as in PyTorch.
// Two loop orders, each vectorised across outputs that share a window shape:
//   channels_last output: one task per output row (n, oh), across channels;
//   otherwise: one task per (n, c) plane, across the interior columns of an output row.
// The vectors are GCC vector types (lowered to SSE2 in the base variant) so that the
// running max and index of a block of outputs stay in registers over the window.
// Without an indices pointer (inference) the kernels are instantiated with the
// NoIndices tag: the index bookkeeping drops out of the inner loops, the values
// and their NaN semantics are the same.
// Backward: each task owns part of grad_input (a plane, or an image's block of
// channels), zeroes it and adds each gradient at its index in output order: no
// atomics, no two threads touch one element, the same bits every run.
#include "max_pool2d.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "fastcnn/cpu_parallel.h"
#include "fastcnn/dispatch.h"

namespace fastcnn::cpu {
namespace {

constexpr int64_t kGrainWork = 32768;  // window taps (or elements) per task, at least
constexpr int kWideBlock = 8;          // vectors per block in the main loops: more loads in flight

// An integer known at compile time in the common cases (so that strided loads
// vectorise), or at run time.
template <int64_t N> struct Fixed { static constexpr int64_t value = N; };
struct Runtime { int64_t value; };

// 32-byte vectors of the accumulation type, with masks/indices of the same lane width.
template <class F> struct Simd;
template <> struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t Idx;
  typedef int32_t M __attribute__((vector_size(32)));
  typedef int64_t Wide __attribute__((vector_size(64)));
  static constexpr int kLanes = 8;
};
template <> struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t Idx;
  typedef int64_t M __attribute__((vector_size(32)));
  typedef int64_t Wide __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

// Taps of one window along an axis: first, first + d, ... while < end (torch's
// start/end with the start moved forward to the first in-bounds tap).
struct Span {
  int64_t first, end;
};
FASTCNN_ALWAYS_INLINE Span window_span(int64_t o, int64_t stride, int64_t pad, int64_t k, int64_t d,
                                       int64_t size) {
  int64_t start = o * stride - pad;
  const int64_t end = std::min(start + (k - 1) * d + 1, size);
  if (start < 0) start += (-start + d - 1) / d * d;
  return {start, end};
}

bool channels_last(const Pool2dGeometry& g) { return g.out_stride[1] < g.out_stride[3]; }

// Index type tag for values only: no index is computed or stored.
struct NoIndices {};
template <class I> constexpr bool kWantsIndices = !std::is_same_v<I, NoIndices>;

// int32 indices (as many lanes as float) unless a plane is too large for them.
bool index_fits_int32(const Pool2dGeometry& g) {
  const int64_t rows = g.H + g.kH * g.dH + 1, cols = g.W + g.kW * g.dW + 1;
  return rows * cols < int64_t(std::numeric_limits<int32_t>::max());
}

// A run of outputs whose windows are one window shifted: output j reads tap
// (ih, iw) at base[ih * sh + iw * sw + j * step] and records index
// ih * W + iw + j * idx_step; it is written at out[j * out_step], ind[j * out_step].
template <class T, class Step, class IdxStep>
struct Run {
  const T* base;
  Step step;
  IdxStep idx_step;
  T* out;
  int64_t* ind;
  int64_t out_step;
};

// ind + offset, or null without indices (offsetting a null pointer is undefined).
FASTCNN_ALWAYS_INLINE int64_t* at_or_null(int64_t* ind, int64_t offset) { return ind ? ind + offset : nullptr; }

template <class T, class V, class Step>
FASTCNN_ALWAYS_INLINE void load_lanes(const T* src, Step step, V& v) {
  using F = acc_t<T>;
  constexpr int L = Simd<F>::kLanes;
  if constexpr (std::is_same_v<T, F> && std::is_same_v<Step, Fixed<1>>) {
    std::memcpy(&v, src, sizeof v);
  } else if constexpr (std::is_same_v<T, F> && std::is_same_v<Step, Fixed<2>>) {
    // Even elements of src[0, 2L - 1): the upper load starts at L - 1 so that it
    // ends on the last element used.
    V lo, hi;
    std::memcpy(&lo, src, sizeof lo);
    std::memcpy(&hi, src + L - 1, sizeof hi);
    typedef typename Simd<F>::M M;
    if constexpr (L == 8)
      v = __builtin_shuffle(lo, hi, M{0, 2, 4, 6, 9, 11, 13, 15});
    else
      v = __builtin_shuffle(lo, hi, M{0, 2, 5, 7});
  } else {
    F lanes[L];
    for (int l = 0; l < L; ++l) lanes[l] = load(src, l * step.value);
    std::memcpy(&v, lanes, sizeof v);
  }
}

// NV vectors of outputs starting at output j0 of the run.
template <int NV, class I, class T, class Step, class IdxStep>
FASTCNN_ALWAYS_INLINE void vector_block_max(const Run<T, Step, IdxStep>& run, int64_t j0, const Pool2dGeometry& g,
                                            Span hs, Span ws) {
  using F = acc_t<T>;
  using S = Simd<F>;
  typedef typename S::V V;
  typedef typename S::M M;
  typedef typename S::Idx Idx;
  constexpr int L = S::kLanes;
  constexpr bool kIndices = kWantsIndices<I>;
  [[maybe_unused]] M lane_offset;
  if constexpr (kIndices)
    for (int l = 0; l < L; ++l) lane_offset[l] = Idx(l * run.idx_step.value);
  V best[NV];
  [[maybe_unused]] M idx[NV];
  const T* base = run.base + j0 * run.step.value;
  const int64_t shift = j0 * run.idx_step.value;
  for (int k = 0; k < NV; ++k) {
    best[k] = V{} - std::numeric_limits<F>::infinity();
    if constexpr (kIndices)
      idx[k] = lane_offset + Idx(hs.first * g.W + ws.first + shift + k * L * run.idx_step.value);
  }
  for (int64_t ih = hs.first; ih < hs.end; ih += g.dH) {
    for (int64_t iw = ws.first; iw < ws.end; iw += g.dW) {
      const T* src = base + ih * g.in_stride[2] + iw * g.in_stride[3];
      [[maybe_unused]] const int64_t flat = ih * g.W + iw + shift;
      for (int k = 0; k < NV; ++k) {
        V v;
        load_lanes(src + k * L * run.step.value, run.step, v);
        const M take = (v > best[k]) | (v != v);
        best[k] = take ? v : best[k];
        if constexpr (kIndices) idx[k] = take ? lane_offset + Idx(flat + k * L * run.idx_step.value) : idx[k];
      }
    }
  }
  for (int k = 0; k < NV; ++k) {
    const int64_t at = (j0 + k * L) * run.out_step;
    if (run.out_step == 1) {
      if constexpr (std::is_same_v<T, F>) {
        std::memcpy(run.out + at, &best[k], sizeof(V));
      } else {
        for (int l = 0; l < L; ++l) store(run.out + at, l, best[k][l]);
      }
      if constexpr (kIndices) {
        const typename S::Wide wide = __builtin_convertvector(idx[k], typename S::Wide);
        std::memcpy(run.ind + at, &wide, sizeof wide);
      }
    } else {
      for (int l = 0; l < L; ++l) {
        store(run.out + at, l * run.out_step, best[k][l]);
        if constexpr (kIndices) run.ind[at + l * run.out_step] = idx[k][l];
      }
    }
  }
}

// Outputs [j0, j0 + count) of the run one at a time, with indices of type I (or none).
template <class I, class T, class Step, class IdxStep>
FASTCNN_ALWAYS_INLINE void scalar_max(const Run<T, Step, IdxStep>& run, int64_t j0, int64_t count,
                                      const Pool2dGeometry& g, Span hs, Span ws) {
  using F = acc_t<T>;
  for (int64_t j = j0; j < j0 + count; ++j) {
    const T* base = run.base + j * run.step.value;
    F best = -std::numeric_limits<F>::infinity();
    [[maybe_unused]] I idx{};
    if constexpr (kWantsIndices<I>) idx = I(hs.first * g.W + ws.first + j * run.idx_step.value);
    for (int64_t ih = hs.first; ih < hs.end; ih += g.dH) {
      for (int64_t iw = ws.first; iw < ws.end; iw += g.dW) {
        const F v = load(base, ih * g.in_stride[2] + iw * g.in_stride[3]);
        const bool take = v > best || v != v;  // selects, not branches: the data is random
        best = take ? v : best;
        if constexpr (kWantsIndices<I>) idx = take ? I(ih * g.W + iw + j * run.idx_step.value) : idx;
      }
    }
    store(run.out, j * run.out_step, best);
    if constexpr (kWantsIndices<I>) run.ind[j * run.out_step] = idx;
  }
}

// Outputs [0, count) of the run: wide blocks, then single vectors, the last of
// which ends at the run's end, overlapping its predecessor (the overlap is written
// twice with the same values, by the same thread). Runs shorter than a vector go
// one output at a time.
template <class I, class T, class Step, class IdxStep>
FASTCNN_ALWAYS_INLINE void run_max(const Run<T, Step, IdxStep>& run, int64_t count, const Pool2dGeometry& g,
                                   Span hs, Span ws) {
  using S = Simd<acc_t<T>>;
  constexpr int64_t L = S::kLanes;
  if constexpr (!kWantsIndices<I> || sizeof(typename S::Idx) >= sizeof(I)) {  // the lanes hold every index
    if (count >= L) {
      int64_t j = 0;
      for (; j + kWideBlock * L <= count; j += kWideBlock * L) vector_block_max<kWideBlock, I>(run, j, g, hs, ws);
      for (; j + L <= count; j += L) vector_block_max<1, I>(run, j, g, hs, ws);
      if (j < count) vector_block_max<1, I>(run, count - L, g, hs, ws);
      return;
    }
  }
  scalar_max<I>(run, 0, count, g, hs, ws);
}

// Planes [begin, end) of N * C. In each output row the columns whose windows lie
// inside the input form one run; the border columns go one at a time.
template <class T, class I, class Step>
FASTCNN_ALWAYS_INLINE void planes_body(const T* in, T* out, int64_t* ind, const Pool2dGeometry* gp,
                                       int64_t begin, int64_t end, I, Step step) {
  const Pool2dGeometry& g = *gp;
  const int64_t osw = g.out_stride[3];
  // Interior columns [ow_lo, ow_hi): window start >= 0 and last tap < W.
  const int64_t ow_lo = std::min((g.pW + g.sW - 1) / g.sW, g.OW);
  const int64_t last_fit = g.W - 1 + g.pW - (g.kW - 1) * g.dW;
  const int64_t ow_hi = last_fit < 0 ? ow_lo : std::max(ow_lo, std::min(g.OW, last_fit / g.sW + 1));
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / g.C, c = p % g.C;
    const T* plane = in + n * g.in_stride[0] + c * g.in_stride[1];
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const Span hs = window_span(oh, g.sH, g.pH, g.kH, g.dH, g.H);
      const int64_t row = n * g.out_stride[0] + c * g.out_stride[1] + oh * g.out_stride[2];
      // Border columns, one at a time: output j of this run is column j, its window given.
      const Run<T, Fixed<0>, Fixed<0>> border{plane, {}, {}, out + row, at_or_null(ind, row), osw};
      for (int64_t ow = 0; ow < ow_lo; ++ow)
        scalar_max<I>(border, ow, 1, g, hs, window_span(ow, g.sW, g.pW, g.kW, g.dW, g.W));
      for (int64_t ow = ow_hi; ow < g.OW; ++ow)
        scalar_max<I>(border, ow, 1, g, hs, window_span(ow, g.sW, g.pW, g.kW, g.dW, g.W));
      if (ow_lo < ow_hi) {
        const int64_t w0 = ow_lo * g.sW - g.pW;
        const Run<T, Step, Runtime> interior{plane, step, {g.sW}, out + row + ow_lo * osw,
                                             at_or_null(ind, row + ow_lo * osw), osw};
        run_max<I>(interior, ow_hi - ow_lo, g, hs, Span{w0, w0 + (g.kW - 1) * g.dW + 1});
      }
    }
  }
}
FASTCNN_ISA_VARIANTS(max_pool2d_planes, planes_body)

// Output rows [begin, end) of N * OH; at each output position the channels form one run.
template <class T, class I, class Step>
FASTCNN_ALWAYS_INLINE void rows_body(const T* in, T* out, int64_t* ind, const Pool2dGeometry* gp,
                                     int64_t begin, int64_t end, I, Step step) {
  const Pool2dGeometry& g = *gp;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / g.OH, oh = r % g.OH;
    const Span hs = window_span(oh, g.sH, g.pH, g.kH, g.dH, g.H);
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const int64_t o = n * g.out_stride[0] + oh * g.out_stride[2] + ow * g.out_stride[3];
      const Run<T, Step, Fixed<0>> channels{in + n * g.in_stride[0], step, {}, out + o, at_or_null(ind, o),
                                            g.out_stride[1]};
      run_max<I>(channels, g.C, g, hs, window_span(ow, g.sW, g.pW, g.kW, g.dW, g.W));
    }
  }
}
FASTCNN_ISA_VARIANTS(max_pool2d_rows, rows_body)

// channels_last backward: adds grad_out's elements at their indices into grad_in,
// which the task zeroes as it goes. A task is image n's channels [c0, c0 + chans):
// its own part of grad_in, so no two threads touch one element. Gradients are added
// in output order, in the storage type (one rounding per add), as PyTorch's CPU
// kernel does, so the sums are PyTorch's to the bit. Input rows are zeroed just
// before the first output row whose windows reach them, so that the adds find them
// in cache (zeroed whole first, an image's 12.8 MB of VGG-16's first pool left cache
// before the adds came back to it).
template <class T>
FASTCNN_ALWAYS_INLINE void scatter_body(const T* go, const int64_t* ind, T* gi, const Pool2dGeometry* gp,
                                        int64_t begin, int64_t end, int64_t chans_per_task) {
  using F = acc_t<T>;
  const Pool2dGeometry& g = *gp;
  const int64_t plane_size = g.H * g.W;
  const int64_t isc = g.in_stride[1], ish = g.in_stride[2], isw = g.in_stride[3], osc = g.out_stride[1];
  const bool rows_dense = ish == g.W * isw;  // then index j sits at j * isw
  const int64_t blocks = (g.C + chans_per_task - 1) / chans_per_task;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / blocks, c0 = t % blocks * chans_per_task;
    const int64_t chans = std::min(chans_per_task, g.C - c0);
    T* base = gi + n * g.in_stride[0] + c0 * isc;
    // A row's chans x W elements in one run; zero bits are +0.0 in every storage type.
    const bool row_run = (chans == 1 || isc == 1) && (g.W == 1 || isw == chans);
    int64_t zeroed = 0;  // rows [0, zeroed) are zero
    const auto zero_rows = [&](int64_t until) FASTCNN_ALWAYS_INLINE_LAMBDA {
      for (; zeroed < std::min(until, g.H); ++zeroed) {
        T* row = base + zeroed * ish;
        if (row_run) {
          std::memset(row, 0, sizeof(T) * g.W * chans);
        } else if (isc == 1) {  // a batch of one's channels split over threads
          for (int64_t w = 0; w < g.W; ++w) std::memset(row + w * isw, 0, sizeof(T) * chans);
        } else {
          for (int64_t w = 0; w < g.W; ++w)
            for (int64_t c = 0; c < chans; ++c) store(row, w * isw + c * isc, F(0));
        }
      }
    };
    const int64_t out_base = n * g.out_stride[0] + c0 * osc;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      zero_rows(oh * g.sH - g.pH + (g.kH - 1) * g.dH + 1);  // every row this output row's windows reach
      const int64_t out_row = out_base + oh * g.out_stride[2];
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t o = out_row + ow * g.out_stride[3];
        for (int64_t c = 0; c < chans; ++c) {
          const int64_t j = ind[o + c * osc];
          // An empty window (possible with dilation) has an index past the plane: nothing to add.
          if (uint64_t(j) >= uint64_t(plane_size)) continue;
          const int64_t at = (rows_dense ? j * isw : j / g.W * ish + j % g.W * isw) + c * isc;
          store(base, at, load(base, at) + load(go, o + c * osc));
        }
      }
    }
    zero_rows(g.H);  // rows no window reaches
  }
}
FASTCNN_ISA_VARIANTS(max_pool2d_scatter, scatter_body)

// channels_last backward where windows do not overlap (stride = kernel, no dilation:
// VGG's 2x2/2), channels one element apart: each input element gets its window's
// gradient where it holds the window's index and zero elsewhere, written once and in
// order (zeroed, then added into, VGG-16's first pool at batch 8 ran 0.82-0.88x
// eager). Stored as 0 + gradient, as the adds give it (-0.0 becomes +0.0).
template <class T>
FASTCNN_ALWAYS_INLINE void scatter_disjoint_body(const T* go, const int64_t* ind, T* gi, const Pool2dGeometry* gp,
                                                 int64_t begin, int64_t end, int64_t chans_per_task) {
  using F = acc_t<T>;
  const Pool2dGeometry& g = *gp;
  const int64_t ish = g.in_stride[2], isw = g.in_stride[3], osh = g.out_stride[2], osw = g.out_stride[3];
  const int64_t blocks = (g.C + chans_per_task - 1) / chans_per_task;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / blocks, c0 = t % blocks * chans_per_task;
    const int64_t chans = std::min(chans_per_task, g.C - c0);
    T* base = gi + n * g.in_stride[0] + c0;
    const int64_t out_base = n * g.out_stride[0] + c0;
    for (int64_t y = 0; y < g.H; ++y) {
      const int64_t oh = (y + g.pH) / g.sH;  // the one window row that holds input row y
      for (int64_t x = 0; x < g.W; ++x) {
        T* d = base + y * ish + x * isw;
        const int64_t ow = (x + g.pW) / g.sW;
        if (oh >= g.OH || ow >= g.OW) {  // past the last window (floor mode)
          for (int64_t c = 0; c < chans; ++c) store(d, c, F(0));
          continue;
        }
        const int64_t o = out_base + oh * osh + ow * osw, pos = y * g.W + x;
        const int64_t* window_ind = ind + o;
        const T* window_grad = go + o;
        int64_t c = 0;
        if constexpr (std::is_same_v<T, float>) {  // 8 lanes: a branch per element mispredicted a quarter of the time
          typedef int64_t i64x4 __attribute__((vector_size(32)));
          typedef int32_t i32x8 __attribute__((vector_size(32)));
          typedef float f32x8 __attribute__((vector_size(32)));
          const i64x4 at{pos, pos, pos, pos};
          const i32x8 low_halves{0, 2, 4, 6, 8, 10, 12, 14};
          for (; c + 8 <= chans; c += 8) {
            i64x4 lo, hi;
            f32x8 grad;
            std::memcpy(&lo, window_ind + c, sizeof lo);
            std::memcpy(&hi, window_ind + c + 4, sizeof hi);
            std::memcpy(&grad, window_grad + c, sizeof grad);
            const i32x8 mask = __builtin_shuffle(i32x8(lo == at), i32x8(hi == at), low_halves);
            const i32x8 value = i32x8(grad + 0.0f) & mask;
            std::memcpy(d + c, &value, sizeof value);
          }
        }
        for (; c < chans; ++c) store(d, c, window_ind[c] == pos ? F(0) + load(window_grad, c) : F(0));
      }
    }
  }
}
FASTCNN_ISA_VARIANTS(max_pool2d_scatter_disjoint, scatter_disjoint_body)

// NCHW backward: scatter_body with one plane per task, without the channel loop.
template <class T>
FASTCNN_ALWAYS_INLINE void scatter_planes_body(const T* go, const int64_t* ind, T* gi, const Pool2dGeometry* gp,
                                               int64_t begin, int64_t end) {
  using F = acc_t<T>;
  const Pool2dGeometry& g = *gp;
  const int64_t plane_size = g.H * g.W;
  const int64_t ish = g.in_stride[2], isw = g.in_stride[3];
  const bool dense = isw == 1 && ish == g.W;  // then index j sits at j
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / g.C, c = p % g.C;
    T* plane = gi + n * g.in_stride[0] + c * g.in_stride[1];
    if (dense) {
      std::memset(plane, 0, sizeof(T) * plane_size);  // zero bits are +0.0 in every storage type
    } else {
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t w = 0; w < g.W; ++w) store(plane, h * ish + w * isw, F(0));
    }
    const int64_t out_plane = n * g.out_stride[0] + c * g.out_stride[1];
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const T* go_row = go + out_plane + oh * g.out_stride[2];
      const int64_t* ind_row = ind + out_plane + oh * g.out_stride[2];
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t j = ind_row[ow * g.out_stride[3]];
        if (uint64_t(j) >= uint64_t(plane_size)) continue;  // an empty window's index
        const int64_t at = dense ? j : j / g.W * ish + j % g.W * isw;
        store(plane, at, load(plane, at) + load(go_row, ow * g.out_stride[3]));
      }
    }
  }
}
FASTCNN_ISA_VARIANTS(max_pool2d_scatter_planes, scatter_planes_body)

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_task));
}

template <class T, class I, class Step>
void forward_with(const T* in, T* out, int64_t* ind, const Pool2dGeometry& g, I idx_tag, Step step) {
  const int64_t taps = g.kH * g.kW;
  if (channels_last(g)) {
    parallel_for(g.N * g.OH, grain_for(g.OW * g.C * taps), [&](int64_t begin, int64_t end) {
      FASTCNN_ISA_CALL(max_pool2d_rows, T, in, out, ind, &g, begin, end, idx_tag, step);
    });
  } else {
    parallel_for(g.N * g.C, grain_for(g.OH * g.OW * taps), [&](int64_t begin, int64_t end) {
      FASTCNN_ISA_CALL(max_pool2d_planes, T, in, out, ind, &g, begin, end, idx_tag, step);
    });
  }
}

template <class T, class I>
void forward_with_index(const T* in, T* out, int64_t* ind, const Pool2dGeometry& g, I idx_tag) {
  // The vectorised loop walks channels (channels_last) or interior output columns.
  const int64_t step = channels_last(g) ? g.in_stride[1] : g.sW * g.in_stride[3];
  if (step == 1) return forward_with(in, out, ind, g, idx_tag, Fixed<1>{});
  if (step == 2) return forward_with(in, out, ind, g, idx_tag, Fixed<2>{});
  forward_with(in, out, ind, g, idx_tag, Runtime{step});
}

}  // namespace

void max_pool2d(const void* input, void* out, int64_t* indices, const Pool2dGeometry& g, int dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(input);
    T* o = static_cast<T*>(out);
    if (indices == nullptr)
      forward_with_index(in, o, indices, g, NoIndices{});
    else if (index_fits_int32(g))
      forward_with_index(in, o, indices, g, int32_t{});
    else
      forward_with_index(in, o, indices, g, int64_t{});
  });
}

void max_pool2d_backward(const void* grad_out, const int64_t* indices, void* grad_in, const Pool2dGeometry& g,
                         int dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    // NCHW: one plane per task. channels_last: all of an image's channels per task
    // (long contiguous runs of grad_out and indices), split only as far as needed
    // to give every thread work.
    if (!channels_last(g)) {
      parallel_for(g.N * g.C, grain_for(g.H * g.W + g.OH * g.OW), [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(max_pool2d_scatter_planes, T, static_cast<const T*>(grad_out), indices,
                         static_cast<T*>(grad_in), &g, begin, end);
      });
      return;
    }
    const int64_t threads = omp_get_max_threads();
    const int64_t splits = std::min(g.C, (threads + g.N - 1) / g.N);
    const int64_t chans_per_task = (g.C + splits - 1) / splits;
    const int64_t tasks = g.N * ((g.C + chans_per_task - 1) / chans_per_task);
    const bool disjoint = g.dH == 1 && g.dW == 1 && g.sH == g.kH && g.sW == g.kW && g.in_stride[1] == 1 &&
                          g.out_stride[1] == 1;
    parallel_for(tasks, grain_for(chans_per_task * (g.H * g.W + g.OH * g.OW)), [&](int64_t begin, int64_t end) {
      if (disjoint) {
        FASTCNN_ISA_CALL(max_pool2d_scatter_disjoint, T, static_cast<const T*>(grad_out), indices,
                         static_cast<T*>(grad_in), &g, begin, end, chans_per_task);
      } else {
        FASTCNN_ISA_CALL(max_pool2d_scatter, T, static_cast<const T*>(grad_out), indices, static_cast<T*>(grad_in),
                         &g, begin, end, chans_per_task);
      }
    });
  });
}

}  // namespace fastcnn::cpu
