// Storage types and their conversion to the float type arithmetic is done in.
// Plain C++ so that the kernels need no torch or CUDA headers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastcnn {

// Codes shared with fastcnn/_native.py; keep the two in step.
enum class DType : int { float32 = 0, float16 = 1, bfloat16 = 2, float64 = 3 };
enum class Act : int { none = 0, relu = 1, tanh = 2, sigmoid = 3 };

struct half_bits { uint16_t bits; };
struct bfloat16_bits { uint16_t bits; };

inline float to_float(half_bits h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  uint32_t out;
  if (exp == 0x1fu) {
    out = sign | 0x7f800000u | (mant << 13);  // inf or NaN
  } else if (exp != 0) {
    out = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    out = sign;
  } else {  // subnormal half: renormalise
    exp = 113;
    while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
    out = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

// Round to nearest even, as PyTorch's conversion does.
inline half_bits from_float_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or NaN
    return {uint16_t(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u))};
  }
  if (absx >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (absx < 0x38800000u) {  // subnormal or zero in half
    float a;
    std::memcpy(&a, &absx, 4);
    // 2^-24 is the half subnormal unit; the float add rounds to nearest even.
    const float scaled = a + 0.5f;
    uint32_t s;
    std::memcpy(&s, &scaled, 4);
    return {uint16_t(sign | uint16_t(s - 0x3f000000u))};
  }
  const uint32_t mant_odd = (absx >> 13) & 1u;
  const uint32_t rounded = absx + 0xc8000fffu + mant_odd;  // rebias -112<<23, round
  return {uint16_t(sign | uint16_t(rounded >> 13))};
}

inline float to_float(bfloat16_bits b) {
  const uint32_t x = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline bfloat16_bits from_float_bfloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {uint16_t((x >> 16) | 0x40u)};  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return {uint16_t(x >> 16)};
}

inline float to_float(float f) { return f; }
inline double to_float(double d) { return d; }

// Accumulation type: float for the 16-bit types, the type itself otherwise.
template <class T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <class T> using acc_t = typename acc<T>::type;

template <class T> inline T from_acc(acc_t<T> v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }
template <> inline half_bits from_acc<half_bits>(float v) { return from_float_half(v); }
template <> inline bfloat16_bits from_acc<bfloat16_bits>(float v) { return from_float_bfloat16(v); }

template <class T> inline acc_t<T> load(const T* p, int64_t i) { return acc_t<T>(to_float(p[i])); }
template <class T> inline void store(T* p, int64_t i, acc_t<T> v) { p[i] = from_acc<T>(v); }

// NaN passes through ReLU, as in torch.relu.
template <class F> inline F apply_act(F v, Act act) {
  switch (act) {
    case Act::relu: return v < F(0) ? F(0) : v;
    case Act::tanh: return std::tanh(v);
    case Act::sigmoid: return F(1) / (F(1) + std::exp(-v));
    default: return v;
  }
}

// Derivative of the activation written in terms of its output y.
template <class F> inline F act_grad_from_output(F grad, F y, Act act) {
  switch (act) {
    case Act::relu: return y <= F(0) ? F(0) : grad;  // NaN output passes grad, as torch does
    case Act::tanh: return grad * (F(1) - y * y);
    case Act::sigmoid: return grad * y * (F(1) - y);
    default: return grad;
  }
}

}  // namespace fastcnn
