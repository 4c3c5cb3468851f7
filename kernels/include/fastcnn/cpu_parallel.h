// Threading and instruction-set dispatch for the CPU kernels.
#pragma once
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace fastcnn {

// The AVX2 variant of a kernel may only run where the CPU has AVX2 and FMA;
// the base variant is plain x86-64 (SSE2), so the module never traps.
// FASTCNN_CPU_ISA=base forces the base variant (the tests run it that way too).
inline bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    const char* forced = std::getenv("FASTCNN_CPU_ISA");
    if (forced != nullptr && std::string(forced) == "base") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return has;
#else
  return false;
#endif
}

// The AVX-512 variant (the GEMM micro-kernel only) needs AVX-512 F and VL, with
// the OS saving zmm state (the builtin checks both). FASTCNN_CPU_ISA=avx2 stops at
// AVX2; =base stops before it.
inline bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    const char* forced = std::getenv("FASTCNN_CPU_ISA");
    if (forced != nullptr && (std::string(forced) == "base" || std::string(forced) == "avx2")) return false;
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  }();
  return has;
#else
  return false;
#endif
}

// Split [0, n) into chunks of at least `grain` items and run fn(begin, end) on
// each, in parallel. Chunks never overlap, so kernels need no atomics.
template <class F>
inline void parallel_for(int64_t n, int64_t grain, const F& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t max_threads = omp_get_max_threads();
  int64_t chunks = (n + grain - 1) / grain;
  if (chunks > max_threads) chunks = max_threads;
  if (chunks <= 1 || omp_in_parallel()) {
    fn(int64_t(0), n);
    return;
  }
#pragma omp parallel for num_threads(int(chunks)) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = n * c / chunks;
    const int64_t end = n * (c + 1) / chunks;
    fn(begin, end);
  }
}

}  // namespace fastcnn

// Defines NAME_avx2 and NAME_base from one always-inline body template, so the
// compiler vectorises the same loop twice; call through FASTCNN_ISA_CALL.
#if defined(__x86_64__) || defined(__i386__)
#define FASTCNN_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define FASTCNN_AVX512_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl")))
#else
#define FASTCNN_AVX2_TARGET
#define FASTCNN_AVX512_TARGET
#endif
#define FASTCNN_ISA_VARIANTS(NAME, BODY)                                         \
  template <class T, class... A>                                                 \
  FASTCNN_AVX2_TARGET __attribute__((noinline)) void NAME##_avx2(A... a) {       \
    BODY<T>(a...);                                                               \
  }                                                                              \
  template <class T, class... A>                                                 \
  __attribute__((noinline)) void NAME##_base(A... a) {                           \
    BODY<T>(a...);                                                               \
  }
#define FASTCNN_ISA_CALL(NAME, T, ...) \
  (::fastcnn::cpu_has_avx2() ? NAME##_avx2<T>(__VA_ARGS__) : NAME##_base<T>(__VA_ARGS__))
#define FASTCNN_ALWAYS_INLINE inline __attribute__((always_inline))
// A lambda inside an ISA variant's body: its operator() does not take the enclosing
// function's target, so it must be inlined into it to be compiled for that ISA.
#define FASTCNN_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
