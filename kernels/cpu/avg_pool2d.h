// CPU avg_pool2d and its backward, with PyTorch's window and divisor rules.
// Geometry strides: input (forward) / grad_input (backward) and output / grad_output.
// The tensors must be dense along W (NCHW) or along C (channels_last).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastcnn/cpu_parallel.h"
#include "fastcnn/pool_geometry.h"
#include "fastcnn/scalar.h"

namespace fastcnn::cpu {
void avg_pool2d(const void* input, void* output, const Pool2dGeometry& g, bool count_include_pad, int dtype);
void avg_pool2d_backward(const void* grad_output, void* grad_input, const Pool2dGeometry& g,
                         bool count_include_pad, int dtype);

// Vector helpers shared by the CPU pooling kernels (avg_pool2d, global_avg_pool2d).
// 32 bytes of acc_t lanes: one AVX2 register (two SSE2 ones in the base variant).
template <class F> struct vec32 { typedef F type __attribute__((vector_size(32))); };
template <class F> using vec32_t = typename vec32<F>::type;
template <class F> constexpr int kLanes = int(32 / sizeof(F));

// acc += p[0, lanes), converted to acc_t. (Vectors pass by reference: by value
// would change the ABI between the two instruction-set variants.)
template <class T>
FASTCNN_ALWAYS_INLINE void add_vec(vec32_t<acc_t<T>>& acc, const T* p) {
  using F = acc_t<T>;
  vec32_t<F> v;
  if constexpr (std::is_same_v<T, F>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int j = 0; j < kLanes<F>; ++j) v[j] = load(p, j);
  }
  acc += v;
}

// Keeps the compiler from fusing the passes over consecutive positions of a
// channels_last tensor into one loop (unroll-and-jam): reading two positions at
// once measured twice as slow as one contiguous stream at a time.
FASTCNN_ALWAYS_INLINE void one_stream_barrier() { asm volatile("" ::: "memory"); }

}  // namespace fastcnn::cpu
