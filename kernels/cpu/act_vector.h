// tanh and sigmoid on rows of float values, 8 lanes at a time, for the GEMM
// epilogues: std::tanh and std::exp are scalar library calls (~10 ns a value),
// which made tanh/sigmoid cost more than LeNet-5's convolutions themselves.
// exp after Cephes' expf, tanh after Cephes' tanhf (both within a few ulp);
// NaN passes through. Included by kernels compiled per ISA variant, so the
// vectors become AVX2 or SSE as the variant allows. double keeps std::tanh/exp.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastcnn/scalar.h"

namespace fastcnn::cpu::act_vector {

typedef float f8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t i8 __attribute__((vector_size(32), aligned(4)));

// Vectors pass by reference: a 32-byte vector argument or return value would
// change the calling convention of the SSE-only variant.

// x = e^x; x clamped to [-87, 88] so that 2^n stays a normal float.
inline __attribute__((always_inline)) void exp8(f8& x) {
  x = x < 88.0f ? x : 88.0f;
  x = x > -87.0f ? x : -87.0f;
  const f8 t = x * 1.44269504088896341f + 0.5f;
  f8 n = __builtin_convertvector(__builtin_convertvector(t, i8), f8);
  n = n > t ? n - 1.0f : n;  // floor(x / ln 2 + 1/2)
  f8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f8 p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
          1.6666665459e-1f) * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  x = p * scale;
}

// x = tanh(x): an odd polynomial below 0.625, 1 - 2 / (e^2|x| + 1) above.
inline __attribute__((always_inline)) void tanh8(f8& x) {
  const f8 a = x < 0.0f ? -x : x;
  const f8 z = x * x;
  const f8 small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                     1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
  f8 e = a + a;
  exp8(e);
  f8 large = 1.0f - 2.0f / (e + 1.0f);
  large = x < 0.0f ? -large : large;
  const f8 y = a < 0.625f ? small : large;
  x = x != x ? x : y;
}

// x = 1 / (1 + e^-x)
inline __attribute__((always_inline)) void sigmoid8(f8& x) {
  f8 e = -x;
  exp8(e);
  const f8 y = 1.0f / (1.0f + e);
  x = x != x ? x : y;
}

// x = act(x) for tanh and sigmoid.
inline __attribute__((always_inline)) void apply8(f8& x, Act act) {
  if (act == Act::tanh) {
    tanh8(x);
  } else {
    sigmoid8(x);
  }
}

// v[0, n) = act(v[0, n)) for tanh and sigmoid.
template <class F> inline __attribute__((always_inline)) void apply_row(F* v, int64_t n, Act act) {
  if constexpr (std::is_same_v<F, float>) {
    for (int64_t j = 0; j < n; j += 8) {
      const int64_t count = n - j < 8 ? n - j : 8;
      f8 x = {};
      std::memcpy(&x, v + j, size_t(count) * sizeof(float));
      apply8(x, act);
      std::memcpy(v + j, &x, size_t(count) * sizeof(float));
    }
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = apply_act(v[j], act);
  }
}

}  // namespace fastcnn::cpu::act_vector
