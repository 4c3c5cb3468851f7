// Shared by the pybind11 glue: raw pointers arrive as Python ints.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

namespace fastcnn::bindings {
inline const void* in_ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
inline void* out_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// One function per op file registers that op's kernels on the module.
#define FASTCNN_FOR_EACH_OP(X) \
  X(add_act) X(bias_act) X(max_pool2d) X(avg_pool2d) X(global_avg_pool2d) X(conv2d) X(linear) X(local_response_norm)
#define FASTCNN_DECLARE_BIND(op) void bind_cpu_##op(pybind11::module_& m); void bind_cuda_##op(pybind11::module_& m);
FASTCNN_FOR_EACH_OP(FASTCNN_DECLARE_BIND)
#undef FASTCNN_DECLARE_BIND

// CUDA glue only: throws if no device is visible / if a launch failed.
void require_device();
void check_cuda(int err, const char* what);
inline void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }
}  // namespace fastcnn::bindings
