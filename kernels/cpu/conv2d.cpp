// conv2d as three implicit GEMMs on the blocked core (gemm_blocked.h); no im2col
// buffer: A panels are packed (or, where rows are evenly spaced, read in place)
// straight from the input through the convolution's index math.
//   forward:     rows = output pixels (n, oh, ow), cols = output channels of the group,
//                k = (r, s, c) with c fastest (contiguous in channels_last)
//   input grad:  rows = input pixels (n, ih, iw), cols = input channels of the group,
//                k = (r, s, k) gathered from grad with the transposed index math
//   weight grad: rows = output channels, cols = (r, s, c), k = output pixels (n, oh, ow)
#include "conv2d.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "fastcnn/dispatch.h"
#include "gemm_blocked.h"

namespace fastcnn::cpu {
namespace {

using gemm::APanel;
using gemm::MR;

// Where a kernel row's taps lie back to back in memory (channels_last, groups = 1,
// dilation 1), K blocks are whole kernel rows, read in place: the micro-kernel then
// sums S taps per pass over its accumulators instead of one (a few % faster on VGG's
// and ResNet's 3x3 layers than one tap per block). Elsewhere, from this many channels
// per tap on, K blocks stay within one tap so that A can be read in place; below it
// they span several taps, packed.
constexpr int64_t kTapRunChannels = 64;

struct Pixel {
  int64_t n, y, x;
  int64_t base;   // forward: offset of tap (0, 0) in the input
  bool interior;  // forward: every tap inside the image
  // input grad: y + ph = qy * sh + ay (and likewise x); the row walk's cursor is
  // at (gy, gx) of the grid of phase (py, px): y = py + gy * sh
  int64_t qy, qx, ay, ax, py, px, gy, gx;
};

// One kernel tap as the row side needs it: forward adds (dy, dx); the input grad's
// pixel p meets tap (r, s) only where p.ay == ry (p.ax == rx), reading q - (qr, qs).
struct Tap {
  int64_t dy, dx, qr, ry, qs, rx;
};

// The A side of the forward and input-grad GEMMs: row = a pixel of a (grid_h x grid_w)
// grid, k = (r, s, channel), channel fastest. Forward reads src at
// (y * sh - ph + r * dh, ...); the input grad (kTransposed) reads src at
// ((y + ph - r * dh) / sh, ...) when the division is exact. The input grad orders its
// rows by stride phase (y mod sh, x mod sw): MR rows of one phase meet the same taps,
// so a tap that none of them meets is skipped without packing or multiplying zeros.
template <class T, bool kTransposed>
struct ConvRows {
  const T* src;
  int64_t sN, sC, sH, sW;
  int64_t src_h, src_w, grid_h, grid_w;
  int64_t channels;  // per tap and group
  int64_t R, S, sh, sw, ph, pw, dh, dw;
  int64_t batch;

  // Rows in phase py (px) along y (x): grid positions py, py + sh, ...
  FASTCNN_ALWAYS_INLINE int64_t phase_h(int64_t py) const { return py < grid_h ? (grid_h - py + sh - 1) / sh : 0; }
  FASTCNN_ALWAYS_INLINE int64_t phase_w(int64_t px) const { return px < grid_w ? (grid_w - px + sw - 1) / sw : 0; }

  FASTCNN_ALWAYS_INLINE Pixel pixel(int64_t m) const {
    Pixel p{};
    if constexpr (kTransposed) {
      for (p.py = 0; p.py < sh; ++p.py) {
        for (p.px = 0; p.px < sw; ++p.px) {
          const int64_t hh = phase_h(p.py), ww = phase_w(p.px), size = batch * hh * ww;
          if (m < size) {
            p.gx = m % ww;
            m /= ww;
            p.gy = m % hh;
            p.n = m / hh;
            p.y = p.py + p.gy * sh;
            p.x = p.px + p.gx * sw;
            return p;
          }
          m -= size;
        }
      }
      return p;
    } else {
      p.x = m % grid_w;
      m /= grid_w;
      p.y = m % grid_h;
      p.n = m / grid_h;
      return p;
    }
  }

  FASTCNN_ALWAYS_INLINE void step(Pixel& p) const {
    if constexpr (kTransposed) {
      p.x += sw;
      if (++p.gx < phase_w(p.px)) return;
      p.gx = 0;
      p.x = p.px;
      p.y += sh;
      if (++p.gy < phase_h(p.py)) return;
      p.gy = 0;
      p.y = p.py;
      if (++p.n < batch) return;
      p.n = 0;
      do {  // next non-empty phase
        if (++p.px == sw) {
          p.px = 0;
          ++p.py;
        }
      } while (p.py < sh && (phase_h(p.py) == 0 || phase_w(p.px) == 0));
      p.y = p.py;
      p.x = p.px;
    } else {
      if (++p.x == grid_w) {
        p.x = 0;
        if (++p.y == grid_h) {
          p.y = 0;
          ++p.n;
        }
      }
    }
  }

  // The work of rows m0 .. m0 + count - 1 of the input grad: per row, one for its
  // store and two per tap its stride phase meets (padding aside; fitted to ResNet's
  // 64->128 3x3/2 input gradient at batch 8, whose halves by one per tap took 4.6 and
  // 5.1 ms).
  int64_t phase_work(int64_t m0, int64_t count) const {
    int64_t work = 0, first = 0;
    for (int64_t py = 0; py < sh; ++py) {
      for (int64_t px = 0; px < sw; ++px) {
        const int64_t last = first + batch * phase_h(py) * phase_w(px);
        const int64_t rows = std::max<int64_t>(0, std::min(last, m0 + count) - std::max(first, m0));
        int64_t taps_y = 0, taps_x = 0;
        for (int64_t r = 0; r < R; ++r) taps_y += (r * dh) % sh == (py + ph) % sh;
        for (int64_t s = 0; s < S; ++s) taps_x += (s * dw) % sw == (px + pw) % sw;
        work += rows * (1 + 2 * taps_y * taps_x);
        first = last;
      }
    }
    return work;
  }

  // Pixels m0 .. m0 + count - 1, stepping instead of dividing.
  FASTCNN_ALWAYS_INLINE void pixels(int64_t m0, int64_t count, Pixel* out) const {
    // Field by field: copying the whole struct through the stack stalls store forwarding.
    Pixel p = pixel(m0);
    for (int64_t i = 0; i < count; ++i) {
      Pixel& o = out[i];
      o.n = p.n;
      o.y = p.y;
      o.x = p.x;
      if constexpr (kTransposed) {
        const int64_t ty = p.y + ph, tx = p.x + pw;
        o.qy = ty / sh;
        o.ay = ty % sh;
        o.qx = tx / sw;
        o.ax = tx % sw;
      } else {
        const int64_t y0 = p.y * sh - ph, x0 = p.x * sw - pw;
        o.base = p.n * sN + y0 * sH + x0 * sW;
        o.interior = y0 >= 0 && y0 + (R - 1) * dh < src_h && x0 >= 0 && x0 + (S - 1) * dw < src_w;
      }
      if (i + 1 < count) step(p);
    }
  }

  FASTCNN_ALWAYS_INLINE Tap tap_of(int64_t r, int64_t s) const {
    Tap t{};
    t.dy = r * dh;
    t.dx = s * dw;
    if constexpr (kTransposed) {
      t.qr = t.dy / sh;
      t.ry = t.dy % sh;
      t.qs = t.dx / sw;
      t.rx = t.dx % sw;
    }
    return t;
  }

  // Offset of tap t of pixel p in src, or -1 where it reads padding / no term.
  FASTCNN_ALWAYS_INLINE int64_t src_offset(const Pixel& p, const Tap& t) const {
    int64_t y, x;
    if constexpr (kTransposed) {
      if (p.ay != t.ry || p.ax != t.rx) return -1;
      y = p.qy - t.qr;
      x = p.qx - t.qs;
    } else {
      y = p.y * sh - ph + t.dy;
      x = p.x * sw - pw + t.dx;
    }
    if (y < 0 || y >= src_h || x < 0 || x >= src_w) return -1;
    return p.n * sN + y * sH + x * sW;
  }

  // Element stride along k within one kernel row where its taps lie back to back
  // (channels_last with groups = 1 and dilation 1, or one channel per tap), else 0.
  FASTCNN_ALWAYS_INLINE int64_t row_step() const {
    if (kTransposed) return 0;
    if (channels == 1) return dw * sW;
    return dw * sW == channels * sC ? sC : 0;
  }
  FASTCNN_ALWAYS_INLINE bool row_contiguous() const { return row_step() != 0; }

  // K range [k0, k0 + kl) of one row into d, converted, zero where padding.
  FASTCNN_ALWAYS_INLINE void pack_row(const Pixel& p, int64_t chan0, int64_t k0, int64_t kl,
                                      acc_t<T>* d) const {
    using F = acc_t<T>;
    int64_t tap = k0 / channels, c = k0 % channels, left = kl;
    // A whole kernel row of taps is one evenly strided run when pixels are packed
    // channels-apart (channels_last, groups = 1, dilation 1): small C copies in one go.
    const int64_t step = row_step();
    while (left > 0) {
      const int64_t r = tap / S, s = tap % S;
      if (step != 0 && c == 0 && s == 0 && left >= S * channels) {
        const int64_t y = p.y * sh - ph + r * dh, x = p.x * sw - pw;
        if (y >= 0 && y < src_h && x >= 0 && x + (S - 1) * dw < src_w) {
          const T* sp = src + p.n * sN + y * sH + x * sW + chan0 * sC;
          const int64_t len = S * channels;
          if (step == 1) {
            for (int64_t t = 0; t < len; ++t) d[t] = F(to_float(sp[t]));
          } else {
            for (int64_t t = 0; t < len; ++t) d[t] = F(to_float(sp[t * step]));
          }
          d += len;
          left -= len;
          tap += S;
          continue;
        }
      }
      const int64_t len = std::min(channels - c, left);
      const int64_t off = src_offset(p, tap_of(r, s));
      if (off < 0) {
        for (int64_t t = 0; t < len; ++t) d[t] = F(0);
      } else {
        const T* sp = src + off + (chan0 + c) * sC;
        if (sC == 1) {
          for (int64_t t = 0; t < len; ++t) d[t] = F(to_float(sp[t]));
        } else {
          for (int64_t t = 0; t < len; ++t) d[t] = F(to_float(sp[t * sC]));
        }
      }
      d += len;
      left -= len;
      ++tap;
      c = 0;
    }
  }

  FASTCNN_ALWAYS_INLINE void a_block(int64_t g, const Pixel* rows, int64_t nrows, int64_t k0, int64_t kl,
                                     acc_t<T>* buf, APanel<acc_t<T>>* panels) const {
    using F = acc_t<T>;
    const int64_t chan0 = g * channels;
    const int64_t tap = k0 / channels, c0 = k0 % channels, tap_last = (k0 + kl - 1) / channels;
    // In place needs the block inside one tap, or inside one kernel row of taps
    // that lie back to back in memory.
    const int64_t r = tap / S, s = tap % S, r_last = tap_last / S, s_last = tap_last % S;
    const bool contiguous = tap == tap_last || (row_contiguous() && r == r_last);
    // Whole kernel rows of back-to-back taps: one segment per row (interior pixels only).
    const int64_t row_len = S * channels;
    const bool rows_of_taps = !kTransposed && !contiguous && row_contiguous() && k0 % row_len == 0 &&
                              kl % row_len == 0;
    const int64_t cs = tap == tap_last ? sC : row_step();
    const int64_t tap_off = r * dh * sH + s * dw * sW + (chan0 + c0) * sC;
    const Tap first = tap_of(r, s), last = tap_of(r_last, s_last);
    for (int64_t ip = 0; ip * MR < nrows; ++ip) {
      const Pixel* pr = rows + ip * MR;
      const int64_t count = std::min<int64_t>(MR, nrows - ip * MR);
      if constexpr (kTransposed) {  // a tap none of these rows meets: skip it
        if (tap == tap_last) {
          bool none = true;
          for (int64_t i = 0; i < count && none; ++i) none = src_offset(pr[i], first) < 0;
          if (none) {
            panels[ip] = {nullptr, 0, 0};
            continue;
          }
        }
      }
      if constexpr (std::is_same_v<T, F>) {
        // Read in place when the pixels' taps are inside the image: evenly spaced, or
        // (unit k stride) each row from its own offset, the rows past count repeating
        // the last (their results are never stored). Packing the MR pixels that cross
        // an output row's end cost ~10% of LeNet-5's 6->16 5x5 (OW = 10).
        if (contiguous || rows_of_taps) {
          if constexpr (!kTransposed) {  // interior pixels: no per-tap bounds checks
            bool interior = true;
            for (int64_t i = 0; i < count; ++i) interior = interior && pr[i].interior;
            const int64_t step = count > 1 ? pr[1].base - pr[0].base : 0;
            bool even = count == MR;
            for (int64_t i = 2; i < count && even; ++i) even = pr[i].base - pr[i - 1].base == step;
            if (interior && (even || cs == 1)) {
              APanel<F> panel{src + pr[0].base + tap_off, step, cs};
              if (!even) {
                panel.irregular = true;
                for (int i = 0; i < MR; ++i) panel.row_off[i] = pr[std::min<int64_t>(i, count - 1)].base - pr[0].base;
              }
              if (rows_of_taps) {
                panel.seg_len = row_len;
                panel.seg_stride = dh * sH;
              }
              panels[ip] = panel;
              continue;
            }
          }
        }
        if (contiguous && count == MR) {
          int64_t off[MR];
          bool ok = true;
          for (int i = 0; i < MR; ++i) {
            off[i] = src_offset(pr[i], first);
            ok = ok && off[i] >= 0 && (tap == tap_last || src_offset(pr[i], last) >= 0);
          }
          const int64_t step = off[1] - off[0];
          for (int i = 2; i < MR; ++i) ok = ok && off[i] - off[i - 1] == step;
          if (ok) {
            panels[ip] = {src + off[0] + (chan0 + c0) * sC, step, cs};
            continue;
          }
        }
      }
      F* dst = buf + ip * MR * kl;
      for (int64_t i = 0; i < MR; ++i) {
        if (i < count) {
          pack_row(pr[i], chan0, k0, kl, dst + i * kl);
        } else {
          for (int64_t k = 0; k < kl; ++k) dst[i * kl + k] = F(0);
        }
      }
      panels[ip] = {dst, kl, 1};
    }
  }
};

// K blocks per tap (or per whole kernel rows, where a row's taps lie back to back)
// only pay off where A can be read in place (no conversion). A 1x1 kernel's "row" is
// its one tap: from kTapRunChannels on it is split into blocks of about kKcTarget.
template <class T, class Problem>
void set_k_blocking(Problem& p, int64_t channels, int64_t row_len) {
  p.k_run = p.K;
  p.k_align = 1;
  if (!std::is_same_v<T, acc_t<T>>) return;
  if (row_len > channels || (row_len > 0 && channels < kTapRunChannels)) {
    p.k_align = row_len;
  } else if (channels >= kTapRunChannels) {
    p.k_run = channels;
  }
}

template <class T>
struct ConvForward {
  using F = acc_t<T>;
  using Row = Pixel;
  static constexpr bool kPrepackB = true;
  static constexpr int NR = gemm::kNR<F>;
  int64_t groups, M, N, K, k_run, k_align;
  ConvRows<T, false> a;
  const T* w;
  const int64_t* ws;
  int64_t Cg, Kg, S;
  const T* bias;
  const T* residual;
  const int64_t* rs;
  T* out;
  const int64_t* os;
  Act act;

  FASTCNN_ALWAYS_INLINE void rows(int64_t m0, int64_t count, Row* r) const { a.pixels(m0, count, r); }
  FASTCNN_ALWAYS_INLINE void a_block(int64_t g, const Row* rows, int64_t nrows, int64_t k0, int64_t kl, F* buf,
                                     APanel<F>* panels) const {
    a.a_block(g, rows, nrows, k0, kl, buf, panels);
  }
  // B[(r, s, c)][k] = w[g * Kg + k, c, r, s], one tap's run of channels at a time
  FASTCNN_ALWAYS_INLINE void pack_b(int64_t g, int64_t n0, int64_t ncols, int64_t k0, int64_t kl, F* dst) const {
    const T* wn = w + (g * Kg + n0) * ws[0];
    for (int64_t t = 0; t < kl;) {
      const int64_t k = k0 + t, tap = k / Cg, c = k % Cg, len = std::min(kl - t, Cg - c);
      gemm::pack_strided_b(wn + c * ws[1] + (tap / S) * ws[2] + (tap % S) * ws[3], ws[1], ws[0], ncols, len,
                           dst + t * NR);
      t += len;
    }
  }
  // The residual's and the output's cache lines of a tile: channels_last rows are
  // short runs a whole row of channels apart, which the hardware prefetchers miss.
  FASTCNN_ALWAYS_INLINE void prefetch_store(int64_t g, const Row* rows, int64_t nrows, int64_t n0,
                                            int64_t ncols) const {
    const int64_t k0 = g * Kg + n0;
    for (int64_t i = 0; i < nrows; ++i) {
      const Pixel& p = rows[i];
      if (residual != nullptr && rs[1] == 1) {
        const T* res = residual + p.n * rs[0] + k0 + p.y * rs[2] + p.x * rs[3];
        __builtin_prefetch(res);
        __builtin_prefetch(res + ncols - 1);
      }
      if (os[1] == 1) {
        T* o = out + p.n * os[0] + k0 + p.y * os[2] + p.x * os[3];
        __builtin_prefetch(o, 1);
        __builtin_prefetch(o + ncols - 1, 1);
      }
    }
  }
  FASTCNN_ALWAYS_INLINE void store(int64_t g, const Row* rows, int64_t nrows, int64_t n0, int64_t ncols,
                                   F* tile) const {
    const int64_t k0 = g * Kg + n0;
    const T* col_bias = bias == nullptr ? nullptr : bias + k0;
    Act row_act = act;
    if (residual == nullptr && gemm::activate_tile<T>(tile, nrows, ncols, col_bias, act)) {
      col_bias = nullptr;  // added, and the activation applied, in the tile
      row_act = Act::none;
    }
    for (int64_t i = 0; i < nrows; ++i) {
      const Pixel& p = rows[i];
      T* o = out + p.n * os[0] + k0 * os[1] + p.y * os[2] + p.x * os[3];
      const T* res = residual == nullptr ? nullptr : residual + p.n * rs[0] + k0 * rs[1] + p.y * rs[2] + p.x * rs[3];
      gemm::store_row<T>(tile + i * NR, ncols, o, os[1], col_bias, F(0), res, res == nullptr ? 0 : rs[1], row_act);
    }
  }
};

template <class T>
struct ConvInputGrad {
  using F = acc_t<T>;
  using Row = Pixel;
  static constexpr bool kPrepackB = true;
  static constexpr int NR = gemm::kNR<F>;
  int64_t groups, M, N, K, k_run, k_align;
  ConvRows<T, true> a;
  const T* w;
  const int64_t* ws;
  int64_t Cg, Kg, S;
  T* grad_x;
  const int64_t* gs;

  bool uneven_rows;  // strided: rows of different stride phases meet different numbers of taps

  FASTCNN_ALWAYS_INLINE void rows(int64_t m0, int64_t count, Row* r) const { a.pixels(m0, count, r); }
  int64_t row_cost(int64_t m0, int64_t count) const { return a.phase_work(m0, count); }
  FASTCNN_ALWAYS_INLINE void a_block(int64_t g, const Row* rows, int64_t nrows, int64_t k0, int64_t kl, F* buf,
                                     APanel<F>* panels) const {
    a.a_block(g, rows, nrows, k0, kl, buf, panels);
  }
  // B[(r, s, k)][c] = w[g * Kg + k, c, r, s]
  FASTCNN_ALWAYS_INLINE void pack_b(int64_t g, int64_t n0, int64_t ncols, int64_t k0, int64_t kl, F* dst) const {
    for (int64_t t = 0; t < kl; ++t) {
      const int64_t k = k0 + t, tap = k / Kg, kk = k % Kg;
      const T* wp = w + (g * Kg + kk) * ws[0] + n0 * ws[1] + (tap / S) * ws[2] + (tap % S) * ws[3];
      F* d = dst + t * NR;
      for (int64_t j = 0; j < ncols; ++j) d[j] = F(to_float(wp[j * ws[1]]));
      for (int64_t j = ncols; j < NR; ++j) d[j] = F(0);
    }
  }
  FASTCNN_ALWAYS_INLINE void prefetch_store(int64_t g, const Row* rows, int64_t nrows, int64_t n0,
                                            int64_t ncols) const {
    if (gs[1] != 1) return;
    const int64_t c0 = g * Cg + n0;
    for (int64_t i = 0; i < nrows; ++i) {
      const Pixel& p = rows[i];
      T* o = grad_x + p.n * gs[0] + c0 + p.y * gs[2] + p.x * gs[3];
      __builtin_prefetch(o, 1);
      __builtin_prefetch(o + ncols - 1, 1);
    }
  }
  FASTCNN_ALWAYS_INLINE void store(int64_t g, const Row* rows, int64_t nrows, int64_t n0, int64_t ncols,
                                   F* tile) const {
    const int64_t c0 = g * Cg + n0;
    for (int64_t i = 0; i < nrows; ++i) {
      const Pixel& p = rows[i];
      T* o = grad_x + p.n * gs[0] + c0 * gs[1] + p.y * gs[2] + p.x * gs[3];
      gemm::store_row<T>(tile + i * NR, ncols, o, gs[1], nullptr, F(0), nullptr, 0, Act::none);
    }
  }
};

// n <= 2 * kLanes values copied (or zeroed) as two overlapping fixed-size moves: a copy
// loop of unknown length becomes `rep movs` or a library call (tens of cycles for the few
// floats of one tap's channels).
template <class F>
FASTCNN_ALWAYS_INLINE void copy_short(F* d, const F* s, int64_t n) {
  constexpr int64_t L = gemm::kLanes<F>;
  const auto two = [&](auto size) {
    constexpr int64_t k = decltype(size)::value;
    std::memcpy(d, s, k * sizeof(F));
    std::memcpy(d + n - k, s + n - k, k * sizeof(F));
  };
  if (n >= L) {
    two(std::integral_constant<int64_t, L>{});
  } else if (n >= L / 2) {
    two(std::integral_constant<int64_t, L / 2>{});
  } else if (n >= 2) {
    two(std::integral_constant<int64_t, 2>{});
  } else if (n == 1) {
    d[0] = s[0];
  }
}
template <class F>
FASTCNN_ALWAYS_INLINE void fill_short(F* d, int64_t n) {
  alignas(32) static constexpr F kZeros[2 * gemm::kLanes<F>] = {};
  copy_short(d, kZeros, n);
}

template <class T>
struct ConvWeightGrad {
  using F = acc_t<T>;
  struct Row {
    int64_t m;  // output channel within the group
  };
  static constexpr bool kPrepackB = false;  // B is the input itself: packed per tile and K block
  static constexpr int NR = gemm::kNR<F>;
  int64_t groups, M, N, K, k_run, k_align;
  const T* grad;
  const int64_t* gs;
  const T* x;
  const int64_t* xs;
  T* grad_w;
  const int64_t* ws;
  int64_t Cg, Kg, R, S, H, W, OH, OW, sh, sw, ph, pw, dh, dw;
  bool pixels_even;  // grad's (n, oh, ow) pixels are one stride apart
  bool a_in_place;   // full row panels read in place from grad (see a_block)
  bool columns_in_order;  // grad_w's (r, s, c) elements of a row lie back to back, as the columns
  int64_t p_begin;        // first pixel of this problem's K (a pixel split's)

  FASTCNN_ALWAYS_INLINE void rows(int64_t m0, int64_t count, Row* r) const {
    for (int64_t i = 0; i < count; ++i) r[i].m = m0 + i;
  }
  FASTCNN_ALWAYS_INLINE Pixel pixel(int64_t p) const {
    Pixel q;
    p += p_begin;
    q.x = p % OW;
    p /= OW;
    q.y = p % OH;
    q.n = p / OH;
    return q;
  }
  // A[k][p] = grad[p, g * Kg + k]: rows m0.. of this tile are channels, k = pixels.
  FASTCNN_ALWAYS_INLINE void a_block(int64_t g, const Row* rows, int64_t nrows, int64_t k0, int64_t kl, F* buf,
                                     APanel<F>* panels) const {
    const int64_t m0 = rows[0].m;
    const Pixel p0 = pixel(k0);
    const T* base = grad + (g * Kg + m0) * gs[1];
    for (int64_t ip = 0; ip * MR < nrows; ++ip) {
      const int64_t count = std::min<int64_t>(MR, nrows - ip * MR);
      const T* src = base + ip * MR * gs[1];
      if constexpr (std::is_same_v<T, F>) {  // a_in_place is false otherwise
        if (a_in_place && count == MR) {
          panels[ip] = {src + p0.n * gs[0] + p0.y * gs[2] + p0.x * gs[3], gs[1], gs[3]};
          continue;
        }
      }
      F* dst = buf + ip * MR * kl;  // [kl][MR]
      Pixel q = p0;
      for (int64_t t = 0; t < kl; ++t) {
        const T* s = src + q.n * gs[0] + q.y * gs[2] + q.x * gs[3];
        for (int64_t i = 0; i < MR; ++i) dst[t * MR + i] = i < count ? F(to_float(s[i * gs[1]])) : F(0);
        if (++q.x == OW) {
          q.x = 0;
          if (++q.y == OH) {
            q.y = 0;
            ++q.n;
          }
        }
      }
      panels[ip] = {dst, 1, MR};
    }
  }
  // B[p][(r, s, c)] = x[n, g * Cg + c, oh * sh - ph + r * dh, ow * sw - pw + s * dw]
  FASTCNN_ALWAYS_INLINE void pack_b(int64_t g, int64_t n0, int64_t ncols, int64_t k0, int64_t kl, F* dst) const {
    int64_t dy[NR], dx[NR], coff[NR], off[NR];
    int64_t dy_max = 0, dx_min = 0, dx_max = 0;
    for (int64_t j = 0; j < ncols; ++j) {
      const int64_t col = n0 + j, tap = col / Cg, c = col % Cg;
      dy[j] = (tap / S) * dh;
      dx[j] = (tap % S) * dw;
      coff[j] = (g * Cg + c) * xs[1];
      off[j] = dy[j] * xs[2] + dx[j] * xs[3] + coff[j];
      dy_max = std::max(dy_max, dy[j]);
      dx_min = j == 0 ? dx[j] : std::min(dx_min, dx[j]);
      dx_max = std::max(dx_max, dx[j]);
    }
    // One tap and consecutive channels: a bounds check per pixel, then a run.
    bool one_tap = (n0 / Cg) == ((n0 + ncols - 1) / Cg);
    Pixel q = pixel(k0);
    for (int64_t t = 0; t < kl; ++t) {
      F* d = dst + t * NR;
      const int64_t y0 = q.y * sh - ph, x0 = q.x * sw - pw;
      const T* xn = x + q.n * xs[0];
      if (one_tap) {
        const int64_t y = y0 + dy[0], xx = x0 + dx[0];
        if (y >= 0 && y < H && xx >= 0 && xx < W) {
          const T* s = xn + y * xs[2] + xx * xs[3] + coff[0];
          if (xs[1] == 1 && ncols == NR) {  // a fixed-size copy: two vectors, where a run of unknown length was a memmove call
            for (int64_t j = 0; j < NR; ++j) d[j] = F(to_float(s[j]));
          } else if (xs[1] == 1) {
            for (int64_t j = 0; j < ncols; ++j) d[j] = F(to_float(s[j]));
          } else {
            for (int64_t j = 0; j < ncols; ++j) d[j] = F(to_float(s[j * xs[1]]));
          }
        } else {
          for (int64_t j = 0; j < ncols; ++j) d[j] = F(0);
        }
      } else if (y0 + dy[0] >= 0 && y0 + dy_max < H && x0 + dx_min >= 0 && x0 + dx_max < W) {
        // Every column's tap inside the image (all pixels of an unpadded conv): no per-element check.
        const int64_t origin = y0 * xs[2] + x0 * xs[3];
        for (int64_t j = 0; j < ncols; ++j) d[j] = F(to_float(xn[origin + off[j]]));
      } else {
        for (int64_t j = 0; j < ncols; ++j) {
          const int64_t y = y0 + dy[j], xx = x0 + dx[j];
          d[j] = (y >= 0 && y < H && xx >= 0 && xx < W) ? F(to_float(xn[y * xs[2] + xx * xs[3] + coff[j]])) : F(0);
        }
      }
      for (int64_t j = ncols; j < NR; ++j) d[j] = F(0);
      if (++q.x == OW) {
        q.x = 0;
        if (++q.y == OH) {
          q.y = 0;
          ++q.n;
        }
      }
    }
  }
  // A run of an N block's columns that lies back to back in channels_last input: a tap's
  // channels, or (groups 1, dilation 1 along W) the taps of one kernel row.
  struct ColumnRun {
    int64_t col;                // first column, within the block
    int64_t len;                // columns
    int64_t dy, dx0, dx1;       // kernel offsets of its row and of its first and last taps
    int64_t c0;                 // channel of its first column
  };
  static constexpr int64_t kMaxRuns = 64;

  // The block's runs into `runs`; false where it would take more than kMaxRuns.
  FASTCNN_ALWAYS_INLINE bool column_runs(int64_t n0, int64_t ncols, ColumnRun* runs, int64_t& count) const {
    const bool rows_of_taps = xs[3] == Cg && dw == 1;  // tap s + 1's channels follow tap s's
    count = 0;
    for (int64_t col = n0; col < n0 + ncols;) {
      if (count == kMaxRuns) return false;
      const int64_t tap = col / Cg, c = col % Cg, s_first = tap % S;
      const int64_t run_end = rows_of_taps ? (tap - s_first + S) * Cg : (tap + 1) * Cg;
      const int64_t len = std::min(run_end, n0 + ncols) - col;
      const int64_t s_last = (col + len - 1) / Cg % S;
      runs[count++] = {col - n0, len, (tap / S) * dh, s_first * dw, s_last * dw, c};
      col += len;
    }
    return true;
  }

  // All panels of an N block ([kl][NR] each, kl * NR apart). For channels_last input,
  // pixel by pixel: each pixel's columns are a few runs read in order (a kernel row of a
  // small-channel conv is one run), where panel by panel read 64 bytes of each pixel a row
  // of channels apart, or gathered column by column with a bounds check each (LeNet-5's
  // 6->16 5x5 weight gradient at batch 256: 0.38x eager panel by panel).
  FASTCNN_ALWAYS_INLINE void pack_b_block(int64_t g, int64_t n0, int64_t ncols, int64_t k0, int64_t kl,
                                          F* dst) const {
    const int64_t np = gemm::ceil_div(ncols, NR);
    ColumnRun runs[kMaxRuns];
    int64_t nruns = 0;
    if (xs[1] != 1 || np == 1 || !column_runs(n0, ncols, runs, nruns)) {
      for (int64_t jp = 0; jp < np; ++jp)
        pack_b(g, n0 + jp * NR, std::min<int64_t>(NR, ncols - jp * NR), k0, kl, dst + jp * kl * NR);
      return;
    }
    // Column j of pixel t goes to panel j / NR, lane j % NR.
    const auto put = [&](F* row, int64_t j, const T* src, int64_t len) {
      while (len > 0) {
        const int64_t lane = j % NR, take = std::min<int64_t>(len, NR - lane);
        F* d = row + (j / NR) * kl * NR + lane;
        if (src == nullptr) {
          fill_short(d, take);
        } else if constexpr (std::is_same_v<T, F>) {
          copy_short(d, src, take);
        } else {
          for (int64_t u = 0; u < take; ++u) d[u] = F(to_float(src[u]));
        }
        if (src != nullptr) src += take;
        j += take;
        len -= take;
      }
    };
    const T* xg = x + g * Cg;
    Pixel q = pixel(k0);
    for (int64_t t = 0; t < kl; ++t) {
      F* row = dst + t * NR;
      const int64_t y0 = q.y * sh - ph, x0 = q.x * sw - pw;
      const T* xn = xg + q.n * xs[0];
      for (int64_t i = 0; i < nruns; ++i) {
        const ColumnRun& r = runs[i];
        const int64_t y = y0 + r.dy;
        if (y < 0 || y >= H) {
          put(row, r.col, nullptr, r.len);
        } else if (x0 + r.dx0 >= 0 && x0 + r.dx1 < W) {
          put(row, r.col, xn + y * xs[2] + (x0 + r.dx0) * xs[3] + r.c0, r.len);
        } else {  // a kernel row crossing the image's left or right edge: tap by tap
          for (int64_t j = 0, c = r.c0, dx = r.dx0; j < r.len;) {
            const int64_t len = std::min(r.len - j, Cg - c), xx = x0 + dx;
            put(row, r.col + j, xx >= 0 && xx < W ? xn + y * xs[2] + xx * xs[3] + c : nullptr, len);
            j += len;
            c = 0;
            dx += dw;
          }
        }
      }
      put(row, ncols, nullptr, np * NR - ncols);  // the last panel's unused lanes
      if (++q.x == OW) {
        q.x = 0;
        if (++q.y == OH) {
          q.y = 0;
          ++q.n;
        }
      }
    }
  }
  FASTCNN_ALWAYS_INLINE void store(int64_t g, const Row* rows, int64_t nrows, int64_t n0, int64_t ncols,
                                   F* tile) const {
    const int64_t m0 = rows[0].m;
    if (columns_in_order) {  // column col at row offset col: whole rows
      T* o = grad_w + (g * Kg + m0) * ws[0] + n0;
      for (int64_t i = 0; i < nrows; ++i)
        gemm::store_row<T>(tile + i * NR, ncols, o + i * ws[0], 1, nullptr, F(0), nullptr, 0, Act::none);
      return;
    }
    for (int64_t j = 0; j < ncols; ++j) {
      const int64_t col = n0 + j, tap = col / Cg, c = col % Cg;
      T* o = grad_w + (g * Kg + m0) * ws[0] + c * ws[1] + (tap / S) * ws[2] + (tap % S) * ws[3];
      for (int64_t i = 0; i < nrows; ++i) fastcnn::store(o, i * ws[0], tile[i * NR + j]);
    }
  }
};

// The weight gradient of a 1x1, stride-1, unpadded conv with few output channels, roles
// swapped: rows are input channels read in place from channels_last input, columns the
// output channels, whose values for one pixel lie back to back in the gradient (a B panel
// row each, copied whole). In the usual roles the few output channels made a few row
// panels, and each B panel of input channels, packed per tile, served only those.
template <class T>
struct ConvWeightGradByInput {
  using F = acc_t<T>;
  struct Row {
    int64_t m;  // input channel within the group
  };
  static constexpr bool kPrepackB = false;
  static constexpr int NR = gemm::kNR<F>;
  int64_t groups, M, N, K, k_run, k_align;  // M = Cg, N = Kg, K = pixels
  const T* grad;
  const int64_t* gs;
  const T* x;
  const int64_t* xs;
  T* grad_w;
  const int64_t* ws;
  int64_t Cg, Kg, OH, OW;
  bool a_in_place;  // full row panels read in place from x (see a_block)

  FASTCNN_ALWAYS_INLINE void rows(int64_t m0, int64_t count, Row* r) const {
    for (int64_t i = 0; i < count; ++i) r[i].m = m0 + i;
  }
  // Pixel p's offset in a tensor of strides st.
  FASTCNN_ALWAYS_INLINE int64_t offset(const int64_t* st, int64_t p) const {
    const int64_t ox = p % OW;
    p /= OW;
    return (p / OH) * st[0] + (p % OH) * st[2] + ox * st[3];
  }
  // A[i][k] = x[pixel k, g * Cg + m0 + i]: in place where the input's pixels are one stride apart.
  FASTCNN_ALWAYS_INLINE void a_block(int64_t g, const Row* rows, int64_t nrows, int64_t k0, int64_t kl, F* buf,
                                     gemm::APanel<F>* panels) const {
    const T* base = x + (g * Cg + rows[0].m) * xs[1];
    for (int64_t ip = 0; ip * MR < nrows; ++ip) {
      const int64_t count = std::min<int64_t>(MR, nrows - ip * MR);
      const T* src = base + ip * MR * xs[1];
      if constexpr (std::is_same_v<T, F>) {  // a_in_place is false otherwise
        if (a_in_place && count == MR) {
          panels[ip] = {src + offset(xs, k0), xs[1], xs[3]};
          continue;
        }
      }
      F* dst = buf + ip * MR * kl;  // [kl][MR]
      for (int64_t t = 0; t < kl; ++t) {
        const T* s = src + offset(xs, k0 + t);
        for (int64_t i = 0; i < MR; ++i) dst[t * MR + i] = i < count ? F(to_float(s[i * xs[1]])) : F(0);
      }
      panels[ip] = {dst, 1, MR};
    }
  }
  // B[k][j] = grad[pixel k, g * Kg + n0 + j], panels [kl][NR] kl * NR apart.
  FASTCNN_ALWAYS_INLINE void pack_b_block(int64_t g, int64_t n0, int64_t ncols, int64_t k0, int64_t kl,
                                          F* dst) const {
    const int64_t np = gemm::ceil_div(ncols, NR);
    const T* base = grad + (g * Kg + n0) * gs[1];
    for (int64_t t = 0; t < kl; ++t) {
      const T* s = base + offset(gs, k0 + t);
      for (int64_t jp = 0; jp < np; ++jp) {
        F* d = dst + jp * kl * NR + t * NR;
        const int64_t cols = std::min<int64_t>(NR, ncols - jp * NR);
        for (int64_t j = 0; j < cols; ++j) d[j] = F(to_float(s[(jp * NR + j) * gs[1]]));
        for (int64_t j = cols; j < NR; ++j) d[j] = F(0);
      }
    }
  }
  FASTCNN_ALWAYS_INLINE void pack_b(int64_t g, int64_t n0, int64_t ncols, int64_t k0, int64_t kl, F* dst) const {
    pack_b_block(g, n0, ncols, k0, kl, dst);  // one panel
  }
  FASTCNN_ALWAYS_INLINE void store(int64_t g, const Row* rows, int64_t nrows, int64_t n0, int64_t ncols,
                                   F* tile) const {
    T* o = grad_w + (g * Kg + n0) * ws[0] + rows[0].m * ws[1];
    for (int64_t j = 0; j < ncols; ++j)
      for (int64_t i = 0; i < nrows; ++i) fastcnn::store(o + j * ws[0], i * ws[1], tile[i * NR + j]);
  }
};

// Weight gradient for few input channels (the first layer of every classic net, and
// LeNet-5's 6->16): as a GEMM with the taps (r, s, c) as rows, output channels as
// columns and pixels as the sum, grad_w[k][(r, s, c)] = sum_p x_tap(p, r, s, c) * grad[p][k].
// Columns are channels_last grad read in place (16 channels: two vectors), rows are
// taps broadcast from the input (or its zero-padded copy) at fixed offsets from each
// pixel's window, so nothing is packed: the GEMM path packed R*S*C values per pixel,
// as much traffic as its FMAs (VGG's 3->64 3x3 weight grad ran at 0.53x eager).
// Pixels are cut into splits fixed by the pixel count alone; each split sums its
// pixels in order into its own partial, and the partials are added in split order:
// the same bits on every run and thread count.
namespace small_taps {

typedef float f8 __attribute__((vector_size(32), aligned(4)));

constexpr int64_t kChunk = 1024;  // pixels whose grad rows stay in L2 across all tap blocks (256: ~10% slower)
constexpr int64_t kSplitMin = 256;  // pixels per split, at least
constexpr int64_t kMaxSplits = 8;
constexpr int64_t kMinTasks = 4;    // (split, tap group) tasks, at least, where the taps allow

struct Problem {
  const float* grad;
  int64_t gs0, gs2, gs3;  // grad strides of n, h, w (channels: 1)
  const float* x;
  int64_t xs0, xs2, xs3;  // strides of n, h, w of x or its padded copy
  const int64_t* off;     // each tap's offset from its pixel's window origin (padded with 0)
  int64_t taps_padded, M, OH, OW, sh, sw;
  int64_t split_len, P;
  float* partials;        // [split][taps_padded][M]
};

// acc[t][v] += x_tap[p][j0 + t] * grad[p][m0 + 8v .. +8] over pixels [p0, p1).
template <int V>
FASTCNN_ALWAYS_INLINE void taps_block(const Problem& q, float* partial, int64_t p0, int64_t p1, int64_t j0,
                                      int64_t m0) {
  constexpr int TB = 12 / V;  // 12 accumulators
  f8 acc[TB][V];
  int64_t o[TB];
  for (int t = 0; t < TB; ++t) {
    o[t] = q.off[j0 + t];
    for (int v = 0; v < V; ++v) acc[t][v] = *reinterpret_cast<const f8*>(partial + (j0 + t) * q.M + m0 + 8 * v);
  }
  int64_t ow = p0 % q.OW, rest = p0 / q.OW, oh = rest % q.OH, n = rest / q.OH;
  for (int64_t p = p0; p < p1;) {
    const int64_t end = std::min(q.OW, ow + (p1 - p));
    const float* xb = q.x + n * q.xs0 + oh * q.sh * q.xs2 + ow * q.sw * q.xs3;
    const float* gb = q.grad + n * q.gs0 + oh * q.gs2 + ow * q.gs3 + m0;
    const int64_t x_step = q.sw * q.xs3;
    for (int64_t w = ow; w < end; ++w, xb += x_step, gb += q.gs3) {
      f8 a[V];
      for (int v = 0; v < V; ++v) a[v] = *reinterpret_cast<const f8*>(gb + 8 * v);
      for (int t = 0; t < TB; ++t) {
        const float b = xb[o[t]];  // a scalar operand: one broadcast load (f8{} + b added a zero first)
        for (int v = 0; v < V; ++v) acc[t][v] += b * a[v];
      }
    }
    p += end - ow;
    ow = 0;
    if (++oh == q.OH) {
      oh = 0;
      ++n;
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) *reinterpret_cast<f8*>(partial + (j0 + t) * q.M + m0 + 8 * v) = acc[t][v];
}

// One split's tap blocks [b0, b1): chunk by chunk, each tap block and column block.
template <class T>
FASTCNN_ALWAYS_INLINE void split_body(const Problem* qp, int64_t split, int64_t b0, int64_t b1) {
  const Problem& q = *qp;
  float* partial = q.partials + split * q.taps_padded * q.M;
  const int64_t first = split * q.split_len, last = std::min(q.P, first + q.split_len);
  const bool two = q.M % 16 == 0;
  const int64_t tb = two ? 6 : 12;
  for (int64_t c0 = first; c0 < last; c0 += kChunk) {
    const int64_t c1 = std::min(last, c0 + kChunk);
    for (int64_t j0 = b0 * tb; j0 < b1 * tb; j0 += tb)
      for (int64_t m0 = 0; m0 < q.M; m0 += two ? 16 : 8) {
        if (two) taps_block<2>(q, partial, c0, c1, j0, m0);
        else taps_block<1>(q, partial, c0, c1, j0, m0);
      }
  }
}
FASTCNN_ISA_VARIANTS(weight_grad_split, split_body)

}  // namespace small_taps

// Few input channels, one group, channels_last grad with a multiple of 8 channels. (Up
// to 16 input channels only 16->32 3x3 at 28x28 gained; 32 to 64 channels ran at 0.5-0.7x
// of the GEMM path's speed.)
bool weight_grad_small_taps_fits(const ConvGeometry& g, const int64_t* grad_stride) {
  return g.groups == 1 && g.C <= 8 && g.K % 8 == 0 && grad_stride[1] == 1 &&
         g.N * g.OH * g.OW > 0 && g.R * g.S * g.C <= 512;
}

void weight_grad_small_taps(const float* grad, const int64_t* gs, const float* x, const int64_t* xs, float* grad_w,
                            const int64_t* ws, const ConvGeometry& g) {
  const int64_t C = g.C, M = g.K, P = g.N * g.OH * g.OW;
  const int64_t taps = g.R * g.S * C, tb = M % 16 == 0 ? 6 : 12;
  small_taps::Problem q{};
  // The input the windows read: x itself without padding, else a zero-padded
  // channels_last copy covering every window (rows and columns from -pad on).
  std::vector<float> padded;
  int64_t xc = xs[1];
  if (g.unpadded()) {
    q.x = x;
    q.xs0 = xs[0];
    q.xs2 = xs[2];
    q.xs3 = xs[3];
  } else {
    const int64_t Hp = (g.OH - 1) * g.stride_h + (g.R - 1) * g.dil_h + 1;
    const int64_t Wp = (g.OW - 1) * g.stride_w + (g.S - 1) * g.dil_w + 1;
    padded.assign(g.N * Hp * Wp * C, 0.0f);
    parallel_for(g.N * Hp, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / Hp, ih = row % Hp - g.pad_h;
        if (ih < 0 || ih >= g.H) continue;
        float* dst = padded.data() + row * Wp * C;
        for (int64_t iwp = 0; iwp < Wp; ++iwp) {
          const int64_t iw = iwp - g.pad_w;
          if (iw < 0 || iw >= g.W) continue;
          const float* src = x + n * xs[0] + ih * xs[2] + iw * xs[3];
          for (int64_t c = 0; c < C; ++c) dst[iwp * C + c] = src[c * xs[1]];
        }
      }
    });
    q.x = padded.data();
    q.xs0 = Hp * Wp * C;
    q.xs2 = Wp * C;
    q.xs3 = C;
    xc = 1;
  }
  q.taps_padded = gemm::ceil_div(taps, tb) * tb;
  std::vector<int64_t> off(q.taps_padded, 0);
  for (int64_t j = 0; j < taps; ++j) {
    const int64_t r = j / (g.S * C), s = j / C % g.S, c = j % C;
    off[j] = r * g.dil_h * q.xs2 + s * g.dil_w * q.xs3 + c * xc;
  }
  q.grad = grad;
  q.gs0 = gs[0];
  q.gs2 = gs[2];
  q.gs3 = gs[3];
  q.off = off.data();
  q.M = M;
  q.OH = g.OH;
  q.OW = g.OW;
  q.sh = g.stride_h;
  q.sw = g.stride_w;
  q.P = P;
  const int64_t splits = std::clamp<int64_t>(P / small_taps::kSplitMin, 1, small_taps::kMaxSplits);
  q.split_len = gemm::ceil_div(P, splits);
  std::vector<float> partials(splits * q.taps_padded * M, 0.0f);
  q.partials = partials.data();
  // Tasks are (split, group of tap blocks): few pixels make few splits, and the tap
  // blocks then give the threads their work (each block's partial rows are its own).
  const int64_t blocks = q.taps_padded / tb;
  const int64_t groups = std::min(blocks, gemm::ceil_div(small_taps::kMinTasks, splits));
  parallel_for(splits * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t split = t / groups, group = t % groups;
      FASTCNN_ISA_CALL(small_taps::weight_grad_split, float, &q, split, group * blocks / groups,
                       (group + 1) * blocks / groups);
    }
  });
  parallel_for(M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t j = 0; j < taps; ++j) {
        float sum = partials[j * M + m];
        for (int64_t sp = 1; sp < splits; ++sp) sum += partials[(sp * q.taps_padded + j) * M + m];
        const int64_t r = j / (g.S * C), s = j / C % g.S, c = j % C;
        grad_w[m * ws[0] + c * ws[1] + r * ws[2] + s * ws[3]] = sum;
      }
  });
}

// Input grad for few input channels per group (the transposed GEMM's columns would
// leave most of the micro-kernel's NR lanes empty) and 1x1 strided kernels (most
// input pixels meet no tap): first the GEMM cols[(n, oh, ow)][(g, r, s, c)] =
// sum_k grad[n, g * Kg + k, oh, ow] * w[g * Kg + k, c, r, s], then each input pixel
// gathers its taps from cols in a fixed (r, s) order. Done a chunk of images at a
// time so that cols stays cache-sized.
template <class T>
struct ConvInputGradCols {
  using F = acc_t<T>;
  struct Row {
    int64_t m;  // output pixel within the chunk
  };
  static constexpr bool kPrepackB = true;
  static constexpr int NR = gemm::kNR<F>;
  int64_t groups, M, N, K, k_run, k_align;
  const T* grad;  // at the chunk's first image
  const int64_t* gs;
  const T* w;
  const int64_t* ws;
  int64_t Cg, Kg, S, OH, OW;
  F* cols;  // [M][groups * N]

  FASTCNN_ALWAYS_INLINE void rows(int64_t m0, int64_t count, Row* r) const {
    for (int64_t i = 0; i < count; ++i) r[i].m = m0 + i;
  }
  FASTCNN_ALWAYS_INLINE int64_t pixel_offset(int64_t m) const {
    const int64_t ow = m % OW, rest = m / OW;
    return (rest / OH) * gs[0] + (rest % OH) * gs[2] + ow * gs[3];
  }
  // A[m][k] = grad[pixel m, g * Kg + k]
  FASTCNN_ALWAYS_INLINE void a_block(int64_t g, const Row* rows, int64_t nrows, int64_t k0, int64_t kl, F* buf,
                                     APanel<F>* panels) const {
    const T* base = grad + (g * Kg + k0) * gs[1];
    for (int64_t ip = 0; ip * MR < nrows; ++ip) {
      const int64_t count = std::min<int64_t>(MR, nrows - ip * MR);
      const int64_t m = rows[0].m + ip * MR;
      int64_t off[MR];
      for (int64_t i = 0; i < count; ++i) off[i] = pixel_offset(m + i);
      if constexpr (std::is_same_v<T, F>) {
        if (count == MR) {  // evenly spaced pixels: read in place
          const int64_t step = off[1] - off[0];
          bool even = true;
          for (int i = 2; i < MR; ++i) even = even && off[i] - off[i - 1] == step;
          if (even) {
            panels[ip] = {base + off[0], step, gs[1]};
            continue;
          }
        }
      }
      F* dst = buf + ip * MR * kl;  // [MR][kl]
      for (int64_t i = 0; i < MR; ++i) {
        F* d = dst + i * kl;
        if (i < count) {
          const T* sp = base + off[i];
          for (int64_t k = 0; k < kl; ++k) d[k] = F(to_float(sp[k * gs[1]]));
        } else {
          for (int64_t k = 0; k < kl; ++k) d[k] = F(0);
        }
      }
      panels[ip] = {dst, kl, 1};
    }
  }
  // B[k][(r, s, c)] = w[g * Kg + k, c, r, s]
  FASTCNN_ALWAYS_INLINE void pack_b(int64_t g, int64_t n0, int64_t ncols, int64_t k0, int64_t kl, F* dst) const {
    for (int64_t t = 0; t < kl; ++t) {
      const T* wk = w + (g * Kg + k0 + t) * ws[0];
      F* d = dst + t * NR;
      for (int64_t j = 0; j < ncols; ++j) {
        const int64_t col = n0 + j, tap = col / Cg, c = col % Cg;
        d[j] = F(to_float(wk[c * ws[1] + (tap / S) * ws[2] + (tap % S) * ws[3]]));
      }
      for (int64_t j = ncols; j < NR; ++j) d[j] = F(0);
    }
  }
  FASTCNN_ALWAYS_INLINE void store(int64_t g, const Row* rows, int64_t nrows, int64_t n0, int64_t ncols,
                                   F* tile) const {
    const int64_t ld = groups * N;
    for (int64_t i = 0; i < nrows; ++i) {
      F* o = cols + rows[i].m * ld + g * N + n0;
      for (int64_t j = 0; j < ncols; ++j) o[j] = tile[i * NR + j];
    }
  }
};

// The taps one input coordinate meets along one axis, as offsets into cols:
// taps of coordinate i are offsets[start[i] .. start[i + 1]), in kernel order.
struct AxisTaps {
  std::vector<int64_t> start, offsets;
  AxisTaps(int64_t size, int64_t taps, int64_t out_size, int64_t stride, int64_t pad, int64_t dil,
           int64_t out_step, int64_t tap_step) {
    start.push_back(0);
    for (int64_t i = 0; i < size; ++i) {
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t q = i + pad - t * dil;
        if (q >= 0 && q % stride == 0 && q / stride < out_size) offsets.push_back(q / stride * out_step + t * tap_step);
      }
      start.push_back(int64_t(offsets.size()));
    }
  }
};

template <class T>
struct ColsGather {
  const acc_t<T>* cols;  // of the chunk
  T* grad_x;             // at the chunk's first image
  const int64_t* gs;
  const ConvGeometry* g;
  const AxisTaps* ys;  // offsets of (oh, r)
  const AxisTaps* xs;  // offsets of (ow, s)
};

// grad_x rows (n, ih) of the chunk: each pixel sums its taps' columns in (r, s) order.
template <class T>
FASTCNN_ALWAYS_INLINE void cols_gather_body(const ColsGather<T>* d, int64_t begin, int64_t end) {
  using F = acc_t<T>;
  const ConvGeometry& g = *d->g;
  const int64_t Cg = g.c_per_group(), RSC = g.R * g.S * Cg, ld = g.groups * RSC;
  const int64_t* ys = d->ys->offsets.data();
  const int64_t* xs = d->xs->offsets.data();
  std::vector<F> acc(size_t(g.C));
  F* a = acc.data();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.H, ih = row % g.H;
    const F* image = d->cols + n * g.OH * g.OW * ld;
    const int64_t y0 = d->ys->start[size_t(ih)], y1 = d->ys->start[size_t(ih) + 1];
    for (int64_t iw = 0; iw < g.W; ++iw) {
      const int64_t x0 = d->xs->start[size_t(iw)], x1 = d->xs->start[size_t(iw) + 1];
      for (int64_t c = 0; c < g.C; ++c) a[c] = F(0);
      for (int64_t yi = y0; yi < y1; ++yi) {
        for (int64_t xi = x0; xi < x1; ++xi) {
          const F* src = image + ys[yi] + xs[xi];
          if (g.groups == 1) {
            for (int64_t c = 0; c < Cg; ++c) a[c] += src[c];
          } else {
            for (int64_t gi = 0; gi < g.groups; ++gi)
              for (int64_t c = 0; c < Cg; ++c) a[gi * Cg + c] += src[gi * RSC + c];
          }
        }
      }
      T* o = d->grad_x + n * d->gs[0] + ih * d->gs[2] + iw * d->gs[3];
      for (int64_t c = 0; c < g.C; ++c) store(o, c * d->gs[1], a[c]);
    }
  }
}
FASTCNN_ISA_VARIANTS(cols_gather, cols_gather_body)

// Images per chunk: cols of about this many bytes (shape only, not thread count).
constexpr int64_t kColsChunkBytes = int64_t(4) << 20;

template <class T>
void input_grad_by_cols(const T* grad, const int64_t* gs, const T* w, const int64_t* ws, T* grad_x,
                        const int64_t* gxs, const ConvGeometry& g) {
  using F = acc_t<T>;
  const int64_t Cg = g.c_per_group(), Kg = g.k_per_group(), RSC = g.R * g.S * Cg;
  const int64_t image_bytes = g.OH * g.OW * g.groups * RSC * int64_t(sizeof(F));
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(g.N, kColsChunkBytes / std::max<int64_t>(image_bytes, 1)));
  gemm::Scratch<F> cols(chunk * g.OH * g.OW * g.groups * RSC);
  const int64_t ld = g.groups * RSC;
  const AxisTaps ys(g.H, g.R, g.OH, g.stride_h, g.pad_h, g.dil_h, g.OW * ld, g.S * Cg);
  const AxisTaps xs(g.W, g.S, g.OW, g.stride_w, g.pad_w, g.dil_w, ld, Cg);
  for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
    const int64_t images = std::min(chunk, g.N - n0);
    ConvInputGradCols<T> p{};
    p.groups = g.groups;
    p.M = images * g.OH * g.OW;
    p.N = RSC;
    p.K = Kg;
    p.k_run = Kg;
    p.k_align = 1;
    p.grad = grad + n0 * gs[0];
    p.gs = gs;
    p.w = w;
    p.ws = ws;
    p.Cg = Cg;
    p.Kg = Kg;
    p.S = g.S;
    p.OH = g.OH;
    p.OW = g.OW;
    p.cols = cols.get();
    gemm::run<T>(p);
    const ColsGather<T> d{cols.get(), grad_x + n0 * gxs[0], gxs, &g, &ys, &xs};
    parallel_for(images * g.H, 1, [&](int64_t begin, int64_t end) {
      FASTCNN_ISA_CALL(cols_gather, T, &d, begin, end);
    });
  }
}

// Direct forward for NCHW output (input dense along W) with one input channel and
// at most kByChannelMaxK output channels per group (LeNet-5's 1->6 5x5): a GEMM
// would make K = R*S tiny and either fill 16-wide vectors with 6 channels and store
// each value a plane apart (pixel-major) or spend its time packing (pixel columns).
// Here each task is an output row; NR pixels of it (two vectors) are read straight
// from the input rows, one pair of loads per tap, and MR output channels accumulate
// in registers (each tap's weight broadcast). The epilogue stores whole runs of a
// channel's row. LeNet-5's 1->6 5x5 on the 2-core CPU, batch 8: relu 110 -> 43 us,
// tanh 205 -> 73 us (eager 99 and 146 us); batch 256: 2.0 -> 0.76 ms (eager 1.5).
// With more input channels (its 6->16 5x5) the pixel-major GEMM on channels_last
// input is faster.
constexpr int64_t kByChannelMaxK = 16;

// The operands of a direct (non-GEMM) forward kernel: by channel and depthwise.
template <class T>
struct DirectForward {
  const T* x;
  const int64_t* xs;
  const acc_t<T>* taps;  // the weight as acc_t, in the kernel's own layout
  const T* bias;
  const T* residual;
  const int64_t* rs;
  T* out;
  const int64_t* os;
  const ConvGeometry* g;
  Act act;
};

template <class T>
FASTCNN_ALWAYS_INLINE void by_channel_rows_body(const DirectForward<T>* d, int64_t begin, int64_t end) {
  using F = acc_t<T>;
  using V = typename gemm::Vec<F>::type;
  constexpr int L = gemm::kLanes<F>, NR = gemm::kNR<F>;
  const ConvGeometry& g = *d->g;
  const int64_t* xs = d->xs;
  const int64_t Kg = g.k_per_group(), RS = g.R * g.S;
  alignas(32) F pix[NR];
  alignas(32) F row_out[MR][NR];
  for (int64_t task = begin; task < end; ++task) {  // task = (n, group, oh)
    const int64_t oh = task % g.OH, ng = task / g.OH, grp = ng % g.groups, n = ng / g.groups;
    const T* plane = d->x + n * xs[0] + grp * xs[1];
    for (int64_t ow0 = 0; ow0 < g.OW; ow0 += NR) {
      const int64_t cnt = std::min<int64_t>(NR, g.OW - ow0);
      // A row's last, partial block is computed as the row's last NR pixels (some
      // again) so that its loads stay whole vectors; only its new pixels are stored.
      const int64_t start = (cnt < NR && g.OW >= NR) ? g.OW - NR : ow0, skip = ow0 - start;
      const int64_t valid = std::min<int64_t>(NR, g.OW - start);
      for (int64_t m0 = 0; m0 < Kg; m0 += MR) {
        const int64_t k0 = grp * Kg + m0, rows = std::min<int64_t>(MR, Kg - m0);
        const F* w = d->taps + k0 * RS;
        V acc[MR][2] = {};
        const auto fma_tap = [&](const F* wt, const V& v0, const V& v1) {
          for (int i = 0; i < MR; ++i) {
            const F wi = wt[i * RS];
            acc[i][0] += wi * v0;
            acc[i][1] += wi * v1;
          }
        };
        const int64_t x_first = start * g.stride_w - g.pad_w;
        // Every tap of the block inside the row, unit stride, no conversion: plain loads.
        const bool inside = std::is_same_v<T, F> && g.stride_w == 1 && xs[3] == 1 && x_first >= 0 &&
                            x_first + (g.S - 1) * g.dil_w + NR <= g.W;
        for (int64_t r = 0; r < g.R; ++r) {
          const int64_t ih = oh * g.stride_h - g.pad_h + r * g.dil_h;
          if (ih < 0 || ih >= g.H) continue;
          const T* row = plane + ih * xs[2];
          const F* wr = w + r * g.S;
          if (inside) {
            const T* p = row + x_first;
            for (int64_t s = 0; s < g.S; ++s) {
              V v0, v1;
              gemm::vload(v0, p + s * g.dil_w);
              gemm::vload(v1, p + s * g.dil_w + L);
              fma_tap(wr + s, v0, v1);
            }
            continue;
          }
          for (int64_t s = 0; s < g.S; ++s) {  // the row's ends, strides, 16-bit input: gathered with bounds
            const int64_t x0 = x_first + s * g.dil_w;
            for (int64_t j = 0; j < NR; ++j) {
              const int64_t iw = x0 + j * g.stride_w;
              pix[j] = (j < valid && iw >= 0 && iw < g.W) ? F(to_float(row[iw * xs[3]])) : F(0);
            }
            V v0, v1;
            gemm::vload(v0, pix);
            gemm::vload(v1, pix + L);
            fma_tap(wr + s, v0, v1);
          }
        }
        std::memcpy(row_out, acc, sizeof row_out);
        Act act = d->act;
        // tanh/sigmoid on whole vectors (partial runs stall store forwarding): the bias
        // goes into the rows first; otherwise store_row adds it
        const bool whole_rows = d->residual == nullptr && (act == Act::tanh || act == Act::sigmoid);
        F row_bias[MR] = {};
        for (int64_t i = 0; i < rows && d->bias != nullptr; ++i) {
          row_bias[i] = F(to_float(d->bias[k0 + i]));
          if (whole_rows) {
            for (int j = 0; j < NR; ++j) row_out[i][j] += row_bias[i];
            row_bias[i] = F(0);
          }
        }
        if (whole_rows && gemm::activate_tile<T>(&row_out[0][0], rows, NR, nullptr, act)) act = Act::none;
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t k = k0 + i;
          T* o = d->out + n * d->os[0] + k * d->os[1] + oh * d->os[2] + ow0 * d->os[3];
          const T* res = d->residual == nullptr
                             ? nullptr
                             : d->residual + n * d->rs[0] + k * d->rs[1] + oh * d->rs[2] + ow0 * d->rs[3];
          gemm::store_row<T>(row_out[i] + skip, cnt, o, d->os[3], nullptr, row_bias[i], res, d->rs[3], act);
        }
      }
    }
  }
}
FASTCNN_ISA_VARIANTS(by_channel_rows, by_channel_rows_body)

template <class T>
void forward_by_channel(const T* x, const int64_t* xs, const T* w, const int64_t* ws, const T* bias,
                        const T* residual, const int64_t* rs, T* out, const int64_t* os, const ConvGeometry& g,
                        Act act) {
  using F = acc_t<T>;
  const int64_t RS = g.R * g.S;
  // [rows][R * S]: the last group's last block of MR rows reads up to row
  // K - Kg + round_up(Kg, MR) - 1; rows past K are zeros (their sums are never stored).
  const int64_t Kg = g.k_per_group();
  std::vector<F> taps(size_t((g.K - Kg + gemm::round_up(Kg, MR)) * RS), F(0));
  for (int64_t k = 0; k < g.K; ++k)
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t s = 0; s < g.S; ++s)
        taps[size_t(k * RS + r * g.S + s)] = F(to_float(w[k * ws[0] + r * ws[2] + s * ws[3]]));
  const DirectForward<T> d{x, xs, taps.data(), bias, residual, rs, out, os, &g, act};
  parallel_for(g.N * g.groups * g.OH, 1, [&](int64_t begin, int64_t end) {
    FASTCNN_ISA_CALL(by_channel_rows, T, &d, begin, end);
  });
}

// Depthwise forward (groups = C = K): one channel per GEMM would pad N = 1 to a whole
// micro-tile, so a direct loop instead, vectorised over channels (contiguous in
// channels_last), NR channels at a time through the shared epilogue.
template <class T>
FASTCNN_ALWAYS_INLINE void depthwise_rows_body(const DirectForward<T>* d, int64_t begin, int64_t end) {
  using F = acc_t<T>;
  constexpr int NR = gemm::kNR<F>;
  const ConvGeometry& g = *d->g;
  const int64_t* xs = d->xs;
  F acc[NR];
  for (int64_t row = begin; row < end; ++row) {  // row = (n, oh)
    const int64_t n = row / g.OH, oh = row % g.OH;
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      for (int64_t c0 = 0; c0 < g.C; c0 += NR) {
        const int64_t cnt = std::min<int64_t>(NR, g.C - c0);
        for (int64_t j = 0; j < NR; ++j) acc[j] = F(0);
        for (int64_t r = 0; r < g.R; ++r) {
          const int64_t ih = oh * g.stride_h - g.pad_h + r * g.dil_h;
          if (ih < 0 || ih >= g.H) continue;
          for (int64_t s = 0; s < g.S; ++s) {
            const int64_t iw = ow * g.stride_w - g.pad_w + s * g.dil_w;
            if (iw < 0 || iw >= g.W) continue;
            const T* xp = d->x + n * xs[0] + c0 * xs[1] + ih * xs[2] + iw * xs[3];
            const F* tp = d->taps + (r * g.S + s) * g.C + c0;
            if (xs[1] == 1) {
              for (int64_t j = 0; j < cnt; ++j) acc[j] += F(to_float(xp[j])) * tp[j];
            } else {
              for (int64_t j = 0; j < cnt; ++j) acc[j] += F(to_float(xp[j * xs[1]])) * tp[j];
            }
          }
        }
        const int64_t* os = d->os;
        const int64_t* rs = d->rs;
        T* o = d->out + n * os[0] + c0 * os[1] + oh * os[2] + ow * os[3];
        const T* res = d->residual == nullptr ? nullptr : d->residual + n * rs[0] + c0 * rs[1] + oh * rs[2] + ow * rs[3];
        gemm::store_row<T>(acc, cnt, o, os[1], d->bias == nullptr ? nullptr : d->bias + c0, F(0), res, rs[1], d->act);
      }
    }
  }
}
FASTCNN_ISA_VARIANTS(depthwise_rows, depthwise_rows_body)

template <class T>
void depthwise_forward(const T* x, const int64_t* xs, const T* w, const int64_t* ws, const T* bias, const T* residual,
                       const int64_t* rs, T* out, const int64_t* os, const ConvGeometry& g, Act act) {
  using F = acc_t<T>;
  std::vector<F> taps(size_t(g.R * g.S * g.C));  // [R * S][C]
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t s = 0; s < g.S; ++s)
        taps[size_t((r * g.S + s) * g.C + c)] = F(to_float(w[c * ws[0] + r * ws[2] + s * ws[3]]));
  const DirectForward<T> d{x, xs, taps.data(), bias, residual, rs, out, os, &g, act};
  parallel_for(g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    FASTCNN_ISA_CALL(depthwise_rows, T, &d, begin, end);
  });
}

}  // namespace

namespace {

bool depthwise(const ConvGeometry& g) { return g.c_per_group() == 1 && g.k_per_group() == 1 && g.groups > 1; }

}  // namespace

bool conv2d_forward_by_channel(const ConvGeometry& g, const int64_t* x_stride, const int64_t* out_stride) {
  return !depthwise(g) && g.c_per_group() == 1 && g.k_per_group() <= kByChannelMaxK && g.OW > 1 && out_stride[3] == 1 &&
         (g.W == 1 || x_stride[3] == 1);
}

namespace {

// The forward GEMM's weight side (all that pack_b reads), for packing alone.
template <class T>
ConvForward<T> forward_weights(const T* w, const int64_t* w_stride, const ConvGeometry& g) {
  ConvForward<T> p{};
  p.groups = g.groups;
  p.N = g.k_per_group();
  p.K = g.R * g.S * g.c_per_group();
  p.w = w;
  p.ws = w_stride;
  p.Cg = g.c_per_group();
  p.Kg = g.k_per_group();
  p.S = g.S;
  return p;
}

// The forward conv as one GEMM (the weight packed here unless packed_w is given).
template <class T>
void forward_gemm(const T* x, const int64_t* x_stride, const T* w, const int64_t* w_stride, const T* bias,
                  const T* residual, const int64_t* residual_stride, T* out, const int64_t* out_stride,
                  const ConvGeometry& g, Act act, const acc_t<T>* packed_w) {
  ConvForward<T> p = forward_weights(w, w_stride, g);
  p.M = g.N * g.OH * g.OW;
  p.a = {x, x_stride[0], x_stride[1], x_stride[2], x_stride[3], g.H, g.W, g.OH, g.OW,
         p.Cg, g.R, g.S, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w, g.N};
  set_k_blocking<T>(p, p.Cg, p.a.row_contiguous() ? g.S * p.Cg : 0);
  p.bias = bias;
  p.residual = residual;
  p.rs = residual_stride;
  p.out = out;
  p.os = out_stride;
  p.act = act;
  gemm::run<T>(p, packed_w);
}

// The input gradient of a stride-1, one-group conv is itself a stride-1 conv of the
// output gradient: weight transposed (in <-> out channels) and flipped, padding
// dil * (kernel - 1) - pad. As a forward, its K blocks are whole kernel rows read in place;
// as ConvInputGrad with fewer than kTapRunChannels output channels, blocks straddle taps and
// every panel is packed (GoogLeNet's 16->32 3x3 at 28x28, batch 8, on the 2-core CPU: 0.60
// -> 0.39 ms, eager 0.33). From kTapRunChannels on, ConvInputGrad's blocks of one tap read
// in place too, and the two run within a few % of each other.
bool input_grad_as_forward(const ConvGeometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.groups == 1 && g.pad_h <= g.dil_h * (g.R - 1) &&
         g.pad_w <= g.dil_w * (g.S - 1);
}

template <class T>
void input_grad_by_forward(const T* grad, const int64_t* grad_stride, const T* w, const int64_t* w_stride, T* grad_x,
                           const int64_t* grad_x_stride, const ConvGeometry& g) {
  ConvGeometry f = g;
  f.C = g.K;
  f.H = g.OH;
  f.W = g.OW;
  f.K = g.C;
  f.OH = g.H;
  f.OW = g.W;
  f.pad_h = g.dil_h * (g.R - 1) - g.pad_h;
  f.pad_w = g.dil_w * (g.S - 1) - g.pad_w;
  // The weight as a view: element [c][k][r][s] of the flipped, transposed weight is
  // w[k][c][R - 1 - r][S - 1 - s].
  const int64_t fs[4] = {w_stride[1], w_stride[0], -w_stride[2], -w_stride[3]};
  const T* flipped = w + (g.R - 1) * w_stride[2] + (g.S - 1) * w_stride[3];
  forward_gemm<T>(grad, grad_stride, flipped, fs, nullptr, nullptr, nullptr, grad_x, grad_x_stride, f, Act::none,
                  nullptr);
}

}  // namespace

void conv2d_forward(const void* x, const int64_t* x_stride, const void* w, const int64_t* w_stride,
                    const void* bias, const void* residual, const int64_t* residual_stride, void* out,
                    const int64_t* out_stride, const ConvGeometry& g, int dtype, int act, const void* packed_w) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (conv2d_forward_by_channel(g, x_stride, out_stride)) {
      forward_by_channel(static_cast<const T*>(x), x_stride, static_cast<const T*>(w), w_stride,
                         static_cast<const T*>(bias), static_cast<const T*>(residual), residual_stride,
                         static_cast<T*>(out), out_stride, g, Act(act));
      return;
    }
    if (depthwise(g)) {
      depthwise_forward(static_cast<const T*>(x), x_stride, static_cast<const T*>(w), w_stride,
                        static_cast<const T*>(bias), static_cast<const T*>(residual), residual_stride,
                        static_cast<T*>(out), out_stride, g, Act(act));
      return;
    }
    forward_gemm(static_cast<const T*>(x), x_stride, static_cast<const T*>(w), w_stride, static_cast<const T*>(bias),
                 static_cast<const T*>(residual), residual_stride, static_cast<T*>(out), out_stride, g, Act(act),
                 static_cast<const acc_t<T>*>(packed_w));
  });
}

int64_t conv2d_packed_weight_bytes(const ConvGeometry& g, int dtype) {
  int64_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (!depthwise(g))
      bytes = gemm::packed_b_elements<T>(g.groups, g.k_per_group(), g.R * g.S * g.c_per_group()) *
              int64_t(sizeof(acc_t<T>));
  });
  return bytes;
}

void conv2d_pack_weight(const void* w, const int64_t* w_stride, const ConvGeometry& g, int dtype, void* packed_w) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (depthwise(g)) return;
    gemm::pack_b_into<T>(forward_weights(static_cast<const T*>(w), w_stride, g), static_cast<acc_t<T>*>(packed_w));
  });
}

void conv2d_input_grad(const void* grad, const int64_t* grad_stride, const void* w, const int64_t* w_stride,
                       void* grad_x, const int64_t* grad_x_stride, const ConvGeometry& g, int dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t Cg = g.c_per_group(), Kg = g.k_per_group(), K = g.R * g.S * Kg;
    if (Cg < gemm::kNR<acc_t<T>> || (g.R == 1 && g.S == 1 && (g.stride_h > 1 || g.stride_w > 1))) {
      input_grad_by_cols(static_cast<const T*>(grad), grad_stride, static_cast<const T*>(w), w_stride,
                         static_cast<T*>(grad_x), grad_x_stride, g);
      return;
    }
    if (Kg < kTapRunChannels && (g.R > 1 || g.S > 1) && input_grad_as_forward(g)) {
      input_grad_by_forward(static_cast<const T*>(grad), grad_stride, static_cast<const T*>(w), w_stride,
                            static_cast<T*>(grad_x), grad_x_stride, g);
      return;
    }
    ConvInputGrad<T> p{};
    p.groups = g.groups;
    p.M = g.N * g.H * g.W;
    p.N = Cg;
    p.K = K;
    set_k_blocking<T>(p, Kg, 0);
    p.a = {static_cast<const T*>(grad), grad_stride[0], grad_stride[1], grad_stride[2], grad_stride[3], g.OH, g.OW,
           g.H, g.W, Kg, g.R, g.S, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w, g.N};
    p.w = static_cast<const T*>(w);
    p.ws = w_stride;
    p.Cg = Cg;
    p.Kg = Kg;
    p.S = g.S;
    p.grad_x = static_cast<T*>(grad_x);
    p.gs = grad_x_stride;
    p.uneven_rows = g.stride_h > 1 || g.stride_w > 1;
    gemm::run<T>(p);
  });
}

// Rows begin..end of a weight gradient from [rows][R][S][Cg] (src, `row` apart) into the
// strides ws. Contiguous float rows go 8 taps x 8 channels at a time (a scalar
// element-by-element reorder took a third of GoogLeNet's 48->128 3x3 at 7x7 weight grad).
template <class T>
FASTCNN_ALWAYS_INLINE void weight_rows_body(const T* src, int64_t row, T* out, const int64_t* ws, int64_t R,
                                            int64_t S, int64_t Cg, int64_t begin, int64_t end) {
  const int64_t taps = R * S;
  const bool contiguous = ws[3] == 1 && ws[2] == S && ws[1] == taps;
  for (int64_t m = begin; m < end; ++m) {
    const T* s = src + m * row;
    T* d = out + m * ws[0];
    if (contiguous) {  // d[c][tap] = s[tap][c]
      int64_t tap8 = 0, c8 = 0;
      if constexpr (std::is_same_v<T, float>) {
        tap8 = taps / 8 * 8;
        c8 = Cg / 8 * 8;
        for (int64_t t = 0; t < tap8; t += 8)
          for (int64_t c = 0; c < c8; c += 8) gemm::transpose8x8(s + t * Cg + c, Cg, d + c * taps + t, taps);
      }
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t t = c < c8 ? tap8 : 0; t < taps; ++t) d[c * taps + t] = s[t * Cg + c];
      continue;
    }
    for (int64_t c = 0; c < Cg; ++c)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t x = 0; x < S; ++x) d[c * ws[1] + r * ws[2] + x * ws[3]] = s[(r * S + x) * Cg + c];
  }
}
FASTCNN_ISA_VARIANTS(weight_rows_from_column_order, weight_rows_body)

// Pixel splits of a weight gradient (1 = none). With one block of rows (output channels),
// threads split the columns, so each streams all of the output gradient and reads a part
// of every pixel's input channels (ResNet-50's 64->64 1x1 at 56x56 weight grad at batch 8:
// 0.35-0.76x eager between runs, 0.82x split; 256->64 0.57-0.69x -> 0.93-0.97x; 64->128
// 0.72-0.87x -> 1.13-1.18x). Split, each task reads whole pixels. Where columns make two or
// more blocks the split only paid from 16384 pixels (3x3 64->64 at 56x56 batch 8: 0.80x ->
// 0.91-0.94x; 512->128 1x1 at 28x28 lost 5%). Fixed by the shape, as the summation order
// must be; float and double only, as partial sums rounded to a half type would lose bits.
template <class T>
int64_t weight_grad_pixel_splits(int64_t P, int64_t rows_per_group, int64_t cols) {
  if (!std::is_same_v<T, acc_t<T>> || rows_per_group > gemm::kMcTarget || P < 2048) return 1;
  if (cols > gemm::kNcTarget && P < 16384) return 1;
  return std::clamp<int64_t>(P / 4096, 2, 8);
}

// rows begin..end of dst (row apart) = the sum of `splits` partial [rows][n] blocks, in order.
template <class T>
FASTCNN_ALWAYS_INLINE void sum_splits_body(const T* partial, int64_t splits, int64_t split_elems, int64_t n, T* dst,
                                           int64_t row, int64_t begin, int64_t end) {
  for (int64_t m = begin; m < end; ++m) {
    T* d = dst + m * row;
    const T* s0 = partial + m * n;
    for (int64_t j = 0; j < n; ++j) d[j] = s0[j];
    for (int64_t s = 1; s < splits; ++s) {
      const T* ps = s0 + s * split_elems;
      for (int64_t j = 0; j < n; ++j) d[j] += ps[j];
    }
  }
}
FASTCNN_ISA_VARIANTS(sum_pixel_splits, sum_splits_body)

void conv2d_weight_grad(const void* grad, const int64_t* grad_stride, const void* x, const int64_t* x_stride,
                        void* grad_w, const int64_t* grad_w_stride, const ConvGeometry& g, int dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      if (weight_grad_small_taps_fits(g, grad_stride)) {
        weight_grad_small_taps(static_cast<const float*>(grad), grad_stride, static_cast<const float*>(x), x_stride,
                               static_cast<float*>(grad_w), grad_w_stride, g);
        return;
      }
    }
    const int64_t Cg = g.c_per_group(), Kg = g.k_per_group(), P = g.N * g.OH * g.OW;
    // Whether a panel of rows (channels one element apart) is read in place, pixel by pixel.
    // Not unless pixels are evenly spaced and values need no conversion, nor where pixels
    // lie 4 KB or more apart (1024 float channels): the panel's rows then all fall in one
    // L1 set, and packing is faster (ResNet-50's 256->1024 1x1 at 14x14 weight grad at
    // batch 8 0.60x -> 0.83-0.87x eager; from 2 KB on it cost 128->512's ~8%).
    const auto rows_in_place = [](bool pixels_even, int64_t pixel_stride) {
      return std::is_same_v<T, acc_t<T>> && pixels_even && pixel_stride * int64_t(sizeof(T)) < 4096;
    };
    // The operands and sizes both weight-gradient problems share (K: all pixels).
    const auto bind_operands = [&](auto& q) {
      q.groups = g.groups;
      q.K = q.k_run = P;
      q.k_align = 1;
      q.grad = static_cast<const T*>(grad);
      q.gs = grad_stride;
      q.x = static_cast<const T*>(x);
      q.xs = x_stride;
      q.grad_w = static_cast<T*>(grad_w);
      q.ws = grad_w_stride;
      q.Cg = Cg;
      q.Kg = Kg;
      q.OH = g.OH;
      q.OW = g.OW;
    };
    // 1x1 with 16 or 32 output channels per group (GoogLeNet's reductions), channels_last:
    // roles swapped (ConvWeightGradByInput). At batch 8, 192->32 at 28x28 0.72x -> 0.96x
    // eager, 256->32 0.77x -> 0.90x, 480->16 at 14x14 0.87x -> 1.15x; 24 channels lost
    // (1.13x -> 0.93x: a half-empty second panel), so whole panels only.
    constexpr int64_t kPanel = gemm::kNR<acc_t<T>>;
    if (g.R == 1 && g.S == 1 && g.stride_h == 1 && g.stride_w == 1 && g.unpadded() &&
        Kg % kPanel == 0 && Kg <= 2 * kPanel && Cg >= 2 * Kg && grad_stride[1] == 1 && x_stride[1] == 1) {
      ConvWeightGradByInput<T> q{};
      bind_operands(q);
      q.M = Cg;
      q.N = Kg;
      q.a_in_place = rows_in_place(x_stride[2] == g.OW * x_stride[3] && x_stride[0] == g.OH * x_stride[2], x_stride[3]);
      gemm::run<T>(q);
      return;
    }
    ConvWeightGrad<T> p{};
    bind_operands(p);
    p.M = Kg;
    p.N = g.R * g.S * Cg;
    p.R = g.R;
    p.S = g.S;
    p.H = g.H;
    p.W = g.W;
    p.sh = g.stride_h;
    p.sw = g.stride_w;
    p.ph = g.pad_h;
    p.pw = g.pad_w;
    p.dh = g.dil_h;
    p.dw = g.dil_w;
    p.pixels_even = grad_stride[2] == g.OW * grad_stride[3] && grad_stride[0] == g.OH * grad_stride[2];
    p.a_in_place = rows_in_place(p.pixels_even, grad_stride[3]);
    const int64_t taps = g.R * g.S, rows = g.groups * Kg;
    const int64_t* ws = grad_w_stride;
    p.columns_in_order = ws[1] == 1 && (taps == 1 || (ws[3] == Cg && ws[2] == g.S * Cg));
    // Any layout but the columns' order (the contiguous one autograd hands out) is built in
    // that order in a scratch, then reordered row by row. Stored tile by tile, a row's
    // columns went a tap's worth of elements apart, and two threads' N blocks wrote the
    // same lines (GoogLeNet's 48->128 3x3 at 7x7 weight grad at batch 1: 0.22x eager).
    const bool reorder = !p.columns_in_order && taps > 1;
    const int64_t splits = (p.columns_in_order || reorder) ? weight_grad_pixel_splits<T>(P, Kg, p.N) : 1;
    if (splits == 1 && !reorder) {
      gemm::run<T>(p);
      return;
    }
    gemm::Scratch<T> rows_in_order(reorder ? rows * p.N : 0);
    const int64_t in_order[4] = {p.N, 1, g.S * Cg, Cg};
    T* const dst = reorder ? rows_in_order.get() : static_cast<T*>(grad_w);
    const int64_t dst_row = reorder ? p.N : ws[0];
    if (splits == 1) {
      p.grad_w = dst;
      p.ws = in_order;
      p.columns_in_order = true;
      gemm::run<T>(p);
    } else if constexpr (std::is_same_v<T, acc_t<T>>) {
      // Each split sums its pixels into its own rows; the rows are then added in split
      // order: same bits on any thread count.
      gemm::Scratch<T> partial(splits * rows * p.N);
      std::vector<ConvWeightGrad<T>> parts(size_t(splits), p);
      for (int64_t s = 0; s < splits; ++s) {
        ConvWeightGrad<T>& q = parts[size_t(s)];
        q.p_begin = P * s / splits;
        q.K = q.k_run = P * (s + 1) / splits - q.p_begin;
        q.grad_w = partial.get() + s * rows * p.N;
        q.ws = in_order;
        q.columns_in_order = true;
      }
      gemm::run_each<T>(parts.data(), splits);
      const T* sums = partial.get();
      parallel_for(rows, 1, [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(sum_pixel_splits, T, sums, splits, rows * p.N, p.N, dst, dst_row, begin, end);
      });
    }
    if (reorder) {
      T* out = static_cast<T*>(grad_w);
      parallel_for(rows, 1, [&](int64_t begin, int64_t end) {
        FASTCNN_ISA_CALL(weight_rows_from_column_order, T, dst, p.N, out, ws, g.R, g.S, Cg, begin, end);
      });
    }
  });
}

}  // namespace fastcnn::cpu
