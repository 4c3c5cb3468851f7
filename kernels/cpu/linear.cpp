// linear on the blocked GEMM core (gemm_blocked.h): out = act(a * b^T + bias).
// The core packs its B operand once per call, so the smaller of the two operands
// plays B: for a batch smaller than the layer width (FC inference) the GEMM runs
// transposed, out^T = b * a^T, and the large weight is read in place, once.
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
                                   const F* tile) const {
    for (int64_t i = 0; i < nrows; ++i) {
      const int64_t m = rows[i].m;
      const T* col_bias = bias != nullptr && !bias_on_rows ? bias + n0 : nullptr;
      const F row_bias = bias != nullptr && bias_on_rows ? F(load(bias, m)) : F(0);
      gemm::store_row<T>(tile + i * NR, ncols, out + m * om + n0 * on, on, col_bias, row_bias, nullptr, 0, act);
    }
  }
};

}  // namespace

void linear(const void* a, int64_t a_stride_m, int64_t a_stride_k, const void* b, int64_t b_stride_n,
            int64_t b_stride_k, const void* bias, void* out, int64_t out_stride_m, int64_t out_stride_n,
            int64_t M, int64_t N, int64_t K, int dtype, int act) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
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
