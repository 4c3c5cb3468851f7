// linear as a problem for the GEMM core in implicit_gemm.cuh: A = a [M, K], B[k, n] = b[n, k], any
// element strides; epilogue out[m, n] = act(acc + bias[n]).
#pragma once
#include "implicit_gemm.cuh"

namespace fastcnn::cuda::gemm {

template <class T> struct LinearProb : GemmOperands<T> {
  using F = dacc_t<T>;
  struct EpRow {
    int64_t off;
  };
  int64_t a_sm, a_sk, b_sn, b_sk, out_sm, out_sn;
  const T* bias;
  T* out;
  int act;

  FASTCNN_HD void select(int64_t) {}
  FASTCNN_HD Entry a_outer(int64_t m) const { return plain_entry(m * a_sm); }
  FASTCNN_HD Entry a_inner(int64_t k) const { return plain_entry(k * a_sk); }
  FASTCNN_HD Entry b_outer(int64_t n) const { return plain_entry(n * b_sn); }
  FASTCNN_HD Entry b_inner(int64_t k) const { return plain_entry(k * b_sk); }
  FASTCNN_HD EpRow ep_row(int64_t m) const { return {m * out_sm}; }
  FASTCNN_HD void emit(const EpRow& e, int64_t, int64_t n, F v) const {
    if (bias != nullptr) v += F(to_acc(bias[n]));
    store_acc(out + e.off + n * out_sn, activate<F>(v, act));
  }
};

template <class T>
LinearProb<T> make_linear(const T* a, int64_t a_sm, int64_t a_sk, const T* b, int64_t b_sn, int64_t b_sk,
                          const T* bias, T* out, int64_t out_sm, int64_t out_sn, int64_t M, int64_t N, int64_t K,
                          int act) {
  LinearProb<T> p{};
  p.a = a;
  p.b = b;
  p.M = M;
  p.N = N;
  p.K = K;
  p.a_bound_h = p.a_bound_w = p.b_bound_h = p.b_bound_w = 1;
  p.a_along_k = denser(a_sk, a_sm);
  p.b_along_k = denser(b_sk, b_sn);
  p.a_vec = p.a_along_k ? vec_ok(a, a_sk, {a_sm}, K) : vec_ok(a, a_sm, {a_sk}, M);
  p.b_vec = p.b_along_k ? vec_ok(b, b_sk, {b_sn}, K) : vec_ok(b, b_sn, {b_sk}, N);
  p.a_sm = a_sm;
  p.a_sk = a_sk;
  p.b_sn = b_sn;
  p.b_sk = b_sk;
  p.out_sm = out_sm;
  p.out_sn = out_sn;
  p.bias = bias;
  p.out = out;
  p.act = act;
  return p;
}

inline SplitPlan linear_plan(int64_t M, int64_t N, int64_t K, int dtype) {
  const TileShape t = tile_shape(dtype);
  return plan_split(ceil_div(M, t.bm) * ceil_div(N, t.bn), K, t.bk);
}

}  // namespace fastcnn::cuda::gemm
