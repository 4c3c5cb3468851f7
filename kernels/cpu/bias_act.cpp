// Per-channel bias followed by an activation, and its backward, over dense
// tensors viewed as [outer, channels, inner] flat arrays.
#include "bias_act.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fastcnn/cpu_parallel.h"
#include "fastcnn/dispatch.h"

namespace fastcnn::cpu {
namespace {

constexpr int64_t kGrain = 32768;

// tanh and sigmoid for float as plain arithmetic so that the loops vectorise
// (std::tanh and std::exp do not), within a few ulp of std's (Cephes polynomials).
// Selects are integer blends: with -ftrapping-math (the default) GCC sinks the
// arms of a float ?: into branches and then refuses to vectorise the loop.
// float64 keeps std's functions.
FASTCNN_ALWAYS_INLINE uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
FASTCNN_ALWAYS_INLINE float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
FASTCNN_ALWAYS_INLINE float select(bool c, float a, float b) {
  const uint32_t m = 0u - uint32_t(c);
  return float_of((bits_of(a) & m) | (bits_of(b) & ~m));
}

// exp(-a) for a >= 0 given with its sign bit clear; a > 87 (NaN too) gives exp(-87).
FASTCNN_ALWAYS_INLINE float exp_neg(float a) {
  float x = -float_of(std::min(bits_of(a), 0x42ae0000u));  // 87.0f; keeps 2^n normal
  // Adding 1.5 * 2^23 rounds x / ln 2 to the integer n and leaves n in the low
  // mantissa bits (a float-to-int conversion would not vectorise on SSE2).
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts
  const float p = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x +
                    4.1665795894e-2f) * x + 1.6666665459e-1f) * x + 5.0000001201e-1f;
  const float y = p * (x * x) + x + 1.0f;
  return y * float_of((bits_of(shifted) - 0x4b400000u + 127u) << 23);  // times 2^n
}

FASTCNN_ALWAYS_INLINE float tanh_float(float v) {
  const uint32_t sign = bits_of(v) & 0x80000000u;
  const float a = float_of(bits_of(v) ^ sign);
  const float z = v * v;
  const float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                        1.33314422036e-1f) * z - 3.33332819422e-1f) * z * v + v;
  const float e = exp_neg(2.0f * a);
  const float large = float_of(bits_of((1.0f - e) / (1.0f + e)) | sign);
  return select(v != v, v, select(a < 0.625f, small, large));
}

// e / (1 + e) with e = exp(-|v|) for v < 0, 1 / (1 + e) otherwise: no overflow.
FASTCNN_ALWAYS_INLINE float sigmoid_float(float v) {
  const uint32_t sign = bits_of(v) & 0x80000000u;
  const float e = exp_neg(float_of(bits_of(v) ^ sign));
  const float r = select(sign != 0u, e, 1.0f) / (1.0f + e);
  return select(v != v, v, r);
}

template <class F> FASTCNN_ALWAYS_INLINE F act_value(F v, Act act) { return apply_act(v, act); }
template <> FASTCNN_ALWAYS_INLINE float act_value<float>(float v, Act act) {
  if (act == Act::tanh) return tanh_float(v);
  if (act == Act::sigmoid) return sigmoid_float(v);
  return apply_act(v, act);
}

// Written so that a NaN output passes the gradient, as torch's threshold_backward does.
template <class F> FASTCNN_ALWAYS_INLINE F grad_from_output(F grad, F y, Act act) {
  if (act == Act::relu) return y <= F(0) ? F(0) : grad;
  return act_grad_from_output(grad, y, act);
}

// Elements [begin, end): runs of one bias value (inner > 1) or of consecutive
// channels (inner == 1), so that each inner loop vectorises.
template <class T, int A>
FASTCNN_ALWAYS_INLINE void bias_act_range(const T* x, const acc_t<T>* bias, T* out, int64_t begin,
                                          int64_t end, int64_t channels, int64_t inner) {
  using F = acc_t<T>;
  int64_t i = begin;
  if (inner == 1) {
    int64_t c = i % channels;
    while (i < end) {
      const int64_t len = std::min(channels - c, end - i);
      const T* xs = x + i;
      const F* bs = bias + c;
      T* os = out + i;
      for (int64_t k = 0; k < len; ++k) store(os, k, act_value(load(xs, k) + bs[k], Act(A)));
      i += len;
      c = 0;
    }
  } else {
    const int64_t plane = i / inner;
    int64_t j = i - plane * inner;
    int64_t c = plane % channels;
    while (i < end) {
      const int64_t len = std::min(inner - j, end - i);
      const F b = bias[c];
      const T* xs = x + i;
      T* os = out + i;
      for (int64_t k = 0; k < len; ++k) store(os, k, act_value(load(xs, k) + b, Act(A)));
      i += len;
      j = 0;
      if (++c == channels) c = 0;
    }
  }
}

template <class T>
FASTCNN_ALWAYS_INLINE void bias_act_body(const T* x, const acc_t<T>* bias, T* out, int64_t begin,
                                         int64_t end, int64_t channels, int64_t inner, Act act) {
  switch (act) {  // one loop per activation, so none branches per element
    case Act::relu: bias_act_range<T, 1>(x, bias, out, begin, end, channels, inner); break;
    case Act::tanh: bias_act_range<T, 2>(x, bias, out, begin, end, channels, inner); break;
    case Act::sigmoid: bias_act_range<T, 3>(x, bias, out, begin, end, channels, inner); break;
    default: bias_act_range<T, 0>(x, bias, out, begin, end, channels, inner); break;
  }
}
FASTCNN_ISA_VARIANTS(bias_act_chunk, bias_act_body)

// The backward is split into tasks of about kTaskElems elements: a block of rows
// (outer indices) times a block of channels. Each task adds into its own slot of
// the per-row-block partial sums, and the row blocks are then summed in order, so
// the result depends on the shape only.
constexpr int64_t kTaskElems = 32768;
constexpr int64_t kChannelsPerBlockFastest = 256;  // inner == 1: partial sums stay in L1
constexpr int kLanes = 16;                         // independent sums per plane (inner > 1)

struct ReducePlan {
  int64_t outer, rows_per_block, row_blocks, channels_per_block, channel_blocks;
};

ReducePlan plan_reduction(int64_t n, int64_t channels, int64_t inner) {
  ReducePlan p{};
  p.outer = n / (channels * inner);
  if (inner == 1) {
    p.channels_per_block = std::min(channels, kChannelsPerBlockFastest);
  } else {
    p.channels_per_block = std::clamp<int64_t>(kTaskElems / inner, 1, channels);
  }
  p.rows_per_block = std::max<int64_t>(1, kTaskElems / (p.channels_per_block * inner));
  p.row_blocks = (p.outer + p.rows_per_block - 1) / p.rows_per_block;
  p.channel_blocks = (channels + p.channels_per_block - 1) / p.channels_per_block;
  return p;
}

// Rows [o0, o1) and channels [c0, c1): writes grad_x and adds each channel's sum
// into partial[c].
template <class T, int A>
FASTCNN_ALWAYS_INLINE void backward_task(const T* grad, const T* out, T* grad_x, acc_t<T>* partial,
                                         int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                                         int64_t channels, int64_t inner) {
  using F = acc_t<T>;
  if (inner == 1) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t base = o * channels;
      const T* gs = grad + base;
      const T* ys = out + base;
      T* xs = grad_x + base;
      for (int64_t c = c0; c < c1; ++c) {
        const F g = grad_from_output(load(gs, c), load(ys, c), Act(A));
        store(xs, c, g);
        partial[c] += g;
      }
    }
    return;
  }
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t base = (o * channels + c) * inner;
      const T* gs = grad + base;
      const T* ys = out + base;
      T* xs = grad_x + base;
      F lane[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= inner; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const F g = grad_from_output(load(gs, j + l), load(ys, j + l), Act(A));
          store(xs, j + l, g);
          lane[l] += g;
        }
      }
      F sum = F(0);
      for (; j < inner; ++j) {
        const F g = grad_from_output(load(gs, j), load(ys, j), Act(A));
        store(xs, j, g);
        sum += g;
      }
      for (int l = 0; l < kLanes; ++l) sum += lane[l];
      partial[c] += sum;
    }
  }
}

template <class T>
FASTCNN_ALWAYS_INLINE void backward_body(const T* grad, const T* out, T* grad_x, acc_t<T>* partial,
                                         int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                                         int64_t channels, int64_t inner, Act act) {
  switch (act) {
    case Act::relu: backward_task<T, 1>(grad, out, grad_x, partial, o0, o1, c0, c1, channels, inner); break;
    case Act::tanh: backward_task<T, 2>(grad, out, grad_x, partial, o0, o1, c0, c1, channels, inner); break;
    case Act::sigmoid:
      backward_task<T, 3>(grad, out, grad_x, partial, o0, o1, c0, c1, channels, inner);
      break;
    default: backward_task<T, 0>(grad, out, grad_x, partial, o0, o1, c0, c1, channels, inner); break;
  }
}
FASTCNN_ISA_VARIANTS(bias_act_backward_chunk, backward_body)

}  // namespace

void bias_act(const void* x, const void* bias, void* out, int64_t n, int64_t channels, int64_t inner,
              int dtype, int act) {
  if (n <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = acc_t<T>;
    std::vector<F> bias_acc(static_cast<size_t>(channels));
    for (int64_t c = 0; c < channels; ++c) bias_acc[size_t(c)] = load(static_cast<const T*>(bias), c);
    const F* b = bias_acc.data();
    parallel_for(n, kGrain, [&](int64_t begin, int64_t end) {
      FASTCNN_ISA_CALL(bias_act_chunk, T, static_cast<const T*>(x), b, static_cast<T*>(out), begin, end,
                       channels, inner, Act(act));
    });
  });
}

void bias_act_backward(const void* grad, const void* out, void* grad_x, void* grad_bias, int64_t n,
                       int64_t channels, int64_t inner, int dtype, int act) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = acc_t<T>;
    T* gb = static_cast<T*>(grad_bias);
    if (n <= 0) {
      for (int64_t c = 0; c < channels; ++c) store(gb, c, F(0));
      return;
    }
    const ReducePlan p = plan_reduction(n, channels, inner);
    std::vector<F> partial(size_t(p.row_blocks * channels), F(0));
    F* partials = partial.data();
    parallel_for(p.row_blocks * p.channel_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t rb = t / p.channel_blocks, cb = t % p.channel_blocks;
        const int64_t o0 = rb * p.rows_per_block, o1 = std::min(p.outer, o0 + p.rows_per_block);
        const int64_t c0 = cb * p.channels_per_block, c1 = std::min(channels, c0 + p.channels_per_block);
        FASTCNN_ISA_CALL(bias_act_backward_chunk, T, static_cast<const T*>(grad), static_cast<const T*>(out),
                         static_cast<T*>(grad_x), partials + rb * channels, o0, o1, c0, c1, channels, inner,
                         Act(act));
      }
    });
    // Row blocks in order, channel by channel.
    parallel_for(channels, 4096, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        F sum = F(0);
        for (int64_t rb = 0; rb < p.row_blocks; ++rb) sum += partials[rb * channels + c];
        store(gb, c, sum);
      }
    });
  });
}

}  // namespace fastcnn::cpu
