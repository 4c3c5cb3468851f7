// Local response normalisation across channels, and its backward.
//
// Work is split into tiles of B pixel columns (all C channels of B pixels), copied
// into buffers laid out [C][B] whatever the tensor's layout, so the channel-window
// sums run as vector loops over the B pixels. Each window sum is recomputed in
// channel order (no sliding add/subtract, which cancels in float32), so results do
// not depend on the tiling or the thread count.
//
// Backward, with s as above, div = s^beta, y = x / div:
//   dy[c]/dx[j] = [c == j] / div[j] - (2 alpha beta / size) x[c] x[j] / (div[c] s[c])  for j in window(c)
//   grad_x[j] = g[j] / div[j] - (2 alpha beta / size) x[j] * sum over c with j in window(c) of
//               g[c] x[c] / (div[c] s[c]),   those c being [j - (size-1)/2, j + size/2].
#include "local_response_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fastcnn/cpu_parallel.h"
#include "fastcnn/dispatch.h"

namespace fastcnn::cpu {
namespace {

constexpr int64_t kMaxTile = 64;

// Where tile t lies: NCHW tiles hold B consecutive positions of one image (channel
// stride HW); channels_last tiles hold B consecutive pixels (channel stride 1).
struct Tiling {
  int64_t C, cs, ps, pixels, image_stride, tiles_per_image, B;

  explicit Tiling(const LrnParams& p) : C(p.C) {
    // 16K elements per [C][B] buffer: the backward's five fit in L2 (B = 64 for AlexNet's
    // 96 and 256 channels: measured 1.5-2x faster than 4K, which left B = 16 for 256).
    B = std::max<int64_t>(1, std::min<int64_t>(kMaxTile, 16384 / std::max<int64_t>(p.C, 1)));
    if (p.channels_last) {
      cs = 1, ps = p.C, pixels = p.N * p.HW, image_stride = 0;
    } else {
      cs = p.HW, ps = 1, pixels = p.HW, image_stride = p.C * p.HW;
    }
    tiles_per_image = (pixels + B - 1) / B;
  }
  int64_t tiles(const LrnParams& p) const { return (p.channels_last ? 1 : p.N) * tiles_per_image; }
  int64_t base(int64_t t) const {
    return (t / tiles_per_image) * image_stride + (t % tiles_per_image) * B * ps;
  }
  int64_t width(int64_t t) const { return std::min(B, pixels - (t % tiles_per_image) * B); }
};

// Buffer [c * B + b] <- tensor[base + c * cs + b * ps], reading along the tensor's fast axis.
template <class T>
FASTCNN_ALWAYS_INLINE void gather(const T* src, acc_t<T>* buf, const Tiling& g, int64_t base, int64_t nb) {
  if (g.cs == 1) {
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t c = 0; c < g.C; ++c) buf[c * g.B + b] = load(src, base + b * g.ps + c);
  } else {
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t b = 0; b < nb; ++b) buf[c * g.B + b] = load(src, base + c * g.cs + b);
  }
}

template <class T>
FASTCNN_ALWAYS_INLINE void scatter(const acc_t<T>* buf, T* dst, const Tiling& g, int64_t base, int64_t nb) {
  if (g.cs == 1) {
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t c = 0; c < g.C; ++c) store(dst, base + b * g.ps + c, buf[c * g.B + b]);
  } else {
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t b = 0; b < nb; ++b) store(dst, base + c * g.cs + b, buf[c * g.B + b]);
  }
}

// sum[b] = sq[lo][b] + ... + sq[hi][b], channels in order.
template <class F>
FASTCNN_ALWAYS_INLINE void window_sum(const F* sq, F* sum, int64_t B, int64_t lo, int64_t hi, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) sum[b] = F(0);
  for (int64_t c = lo; c <= hi; ++c)
    for (int64_t b = 0; b < nb; ++b) sum[b] += sq[c * B + b];
}

// s <- k + alpha/size * sum, div <- s^beta. beta = 0.75 (every AlexNet-style net) takes
// square roots, which vectorise, instead of pow.
template <class F>
FASTCNN_ALWAYS_INLINE void scale_and_div(const F* sum, F* s, F* div, int64_t nb, F k, F alpha_over_size,
                                         F beta, bool beta_is_075) {
  for (int64_t b = 0; b < nb; ++b) s[b] = k + alpha_over_size * sum[b];
  if (beta_is_075) {
    for (int64_t b = 0; b < nb; ++b) {
      const F r = std::sqrt(s[b]);
      div[b] = r * std::sqrt(r);
    }
  } else {
    for (int64_t b = 0; b < nb; ++b) div[b] = std::pow(s[b], beta);
  }
}

template <class T>
FASTCNN_ALWAYS_INLINE void lrn_forward_body(const T* x, T* out, const LrnParams* p, int64_t t_begin,
                                            int64_t t_end) {
  using F = acc_t<T>;
  const Tiling g(*p);
  const int64_t C = p->C, B = g.B, lo_off = p->size / 2, hi_off = (p->size - 1) / 2;
  const F k = F(p->k), alpha_over_size = F(p->alpha / double(p->size)), beta = F(p->beta);
  const bool beta_is_075 = p->beta == 0.75;
  std::vector<F> buffers(size_t(3 * C * B));
  F* xs = buffers.data();
  F* sq = xs + C * B;
  F* ys = sq + C * B;
  F sum[kMaxTile], s[kMaxTile], div[kMaxTile];
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t base = g.base(t), nb = g.width(t);
    gather(x, xs, g, base, nb);
    for (int64_t i = 0; i < C * B; ++i) sq[i] = xs[i] * xs[i];
    for (int64_t c = 0; c < C; ++c) {
      window_sum(sq, sum, B, std::max<int64_t>(0, c - lo_off), std::min(C - 1, c + hi_off), nb);
      scale_and_div(sum, s, div, nb, k, alpha_over_size, beta, beta_is_075);
      for (int64_t b = 0; b < nb; ++b) ys[c * B + b] = xs[c * B + b] / div[b];
    }
    scatter(ys, out, g, base, nb);
  }
}
FASTCNN_ISA_VARIANTS(lrn_forward_tiles, lrn_forward_body)

template <class T>
FASTCNN_ALWAYS_INLINE void lrn_backward_body(const T* grad, const T* x, T* grad_x, const LrnParams* p,
                                             int64_t t_begin, int64_t t_end) {
  using F = acc_t<T>;
  const Tiling g(*p);
  const int64_t C = p->C, B = g.B, lo_off = p->size / 2, hi_off = (p->size - 1) / 2;
  const F k = F(p->k), alpha_over_size = F(p->alpha / double(p->size)), beta = F(p->beta);
  const F coef = F(2.0 * p->alpha * p->beta / double(p->size));
  const bool beta_is_075 = p->beta == 0.75;
  std::vector<F> buffers(size_t(5 * C * B));
  F* xs = buffers.data();
  F* gs = xs + C * B;
  F* sq = gs + C * B;  // x^2, then the result
  F* divs = sq + C * B;
  F* ts = divs + C * B;  // g x / (div s)
  F sum[kMaxTile], s[kMaxTile], div[kMaxTile];
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t base = g.base(t), nb = g.width(t);
    gather(x, xs, g, base, nb);
    gather(grad, gs, g, base, nb);
    for (int64_t i = 0; i < C * B; ++i) sq[i] = xs[i] * xs[i];
    for (int64_t c = 0; c < C; ++c) {
      window_sum(sq, sum, B, std::max<int64_t>(0, c - lo_off), std::min(C - 1, c + hi_off), nb);
      scale_and_div(sum, s, div, nb, k, alpha_over_size, beta, beta_is_075);
      for (int64_t b = 0; b < nb; ++b) {
        divs[c * B + b] = div[b];
        ts[c * B + b] = gs[c * B + b] * xs[c * B + b] / (div[b] * s[b]);
      }
    }
    // The outputs whose window holds channel j: c in [j - (size-1)/2, j + size/2].
    for (int64_t j = 0; j < C; ++j) {
      window_sum(ts, sum, B, std::max<int64_t>(0, j - hi_off), std::min(C - 1, j + lo_off), nb);
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i = j * B + b;
        sq[i] = gs[i] / divs[i] - coef * xs[i] * sum[b];
      }
    }
    scatter(sq, grad_x, g, base, nb);
  }
}
FASTCNN_ISA_VARIANTS(lrn_backward_tiles, lrn_backward_body)

// Tiles per chunk: enough for ~32K elements, so small tensors stay on one thread.
int64_t grain_of(const Tiling& g) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.C * g.B)); }

}  // namespace

void local_response_norm(const void* input, void* output, const LrnParams& p, int dtype) {
  const Tiling g(p);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(g.tiles(p), grain_of(g), [&](int64_t begin, int64_t end) {
      FASTCNN_ISA_CALL(lrn_forward_tiles, T, static_cast<const T*>(input), static_cast<T*>(output), &p,
                       begin, end);
    });
  });
}

void local_response_norm_backward(const void* grad_output, const void* input, void* grad_input,
                                  const LrnParams& p, int dtype) {
  const Tiling g(p);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(g.tiles(p), grain_of(g), [&](int64_t begin, int64_t end) {
      FASTCNN_ISA_CALL(lrn_backward_tiles, T, static_cast<const T*>(grad_output), static_cast<const T*>(input),
                       static_cast<T*>(grad_input), &p, begin, end);
    });
  });
}

}  // namespace fastcnn::cpu
