// linear on the blocked GEMM core (gemm_blocked.h): out = act(a * b^T + bias).
// The core packs its B operand once per call, so the smaller of the two operands
// plays B: for a batch smaller than the layer width (FC inference) the GEMM runs
// transposed, out^T = b * a^T, and the large weight is read in place, once.
// A batch of at most four rows (batch-1 inference) takes a matrix-vector path
// instead: the 6x16 micro-kernel would pad those rows to 16 and do 4-16x the
// multiply-adds, while streaming the weight once is all the layer needs. A weight
// contiguous along n (a transposed view: the backward's products) with at most
// eight rows or a sum of at most eight terms takes a row-update path.
#include "linear.h"

#include "fastcnn/dispatch.h"
#include "gemm_blocked.h"

namespace fastcnn::cpu {
namespace {

using gemm::APanel;
using gemm::MR;

// C[m][n] = sum_k A[m][k] B[k][n] with A[m][k] = a[m * am + k * ak], B[k][n] = b[k * bk + n * bn];
// bias runs along n, or along m when the GEMM is the transposed one.
template <class T>
struct Linear {
  using F = acc_t<T>;
  struct Row {
    int64_t m;
  };
  static constexpr bool kPrepackB = true;
  static constexpr int NR = gemm::kNR<F>;
  int64_t groups, M, N, K, k_run, k_align;
  const T* a;
  int64_t am, ak;
  const T* b;
  int64_t bk, bn;
  const T* bias;
  bool bias_on_rows;
  T* out;
  int64_t om, on;
  Act act;

  FASTCNN_ALWAYS_INLINE void rows(int64_t m0, int64_t count, Row* r) const {
    for (int64_t i = 0; i < count; ++i) r[i].m = m0 + i;
  }
  FASTCNN_ALWAYS_INLINE void a_block(int64_t, const Row* rows, int64_t nrows, int64_t k0, int64_t kl, F* buf,
                                     APanel<F>* panels) const {
    for (int64_t ip = 0; ip * MR < nrows; ++ip) {
      const int64_t count = std::min<int64_t>(MR, nrows - ip * MR);
      const T* src = a + (rows[0].m + ip * MR) * am + k0 * ak;
      if constexpr (std::is_same_v<T, F>) {
        if (count == MR) {  // read in place
          panels[ip] = {src, am, ak};
          continue;
        }
      }
      panels[ip] = gemm::pack_strided_a(src, am, ak, count, kl, buf + ip * MR * kl);
    }
  }
  FASTCNN_ALWAYS_INLINE void pack_b(int64_t, int64_t n0, int64_t ncols, int64_t k0, int64_t kl, F* dst) const {
    gemm::pack_strided_b(b + k0 * bk + n0 * bn, bk, bn, ncols, kl, dst);
  }
  FASTCNN_ALWAYS_INLINE void store(int64_t, const Row* rows, int64_t nrows, int64_t n0, int64_t ncols,
                                   F* tile) const {
    const T* col_bias = bias != nullptr && !bias_on_rows ? bias + n0 : nullptr;
    Act row_act = act;
    if ((bias == nullptr || !bias_on_rows) && gemm::activate_tile<T>(tile, nrows, ncols, col_bias, act)) {
      col_bias = nullptr;  // added, and the activation applied, in the tile
      row_act = Act::none;
    }
    for (int64_t i = 0; i < nrows; ++i) {
      const int64_t m = rows[i].m;
      const F row_bias = bias != nullptr && bias_on_rows ? F(load(bias, m)) : F(0);
      gemm::store_row<T>(tile + i * NR, ncols, out + m * om + n0 * on, on, col_bias, row_bias, nullptr, 0, row_act);
    }
  }
};

constexpr int64_t kMaxGemvRows = 4;

// fn(std::integral_constant<int, R>{}) with R = min(count, Max), count >= 1: a row count
// known at run time handed to a kernel that unrolls over it.
template <int Max, class Fn>
FASTCNN_ALWAYS_INLINE void with_row_count(int64_t count, const Fn& fn) {
  if constexpr (Max > 1) {
    if (count < Max) {
      with_row_count<Max - 1>(count, fn);
      return;
    }
  }
  fn(std::integral_constant<int, Max>{});
}

// out[m][n] = act(sum_k x[m][k] w[n][k] + bias[n]) for MB rows of x and weight rows
// [n0, n1), both contiguous in k; four weight rows at a time share each x load.
template <class F, int MB>
FASTCNN_ALWAYS_INLINE void gemv_rows(const F* x, int64_t xm, const F* w, int64_t wn, const F* bias, F* out,
                                     int64_t om, int64_t on, int64_t K, int64_t n0, int64_t n1, Act act) {
  using V = typename gemm::Vec<F>::type;
  constexpr int64_t L = sizeof(V) / sizeof(F);
  constexpr int NB = 4;
  for (int64_t n = n0; n < n1; n += NB) {
    const int nb = int(std::min<int64_t>(NB, n1 - n));
    V acc[MB][NB] = {};
    int64_t k = 0;
    if (nb == NB) {
      for (; k + L <= K; k += L) {
        V xv[MB], wv[NB];
        for (int m = 0; m < MB; ++m) gemm::vload(xv[m], x + m * xm + k);
        for (int j = 0; j < NB; ++j) gemm::vload(wv[j], w + (n + j) * wn + k);
        for (int m = 0; m < MB; ++m)
          for (int j = 0; j < NB; ++j) acc[m][j] += xv[m] * wv[j];
      }
    }
    for (int j = 0; j < nb; ++j) {
      for (int m = 0; m < MB; ++m) {
        F sum = 0;
        for (int64_t l = 0; l < L; ++l) sum += acc[m][j][l];
        for (int64_t kk = k; kk < K; ++kk) sum += x[m * xm + kk] * w[(n + j) * wn + kk];
        if (bias != nullptr) sum += bias[n + j];
        out[m * om + (n + j) * on] = apply_act(sum, act);
      }
    }
  }
}

template <class F>
FASTCNN_ALWAYS_INLINE void gemv_body(const F* x, int64_t xm, int64_t M, const F* w, int64_t wn, const F* bias,
                                     F* out, int64_t om, int64_t on, int64_t K, int64_t n0, int64_t n1, Act act) {
  with_row_count<kMaxGemvRows>(M, [&](auto rows) FASTCNN_ALWAYS_INLINE_LAMBDA {
    gemv_rows<F, decltype(rows)::value>(x, xm, w, wn, bias, out, om, on, K, n0, n1, act);
  });
}
FASTCNN_ISA_VARIANTS(linear_gemv, gemv_body)

// The matrix-vector path, if it applies: full-precision types, a few rows, both
// operands contiguous along k (a weight in nn.Linear's layout; not the transposed
// views the backward passes).
template <class T>
bool try_gemv(const T* a, int64_t am, int64_t ak, const T* b, int64_t bn, int64_t bk, const T* bias, T* out,
              int64_t om, int64_t on, int64_t M, int64_t N, int64_t K, Act act) {
  if constexpr (!std::is_same_v<T, acc_t<T>>) {
    return false;
  } else {
    if (M > kMaxGemvRows || ak != 1 || bk != 1) return false;
    // Blocks of four weight rows; each thread streams a contiguous range of them.
    parallel_for((N + 3) / 4, 16, [&](int64_t begin, int64_t end) {
      FASTCNN_ISA_CALL(linear_gemv, T, a, am, M, b, bn, bias, out, om, on, K, begin * 4,
                       std::min<int64_t>(N, end * 4), act);
    });
    return true;
  }
}

// out[m][n0, n1) = act(sum_k a[m][k] * b[k][n] + bias[n]) for MB rows of a, with b
// (the weight, transposed) contiguous along n: each k streams one run of b's row into
// MB accumulator rows held in L1. The backward's products at a small batch are of
// this kind: the input gradient (a few rows, the weight read transposed) and the
// weight gradient (a sum over a few samples: a rank-1 update per sample).
constexpr int64_t kRowUpdateRows = 8;           // rows per task, and the longest sum it takes
constexpr int64_t kRowUpdateAccBytes = 16384;   // accumulators per task: half of L1

// Columns per task for blocks of `rows` rows: one row streams 16 KB runs of b.
template <class F> constexpr int64_t row_update_chunk(int64_t rows) {
  return kRowUpdateAccBytes / (rows * int64_t(sizeof(F)));
}

template <class F, int MB>
FASTCNN_ALWAYS_INLINE void row_update_rows(const F* a, int64_t am, int64_t ak, const F* b, int64_t bk,
                                           const F* bias, F* out, int64_t om, int64_t K, int64_t n0, int64_t n1,
                                           Act act) {
  alignas(64) F acc[MB][row_update_chunk<F>(MB)];  // n1 - n0 <= this: see try_row_update
  const int64_t len = n1 - n0;
  for (int m = 0; m < MB; ++m)
    for (int64_t j = 0; j < len; ++j) acc[m][j] = F(0);
  for (int64_t k = 0; k < K; ++k) {
    const F* __restrict__ row = b + k * bk + n0;
    F av[MB];
    for (int m = 0; m < MB; ++m) av[m] = a[m * am + k * ak];
    for (int64_t j = 0; j < len; ++j) {
      const F bv = row[j];
      for (int m = 0; m < MB; ++m) acc[m][j] += av[m] * bv;
    }
  }
  for (int m = 0; m < MB; ++m) {
    F* o = out + m * om + n0;
    if (bias != nullptr)
      for (int64_t j = 0; j < len; ++j) acc[m][j] += bias[n0 + j];
    if (act == Act::relu) {
      for (int64_t j = 0; j < len; ++j) o[j] = acc[m][j] < F(0) ? F(0) : acc[m][j];  // NaN passes
    } else if (act == Act::none) {
      for (int64_t j = 0; j < len; ++j) o[j] = acc[m][j];
    } else {
      for (int64_t j = 0; j < len; ++j) o[j] = apply_act(acc[m][j], act);
    }
  }
}

template <class F>
FASTCNN_ALWAYS_INLINE void row_update_body(const F* a, int64_t am, int64_t ak, int64_t M, const F* b, int64_t bk,
                                           const F* bias, F* out, int64_t om, int64_t N, int64_t K, Act act,
                                           int64_t chunk, int64_t begin, int64_t end) {
  const int64_t chunks = (N + chunk - 1) / chunk;
  for (int64_t t = begin; t < end; ++t) {  // t = (block of rows, chunk of columns)
    const int64_t m0 = (t / chunks) * kRowUpdateRows, n0 = (t % chunks) * chunk;
    const int64_t n1 = std::min(N, n0 + chunk);
    const F* ab = a + m0 * am;
    F* ob = out + m0 * om;
    with_row_count<kRowUpdateRows>(M - m0, [&](auto rows) FASTCNN_ALWAYS_INLINE_LAMBDA {
      row_update_rows<F, decltype(rows)::value>(ab, am, ak, b, bk, bias, ob, om, K, n0, n1, act);
    });
  }
}
FASTCNN_ISA_VARIANTS(linear_row_update, row_update_body)

// The row-update path, if it applies: full-precision types, b and out contiguous
// along n, and a few rows or a short sum (at most kRowUpdateRows), where the GEMM's
// tiles would run a micro-kernel over K = 1 or pack a transposed weight. AlexNet's
// 9216->4096 layer on the 2-core CPU, batch 1: weight gradient 103 -> 54 ms (eager
// ~65; a fresh 151 MB output), input gradient 12.9 -> 6.8 ms (eager 6.6); layer
// forward + backward at batch 8: 0.75x -> 0.99x eager.
template <class T>
bool try_row_update(const T* a, int64_t am, int64_t ak, const T* b, int64_t bn, int64_t bk, const T* bias, T* out,
                    int64_t om, int64_t on, int64_t M, int64_t N, int64_t K, Act act) {
  if constexpr (!std::is_same_v<T, acc_t<T>>) {
    return false;
  } else {
    if (bn != 1 || on != 1 || (M > kRowUpdateRows && K > kRowUpdateRows)) return false;
    // Sized for the widest block; a narrower (last) block has room for more columns.
    const int64_t chunk = row_update_chunk<T>(std::min(M, kRowUpdateRows));
    const int64_t tasks = ((M + kRowUpdateRows - 1) / kRowUpdateRows) * ((N + chunk - 1) / chunk);
    parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
      FASTCNN_ISA_CALL(linear_row_update, T, a, am, ak, M, b, bk, bias, out, om, N, K, act, chunk, begin, end);
    });
    return true;
  }
}

}  // namespace

void linear(const void* a, int64_t a_stride_m, int64_t a_stride_k, const void* b, int64_t b_stride_n,
            int64_t b_stride_k, const void* bias, void* out, int64_t out_stride_m, int64_t out_stride_n,
            int64_t M, int64_t N, int64_t K, int dtype, int act) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (try_gemv(static_cast<const T*>(a), a_stride_m, a_stride_k, static_cast<const T*>(b), b_stride_n,
                 b_stride_k, static_cast<const T*>(bias), static_cast<T*>(out), out_stride_m, out_stride_n, M, N,
                 K, Act(act)))
      return;
    if (try_row_update(static_cast<const T*>(a), a_stride_m, a_stride_k, static_cast<const T*>(b), b_stride_n,
                       b_stride_k, static_cast<const T*>(bias), static_cast<T*>(out), out_stride_m, out_stride_n,
                       M, N, K, Act(act)))
      return;
    Linear<T> p{};
    p.groups = 1;
    p.K = K;
    p.k_run = K;
    p.bias = static_cast<const T*>(bias);
    p.out = static_cast<T*>(out);
    p.act = Act(act);
    if (M < N) {  // out^T[n][m] = sum_k b[n][k] a[m][k]
      p.M = N;
      p.N = M;
      p.a = static_cast<const T*>(b);
      p.am = b_stride_n;
      p.ak = b_stride_k;
      p.b = static_cast<const T*>(a);
      p.bk = a_stride_k;
      p.bn = a_stride_m;
      p.bias_on_rows = true;
      p.om = out_stride_n;
      p.on = out_stride_m;
    } else {
      p.M = M;
      p.N = N;
      p.a = static_cast<const T*>(a);
      p.am = a_stride_m;
      p.ak = a_stride_k;
      p.b = static_cast<const T*>(b);
      p.bk = b_stride_k;
      p.bn = b_stride_n;
      p.bias_on_rows = false;
      p.om = out_stride_m;
      p.on = out_stride_n;
    }
    gemm::run<T>(p);
  });
}

}  // namespace fastcnn::cpu
