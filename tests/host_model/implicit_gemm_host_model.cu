// The CUDA GEMM core (kernels/cuda/implicit_gemm.cuh) with its conv2d and linear problems, run on the
// CPU: every index expression of the tiling, the operand tables, the 16-byte loads, the split-K sum and
// the epilogues, checked against float64 loops. Built by nvcc as host code with
// FASTCNN_GEMM_HOST_MODEL (WMMA fragments become plain arrays); tests/test_cuda_host_model.py builds
// and runs it, since no GPU is needed for what it checks. It cannot see races or the real tensor-core
// numerics: those need a GPU.
//
// run_block mirrors implicit_gemm_kernel's phases, one thread after another between its barriers.
// Shared memory is poisoned before each block and every output starts at a sentinel, so a table entry
// read before it is written, or an element never written, shows as an error; the channels beside an
// output's channel slice must keep the sentinel.
//
// Usage: implicit_gemm_host_model [random conv cases per dtype] [seed]; prints one line per dtype and
// exits non-zero on any failure (each printed with its case).
#define FASTCNN_GEMM_HOST_MODEL
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "conv2d_problems.cuh"
#include "linear_problem.cuh"

using namespace fastcnn;
using namespace fastcnn::cuda::gemm;

namespace {

constexpr double kSentinel = 12345.0;

template <class T> double to_double(T v) { return double(to_acc(v)); }
template <class T> T from_double(double v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(v));
  else return T(v);
}
template <class T> int dtype_code() {  // as fastcnn/_native.py numbers them
  return std::is_same_v<T, float> ? 0 : std::is_same_v<T, __half> ? 1 : std::is_same_v<T, __nv_bfloat16> ? 2 : 3;
}
// Relative error allowed per sqrt(term): the inputs are rounded to T, the sums run in float32 (float64
// for double), so this is T's or float32's rounding.
template <class T> double tolerance() {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return 3e-2;
  else if constexpr (std::is_same_v<T, __half>) return 4e-3;
  else if constexpr (std::is_same_v<T, float>) return 1e-4;
  else return 1e-10;
}

// One grid's worth of implicit_gemm_kernel blocks, then split_sum_kernel's sums.
template <class T, class Prob>
void run_grid(const Prob& prob, int64_t max_M, int64_t Z, SplitPlan plan, typename math_for_t<T>::F* partial) {
  using Math = math_for_t<T>;
  using B = Block<T, Math, Prob>;
  constexpr bool warp_mma = sizeof(T) == 2;  // WMMA: one accumulator per warp, driven by its first thread
  const int64_t gx = ceil_div(max_M, Math::BM), gy = ceil_div(prob.N, Math::BN), gz = Z * plan.splits;
  auto s = std::make_unique<typename B::Shared>();
  std::vector<typename Math::Acc> acc(B::THREADS);
  std::vector<typename B::Regs> regs(B::THREADS);
  for (int64_t bz = 0; bz < gz; ++bz)
    for (int64_t by = 0; by < gy; ++by)
      for (int64_t bx = 0; bx < gx; ++bx) {
        std::memset(static_cast<void*>(s.get()), 0xCD, sizeof(*s));
        const int64_t z = bz / plan.splits, split = bz % plan.splits;
        Prob p = prob;
        p.select(z);
        const int64_t m0 = bx * B::BM, n0 = by * B::BN;
        if (m0 >= p.M) continue;
        const int64_t k_begin = split * plan.chunk_k;
        const int64_t k_end = plan.splits > 1 ? std::min(p.K, k_begin + plan.chunk_k) : p.K;
        for (int t = 0; t < B::THREADS; ++t) {
          Math::zero(acc[t]);
          B::build_outer(p, *s, t, m0, n0);
          B::build_inner(p, *s, t, k_begin, k_end);
        }
        if (k_begin < k_end)
          for (int t = 0; t < B::THREADS; ++t) B::load(p, *s, t, regs[t]);
        for (int64_t k0 = k_begin; k0 < k_end; k0 += B::BK) {
          const bool more = k0 + B::BK < k_end;
          for (int t = 0; t < B::THREADS; ++t) B::store(p, *s, t, regs[t]);
          if (more)
            for (int t = 0; t < B::THREADS; ++t) B::build_inner(p, *s, t, k0 + B::BK, k_end);
          if (more)
            for (int t = 0; t < B::THREADS; ++t) B::load(p, *s, t, regs[t]);
          for (int t = 0; t < B::THREADS; ++t)
            if (!warp_mma || t % 32 == 0) Math::mma(s->tiles, acc[t], t);
        }
        for (int t = 0; t < B::THREADS; ++t)
          Math::readout(s->tiles, acc[warp_mma ? t / 32 * 32 : t], t, [&](int r, int c, typename Math::F v) {
            B::emit(p, *s, m0, n0, z, split, plan.splits, partial, r, c, v);
          });
      }
  if (plan.splits > 1)
    for (int64_t i = 0; i < Z * prob.M * prob.N; ++i) split_sum_one(prob, plan.splits, partial, i);
}

// A 4-D tensor inside a larger buffer: `lead` elements in (misaligning 16-byte loads when odd), and
// for a channel slice, `extra` more channels in the containing tensor with the slice at `offset`.
template <class T> struct Tensor4 {
  std::vector<T> buf;
  int64_t stride[4], start;
  T* data() { return buf.data() + start; }
  T& at(int64_t a, int64_t b, int64_t c, int64_t d) {
    return buf[start + a * stride[0] + b * stride[1] + c * stride[2] + d * stride[3]];
  }
};

enum Layout { kNCHW = 0, kNHWC = 1 };

template <class T>
Tensor4<T> make_tensor(const int64_t (&shape)[4], Layout layout, int64_t extra, int64_t offset, int64_t lead,
                       std::mt19937& rng, bool random) {
  const auto [n, c, h, w] = shape;
  const int64_t all_c = c + extra;
  Tensor4<T> t;
  if (layout == kNCHW) { t.stride[3] = 1; t.stride[2] = w; t.stride[1] = h * w; t.stride[0] = all_c * h * w; }
  else { t.stride[1] = 1; t.stride[3] = all_c; t.stride[2] = w * all_c; t.stride[0] = h * w * all_c; }
  t.start = lead + offset * t.stride[1];
  t.buf.resize(lead + n * all_c * h * w);
  std::uniform_real_distribution<double> uniform(-1, 1);
  for (auto& v : t.buf) v = from_double<T>(random ? uniform(rng) : kSentinel);
  return t;
}

struct ConvCase {
  int64_t N, C, H, W, K, R, S, sh, sw, pt, pl, pb, pr, dh, dw, groups;
  Layout x_layout, w_layout, out_layout;
  int64_t extra, lead;  // channels beside the output's slice (and the input's); leading elements
  bool bias, residual;
  int act;
};

void print_case(const char* dtype, const ConvCase& c) {
  std::printf("FAIL %s N%ld C%ld H%ld W%ld K%ld %ldx%ld stride %ld,%ld pad %ld,%ld,%ld,%ld dil %ld,%ld groups %ld "
              "layouts x%d w%d out%d extra %ld lead %ld bias %d residual %d act %d: ",
              dtype, c.N, c.C, c.H, c.W, c.K, c.R, c.S, c.sh, c.sw, c.pt, c.pl, c.pb, c.pr, c.dh, c.dw, c.groups,
              c.x_layout, c.w_layout, c.out_layout, c.extra, c.lead, c.bias, c.residual, c.act);
}

double relative(double expected, double got) { return std::fabs(expected - got) / (1 + std::fabs(expected)); }

// Forward, input gradient and weight gradient of one convolution; true when all three are right.
template <class T> bool check_conv(const ConvCase& c, const char* dtype, std::mt19937& rng) {
  const int64_t OH = (c.H + c.pt + c.pb - c.dh * (c.R - 1) - 1) / c.sh + 1;
  const int64_t OW = (c.W + c.pl + c.pr - c.dw * (c.S - 1) - 1) / c.sw + 1;
  if (OH < 1 || OW < 1) return true;
  const int64_t cg = c.C / c.groups, kg = c.K / c.groups;
  const ConvGeometry g{c.N, c.C, c.H, c.W, c.K, c.R, c.S, OH, OW, c.sh, c.sw, c.pt, c.pl, c.dh, c.dw, c.groups};
  const int64_t x_shape[4] = {c.N, c.C, c.H, c.W}, w_shape[4] = {c.K, cg, c.R, c.S}, y_shape[4] = {c.N, c.K, OH, OW};
  auto x = make_tensor<T>(x_shape, c.x_layout, c.extra, c.extra ? 1 : 0, c.lead, rng, true);
  auto w = make_tensor<T>(w_shape, c.w_layout, 0, 0, c.lead, rng, true);
  auto y = make_tensor<T>(y_shape, c.out_layout, c.extra, c.extra ? 2 : 0, c.lead, rng, false);
  auto dy = make_tensor<T>(y_shape, c.out_layout, 0, 0, 0, rng, true);  // the residual, then the gradient
  std::vector<T> bias(c.K);
  std::uniform_real_distribution<double> uniform(-1, 1);
  for (auto& b : bias) b = from_double<T>(uniform(rng));
  // the taps of output pixel (n, k, oh, ow) and input pixel (n, group * cg + ci, ih, iw), weight (k, ci, r, s)
  auto for_each_tap = [&](auto&& visit) {
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t k = 0; k < c.K; ++k)
        for (int64_t oh = 0; oh < OH; ++oh)
          for (int64_t ow = 0; ow < OW; ++ow)
            for (int64_t ci = 0; ci < cg; ++ci)
              for (int64_t r = 0; r < c.R; ++r)
                for (int64_t s = 0; s < c.S; ++s) {
                  const int64_t ih = oh * c.sh - c.pt + r * c.dh, iw = ow * c.sw - c.pl + s * c.dw;
                  if (ih >= 0 && ih < c.H && iw >= 0 && iw < c.W) visit(n, k, oh, ow, k / kg * cg + ci, ci, ih, iw, r, s);
                }
  };

  auto fwd = make_conv_forward<T>(x.data(), x.stride, w.data(), w.stride, c.bias ? bias.data() : nullptr,
                                  c.residual ? dy.data() : nullptr, dy.stride, y.data(), y.stride, g, c.act);
  run_grid<T>(fwd, fwd.M, c.groups, SplitPlan{1, 0}, nullptr);
  std::vector<double> y_ref(c.N * c.K * OH * OW, 0.0);
  auto y_index = [&](int64_t n, int64_t k, int64_t oh, int64_t ow) { return ((n * c.K + k) * OH + oh) * OW + ow; };
  for_each_tap([&](int64_t n, int64_t k, int64_t oh, int64_t ow, int64_t ch, int64_t ci, int64_t ih, int64_t iw,
                   int64_t r, int64_t s) { y_ref[y_index(n, k, oh, ow)] += to_double(x.at(n, ch, ih, iw)) * to_double(w.at(k, ci, r, s)); });
  double fwd_err = 0;
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t k = 0; k < c.K; ++k)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          double v = y_ref[y_index(n, k, oh, ow)] + (c.bias ? to_double(bias[k]) : 0) +
                     (c.residual ? to_double(dy.at(n, k, oh, ow)) : 0);
          fwd_err = std::max(fwd_err, relative(apply_act<double>(v, Act(c.act)), to_double(y.at(n, k, oh, ow))));
        }
  bool outside_written = false;  // the channels just beside the output's slice
  for (int64_t n = 0; n < c.N && c.extra; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t ch : {int64_t(-2), int64_t(-1), c.K, c.K + c.extra - 3})
          if (ch + 2 >= 0 && ch + 2 < c.K + c.extra && !(ch >= 0 && ch < c.K))
            outside_written |= to_double(y.at(n, ch, oh, ow)) != to_double(from_double<T>(kSentinel));

  auto dx = make_tensor<T>(x_shape, c.x_layout, c.extra, c.extra ? 1 : 0, c.lead, rng, false);
  auto igrad = make_conv_input_grad<T>(dy.data(), dy.stride, w.data(), w.stride, dx.data(), dx.stride, g);
  run_grid<T>(igrad, c.N * ceil_div(c.H, c.sh) * ceil_div(c.W, c.sw), c.groups * c.sh * c.sw, SplitPlan{1, 0},
              nullptr);
  std::vector<double> dx_ref(c.N * c.C * c.H * c.W, 0.0);
  for_each_tap([&](int64_t n, int64_t k, int64_t oh, int64_t ow, int64_t ch, int64_t ci, int64_t ih, int64_t iw,
                   int64_t r, int64_t s) {
    dx_ref[((n * c.C + ch) * c.H + ih) * c.W + iw] += to_double(dy.at(n, k, oh, ow)) * to_double(w.at(k, ci, r, s));
  });
  double igrad_err = 0;
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t ch = 0; ch < c.C; ++ch)
      for (int64_t ih = 0; ih < c.H; ++ih)
        for (int64_t iw = 0; iw < c.W; ++iw)
          igrad_err = std::max(igrad_err, relative(dx_ref[((n * c.C + ch) * c.H + ih) * c.W + iw],
                                                   to_double(dx.at(n, ch, ih, iw))));

  auto dw = make_tensor<T>(w_shape, c.w_layout, 0, 0, c.lead, rng, false);
  auto wgrad = make_conv_weight_grad<T>(dy.data(), dy.stride, x.data(), x.stride, dw.data(), dw.stride, g);
  const SplitPlan plan = conv_weight_grad_plan(g, dtype_code<T>());
  std::vector<typename math_for_t<T>::F> partial(plan.splits > 1 ? plan.splits * c.K * c.R * c.S * cg : 0);
  run_grid<T>(wgrad, wgrad.M, c.groups, plan, partial.empty() ? nullptr : partial.data());
  std::vector<double> dw_ref(c.K * cg * c.R * c.S, 0.0);
  for_each_tap([&](int64_t n, int64_t k, int64_t oh, int64_t ow, int64_t ch, int64_t ci, int64_t ih, int64_t iw,
                   int64_t r, int64_t s) {
    dw_ref[((k * cg + ci) * c.R + r) * c.S + s] += to_double(dy.at(n, k, oh, ow)) * to_double(x.at(n, ch, ih, iw));
  });
  double wgrad_err = 0;
  for (int64_t k = 0; k < c.K; ++k)
    for (int64_t ci = 0; ci < cg; ++ci)
      for (int64_t r = 0; r < c.R; ++r)
        for (int64_t s = 0; s < c.S; ++s)
          wgrad_err = std::max(wgrad_err, relative(dw_ref[((k * cg + ci) * c.R + r) * c.S + s],
                                                   to_double(dw.at(k, ci, r, s))));

  const double bound = tolerance<T>() * std::sqrt(double(cg * c.R * c.S + c.N * OH * OW));
  if (fwd_err <= bound && igrad_err <= bound && wgrad_err <= bound && !outside_written) return true;
  print_case(dtype, c);
  std::printf("forward %.3g input grad %.3g weight grad %.3g (bound %.3g), slice neighbours written %d, "
              "16-byte loads fwd %d/%d igrad %d/%d wgrad %d/%d, weight-grad splits %ld\n",
              fwd_err, igrad_err, wgrad_err, bound, outside_written, fwd.a_vec, fwd.b_vec, igrad.a_vec, igrad.b_vec,
              wgrad.a_vec, wgrad.b_vec, plan.splits);
  return false;
}

// out = act(a @ b^T + bias), a (M, K) and b (N, K) each either row- or column-major.
template <class T>
bool check_linear(int64_t M, int64_t N, int64_t K, bool a_transposed, bool b_transposed, bool with_bias, int act,
                  int64_t lead, const char* dtype, std::mt19937& rng) {
  std::uniform_real_distribution<double> uniform(-1, 1);
  std::vector<T> a(lead + M * K), b(lead + N * K), out(M * N, from_double<T>(kSentinel)), bias(N);
  for (auto* v : {&a, &b, &bias})
    for (auto& e : *v) e = from_double<T>(uniform(rng));
  const int64_t a_sm = a_transposed ? 1 : K, a_sk = a_transposed ? M : 1;
  const int64_t b_sn = b_transposed ? 1 : K, b_sk = b_transposed ? N : 1;
  auto prob = make_linear<T>(a.data() + lead, a_sm, a_sk, b.data() + lead, b_sn, b_sk,
                             with_bias ? bias.data() : nullptr, out.data(), N, 1, M, N, K, act);
  const SplitPlan plan = linear_plan(M, N, K, dtype_code<T>());
  std::vector<typename math_for_t<T>::F> partial(plan.splits > 1 ? plan.splits * M * N : 0);
  run_grid<T>(prob, M, 1, plan, partial.empty() ? nullptr : partial.data());
  double err = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double v = with_bias ? to_double(bias[n]) : 0;
      for (int64_t k = 0; k < K; ++k) v += to_double(a[lead + m * a_sm + k * a_sk]) * to_double(b[lead + n * b_sn + k * b_sk]);
      err = std::max(err, relative(apply_act<double>(v, Act(act)), to_double(out[m * N + n])));
    }
  if (err <= tolerance<T>() * std::sqrt(double(K))) return true;
  std::printf("FAIL %s linear M%ld N%ld K%ld a_t %d b_t %d bias %d act %d lead %ld: error %.3g "
              "(16-byte loads %d/%d, splits %ld)\n",
              dtype, M, N, K, a_transposed, b_transposed, with_bias, act, lead, err, prob.a_vec, prob.b_vec, plan.splits);
  return false;
}

template <class T> int check_dtype(const char* dtype, int random_cases, std::mt19937& rng) {
  int failures = 0, cases = 0;
  auto run = [&](const ConvCase& c) { ++cases; failures += !check_conv<T>(c, dtype, rng); };
  // Network-like cases: 3x3 same, stride 2, the 7x7/2 stem, 1x1, an output slice, more than one N tile.
  run({2, 16, 9, 9, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, kNHWC, kNHWC, kNHWC, 0, 0, true, true, 1});
  run({2, 16, 12, 12, 24, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, kNHWC, kNHWC, kNHWC, 0, 0, true, false, 1});
  run({1, 3, 13, 13, 8, 7, 7, 2, 2, 3, 3, 3, 3, 1, 1, 1, kNCHW, kNCHW, kNCHW, 0, 0, true, false, 1});
  run({2, 32, 16, 16, 16, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, kNHWC, kNHWC, kNHWC, 0, 0, false, false, 0});
  run({2, 16, 7, 7, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, kNHWC, kNHWC, kNHWC, 8, 0, true, false, 1});
  run({2, 16, 6, 6, 136, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, kNHWC, kNHWC, kNHWC, 8, 0, true, true, 1});
  run({1, 136, 6, 6, 16, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, kNHWC, kNHWC, kNHWC, 0, 0, true, true, 1});
  run({2, 16, 5, 6, 16, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, kNHWC, kNHWC, kNHWC, 0, 0, false, false, 0});  // pad bottom/right
  std::uniform_int_distribution<int> any(0, 1 << 30);
  auto pick = [&](std::initializer_list<int64_t> values) { return values.begin()[any(rng) % values.size()]; };
  for (int i = 0; i < random_cases; ++i) {
    const int64_t groups = pick({1, 1, 1, 2, 3}), cg = pick({1, 2, 3, 8, 16, 24});
    int64_t kg = pick({1, 2, 5, 8, 16});
    if (cg == 1 && kg == 1) kg = 2;  // depthwise has its own kernels
    ConvCase c{pick({1, 2, 3}), cg * groups, pick({1, 2, 5, 8, 11}), pick({1, 3, 8, 9}), kg * groups,
               pick({1, 2, 3, 5}), pick({1, 2, 3}), pick({1, 2, 3}), pick({1, 2}), pick({0, 1, 2}), pick({0, 1}),
               pick({0, 1, 2}), pick({0, 1}), pick({1, 1, 2}), pick({1, 2}), groups, Layout(pick({0, 1})),
               Layout(pick({0, 1})), Layout(pick({0, 1})), pick({0, 0, 8, 3}), pick({0, 0, 8, 1}),
               bool(any(rng) % 2), bool(any(rng) % 2), int(any(rng) % 4)};
    run(c);
  }
  for (int64_t M : {1, 3, 17, 130})
    for (int64_t N : {1, 8, 24, 129})
      for (int64_t K : {1, 8, 16, 40, 300})
        for (int t = 0; t < 4; ++t) {
          ++cases;
          failures += !check_linear<T>(M, N, K, t & 1, t & 2, (M + N) % 2, int((M + K) % 4), K % 3 == 0 ? 8 : 0,
                                       dtype, rng);
        }
  std::printf("%s: %d cases, %d failures\n", dtype, cases, failures);
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  const int random_cases = argc > 1 ? std::atoi(argv[1]) : 40;
  std::mt19937 rng(argc > 2 ? unsigned(std::atoi(argv[2])) : 42u);
  int failures = check_dtype<float>("float32", random_cases, rng);
  failures += check_dtype<double>("float64", random_cases, rng);
  failures += check_dtype<__half>("float16", random_cases, rng);
  failures += check_dtype<__nv_bfloat16>("bfloat16", random_cases / 2, rng);
  std::fflush(stdout);
  return failures != 0;
}
