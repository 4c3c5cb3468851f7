// fastcnn._cpu: the CPU kernels, called with raw data pointers (ints) from
// fastcnn/ops. Knows nothing of torch, so one build serves every torch version.
#include <omp.h>

#include "fastcnn/bindings.h"
#include "fastcnn/cpu_parallel.h"

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fastcnn CPU kernels (OpenMP, AVX2 and AVX-512 chosen at run time)";
  m.def("has_avx2", &fastcnn::cpu_has_avx2);
  m.def("has_avx512", &fastcnn::cpu_has_avx512);
  m.def("max_threads", []() { return omp_get_max_threads(); });
#define FASTCNN_BIND(op) fastcnn::bindings::bind_cpu_##op(m);
  FASTCNN_FOR_EACH_OP(FASTCNN_BIND)
#undef FASTCNN_BIND
}
