// Local response normalisation across channels, one thread per element: each
// recomputes its channel window (size loads, neighbours in L1), which keeps the
// loads coalesced in both layouts and needs no sliding add/subtract (it cancels).
//
// Backward in two passes, through a scratch tensor in the accumulation type:
//   t[c] = g[c] x[c] / (div[c] s[c]);
//   grad_x[j] = g[j] / div[j] - (2 alpha beta / size) x[j] sum_{c in [j - (size-1)/2, j + size/2]} t[c].
#include "local_response_norm.h"
#include "fastcnn/cuda_scalar.cuh"

namespace fastcnn::cuda {
namespace {

constexpr int kThreads = 256;

template <class F> struct LrnArgs {
  int64_t n, C, cs, size;
  F alpha_over_size, beta, k, coef;
  bool beta_is_075;
};

template <class F> LrnArgs<F> lrn_args(int64_t n, int64_t C, int64_t cs, int64_t size, double alpha,
                                       double beta, double k) {
  return {n, C, cs, size, F(alpha / double(size)), F(beta), F(k), F(2.0 * alpha * beta / double(size)),
          beta == 0.75};
}

// s = k + alpha/size * (window sum of x^2) of element i in channel c; returns div = s^beta.
template <class T, class F>
__device__ __forceinline__ F lrn_div(const T* __restrict__ x, int64_t i, int64_t c, const LrnArgs<F>& a,
                                     F& s) {
  const int64_t lo = c - a.size / 2 < 0 ? 0 : c - a.size / 2;
  const int64_t hi = c + (a.size - 1) / 2 > a.C - 1 ? a.C - 1 : c + (a.size - 1) / 2;
  F sum = F(0);
  for (int64_t cc = lo; cc <= hi; ++cc) {
    const F v = dload(x, i + (cc - c) * a.cs);
    sum += v * v;
  }
  s = a.k + a.alpha_over_size * sum;
  if (a.beta_is_075) {
    const F r = sqrt(s);
    return r * sqrt(r);
  }
  return pow(s, a.beta);
}

template <class T>
__global__ void lrn_forward_kernel(const T* __restrict__ x, T* __restrict__ out, LrnArgs<dacc_t<T>> a) {
  using F = dacc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.n;
       i += int64_t(gridDim.x) * blockDim.x) {
    F s;
    const F div = lrn_div(x, i, (i / a.cs) % a.C, a, s);
    dstore(out, i, dload(x, i) / div);
  }
}

template <class T>
__global__ void lrn_backward_terms_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                          dacc_t<T>* __restrict__ terms, LrnArgs<dacc_t<T>> a) {
  using F = dacc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.n;
       i += int64_t(gridDim.x) * blockDim.x) {
    F s;
    const F div = lrn_div(x, i, (i / a.cs) % a.C, a, s);
    terms[i] = dload(grad, i) * dload(x, i) / (div * s);
  }
}

template <class T>
__global__ void lrn_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                    const dacc_t<T>* __restrict__ terms, T* __restrict__ grad_x,
                                    LrnArgs<dacc_t<T>> a) {
  using F = dacc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = (i / a.cs) % a.C;
    F s;
    const F div = lrn_div(x, i, j, a, s);
    const int64_t lo = j - (a.size - 1) / 2 < 0 ? 0 : j - (a.size - 1) / 2;
    const int64_t hi = j + a.size / 2 > a.C - 1 ? a.C - 1 : j + a.size / 2;
    F sum = F(0);
    for (int64_t c = lo; c <= hi; ++c) sum += terms[i + (c - j) * a.cs];
    dstore(grad_x, i, dload(grad, i) / div - a.coef * dload(x, i) * sum);
  }
}

}  // namespace

int local_response_norm(const void* input, void* output, int64_t n, int64_t C, int64_t cs, int64_t size,
                        double alpha, double beta, double k, int dtype, void* stream) {
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    lrn_forward_kernel<T><<<grid_for(n, kThreads), kThreads, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(input), static_cast<T*>(output),
        lrn_args<dacc_t<T>>(n, C, cs, size, alpha, beta, k));
    return int(cudaGetLastError());
  });
}

int local_response_norm_backward(const void* grad_output, const void* input, void* scratch, void* grad_input,
                                 int64_t n, int64_t C, int64_t cs, int64_t size, double alpha, double beta,
                                 double k, int dtype, void* stream) {
  return dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using F = dacc_t<T>;
    const LrnArgs<F> a = lrn_args<F>(n, C, cs, size, alpha, beta, k);
    const auto grad = static_cast<const T*>(grad_output);
    const auto x = static_cast<const T*>(input);
    const auto terms = static_cast<F*>(scratch);
    lrn_backward_terms_kernel<T><<<grid_for(n, kThreads), kThreads, 0, cudaStream_t(stream)>>>(grad, x, terms, a);
    const int err = int(cudaGetLastError());
    if (err != 0) return err;
    lrn_backward_kernel<T><<<grid_for(n, kThreads), kThreads, 0, cudaStream_t(stream)>>>(
        grad, x, terms, static_cast<T*>(grad_input), a);
    return int(cudaGetLastError());
  });
}

}  // namespace fastcnn::cuda
