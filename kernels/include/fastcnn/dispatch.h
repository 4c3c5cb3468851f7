// Runs a templated callable with the storage type named by a DType code.
#pragma once
#include <stdexcept>
#include "fastcnn/scalar.h"

namespace fastcnn {

template <class F>
inline void dispatch_dtype(int dtype, const F& fn) {
  switch (DType(dtype)) {
    case DType::float32: fn(float{}); break;
    case DType::float64: fn(double{}); break;
    case DType::float16: fn(half_bits{}); break;
    case DType::bfloat16: fn(bfloat16_bits{}); break;
    default: throw std::invalid_argument("fastcnn: unsupported dtype code");
  }
}

}  // namespace fastcnn
