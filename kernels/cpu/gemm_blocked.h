// The packed, cache-blocked GEMM core behind conv2d (forward, input grad, weight
// grad) and linear: C[M, N] = A[M, K] * B[K, N] per group, with a fused epilogue.
//
// A problem type supplies the operands and the epilogue; the core owns blocking,
// threading and the register-blocked micro-kernel. The problem interface:
//   using Row;                          per-row facts (a pixel, a channel) set up once per tile
//   static constexpr bool kPrepackB;    true: B is packed once per call (weights); false: per tile
//   int64_t groups, M, N, K, k_run, k_align;   per-group sizes; K blocks never straddle a
//                                       multiple of k_run, and start at multiples of k_align (0: 1)
//   void rows(int64_t m0, int64_t count, Row*);
//   void a_block(g, const Row* rows, nrows, k0, kl, F* buf, APanel<F>* panels);
//       one APanel per MR rows: a pointer into the source where the rows are evenly
//       spaced and need no conversion (no copy at all), else into buf, packed;
//       a null pointer where the block is all zeros (skipped)
//   void pack_b(g, n0, ncols, k0, kl, F* dst);   [kl][NR], columns past ncols zero
//   (kPrepackB false) void pack_b_block(g, n0, ncols, k0, kl, F* dst);   every panel of an
//       N block, each [kl][NR], kl * NR apart: the problem picks the order it reads B in
//   (kPrepackB false) bool a_in_place;   whether a_block reads A's full panels in place
//       (else it packs them): the plan weighs reading A again against packing B again
//   void store(g, const Row* rows, nrows, n0, ncols, F* tile);   tile [MR][NR], scratch the
//       epilogue may work in (activate_tile)
//   optionally void prefetch_store(g, const Row* rows, nrows, n0, ncols);   asks for the
//       memory store() will touch, so that it arrives while the tile's last K block runs
//   optionally bool uneven_rows and int64_t row_cost(m0, count);   where uneven_rows, tiles
//       of equal size differ in work (a_block skips blocks): row_cost gives the work of rows
//       m0.., and threads get ranges of tiles of equal work
// Every output tile is owned by one thread and reduces its K blocks in order, so
// results are the same bits on any thread count (K blocking depends on the shape,
// dtype and layout only; the M/N split, which may follow the thread count, does not
// change any element's summation order).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "act_vector.h"

#include "fastcnn/cpu_parallel.h"
#include "fastcnn/scalar.h"

namespace fastcnn::cpu::gemm {

// 32-byte vectors: one ymm register under AVX2, two xmm registers in the base variant.
template <class F> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(32), aligned(4))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(32), aligned(8))); };
// 64-byte vectors: a whole tile row (NR columns) in one zmm register under AVX-512.
template <class F> struct WideVec;
template <> struct WideVec<float> { typedef float type __attribute__((vector_size(64), aligned(4))); };
template <> struct WideVec<double> { typedef double type __attribute__((vector_size(64), aligned(8))); };

constexpr int MR = 6;                               // rows per micro-tile
template <class F> constexpr int kLanes = 32 / int(sizeof(F));
template <class F> constexpr int kNR = 2 * kLanes<F>;  // columns: 6 x 16 floats = 12 accumulators

constexpr int64_t kKcTarget = 256;  // a 256 x 16 float B panel (16 KB) stays in L1
constexpr int64_t kMcTarget = 144;  // 144 x 256 floats of A (144 KB) stay in L2
constexpr int64_t kNcTarget = 256;
// Accumulator elements one task may hold when it runs every M block of its N block
// (Plan::m_inside): 1 MB of floats, about Zen 4's L2.
constexpr int64_t kMInsideElements = 1 << 18;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// MR rows of A: element (i, k) at ptr[i * rs + k * cs], or, split into segments of
// seg_len (> 0) k values, element (i, seg * seg_len + t) at ptr[i * rs + seg * seg_stride + t * cs]
// (one segment per kernel row of a convolution read in place). Irregular (cs == 1
// only): row i starts at ptr + row_off[i] instead of ptr + i * rs (a convolution's
// pixels read in place across an output row's end; row_off[0] = 0).
template <class F> struct APanel {
  const F* ptr;
  int64_t rs, cs;
  int64_t seg_len = 0, seg_stride = 0;
  bool irregular = false;
  int64_t row_off[MR] = {};
};

// By reference, not by value: a 32-byte vector return would change the base variant's ABI.
template <class V, class F> FASTCNN_ALWAYS_INLINE void vload(V& v, const F* p) {
  std::memcpy(&v, p, sizeof(V));
}
template <class V, class F> FASTCNN_ALWAYS_INLINE void vstore(F* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// The six row starts of segment `seg` of a unit-K panel (evenly spaced or irregular).
template <class F> struct PanelRows {
  const F *r0, *r1, *r2, *r3, *r4, *r5;
};
template <class F>
FASTCNN_ALWAYS_INLINE PanelRows<F> panel_rows(const APanel<F>& a, int64_t seg) {
  const F* r0 = a.ptr + seg * a.seg_stride;
  if (a.irregular)
    return {r0, r0 + a.row_off[1], r0 + a.row_off[2], r0 + a.row_off[3], r0 + a.row_off[4], r0 + a.row_off[5]};
  return {r0, r0 + a.rs, r0 + 2 * a.rs, r0 + 3 * a.rs, r0 + 4 * a.rs, r0 + 5 * a.rs};
}

// c[MR][NR] (+)= A panel * B panel ([kc][NR]). kUnitK: A rows are contiguous in k.
// kHalf: only the first L columns are in use (a layer with at most L output channels,
// LeNet-5's first conv has 6): half the FMAs and B loads; the other half of c is
// left as it was. Twelve named accumulators (arrays invite spills); one broadcast
// live at a time.
template <class F, bool kUnitK, bool kHalf = false>
FASTCNN_ALWAYS_INLINE void micro_kernel(int64_t kc, const APanel<F>& a, const F* b, F* c, bool accumulate) {
  using V = typename Vec<F>::type;
  constexpr int L = kLanes<F>, NR = kNR<F>;
  V c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{}, c40{}, c41{}, c50{}, c51{};
  if (accumulate) {
    vload(c00, c + 0 * NR), vload(c10, c + 1 * NR), vload(c20, c + 2 * NR);
    vload(c30, c + 3 * NR), vload(c40, c + 4 * NR), vload(c50, c + 5 * NR);
    if constexpr (!kHalf) {
      vload(c01, c + 0 * NR + L), vload(c11, c + 1 * NR + L), vload(c21, c + 2 * NR + L);
      vload(c31, c + 3 * NR + L), vload(c41, c + 4 * NR + L), vload(c51, c + 5 * NR + L);
    }
  }
#define FASTCNN_GEMM_ROW(i, x)             \
  {                                        \
    const F a_ = (x);                      \
    c##i##0 += b0 * a_;                    \
    if constexpr (!kHalf) c##i##1 += b1 * a_; \
  }
  const int64_t seg_len = a.seg_len > 0 ? a.seg_len : kc;
  for (int64_t k0 = 0, seg = 0; k0 < kc; k0 += seg_len, ++seg) {
    const int64_t len = std::min(seg_len, kc - k0);
    if constexpr (kUnitK) {
      const auto [r0, r1, r2, r3, r4, r5] = panel_rows(a, seg);
      for (int64_t k = 0; k < len; ++k) {
        V b0, b1;
        vload(b0, b);
        if constexpr (!kHalf) vload(b1, b + L);
        b += NR;
        FASTCNN_GEMM_ROW(0, r0[k]) FASTCNN_GEMM_ROW(1, r1[k]) FASTCNN_GEMM_ROW(2, r2[k])
        FASTCNN_GEMM_ROW(3, r3[k]) FASTCNN_GEMM_ROW(4, r4[k]) FASTCNN_GEMM_ROW(5, r5[k])
      }
    } else {
      const F* ak = a.ptr + seg * a.seg_stride;
      const int64_t rs = a.rs, cs = a.cs;
      for (int64_t k = 0; k < len; ++k) {
        V b0, b1;
        vload(b0, b);
        if constexpr (!kHalf) vload(b1, b + L);
        b += NR;
        FASTCNN_GEMM_ROW(0, ak[0]) FASTCNN_GEMM_ROW(1, ak[rs]) FASTCNN_GEMM_ROW(2, ak[2 * rs])
        FASTCNN_GEMM_ROW(3, ak[3 * rs]) FASTCNN_GEMM_ROW(4, ak[4 * rs]) FASTCNN_GEMM_ROW(5, ak[5 * rs])
        ak += cs;
      }
    }
  }
#undef FASTCNN_GEMM_ROW
  vstore(c + 0 * NR, c00), vstore(c + 1 * NR, c10), vstore(c + 2 * NR, c20);
  vstore(c + 3 * NR, c30), vstore(c + 4 * NR, c40), vstore(c + 5 * NR, c50);
  if constexpr (!kHalf) {
    vstore(c + 0 * NR + L, c01), vstore(c + 1 * NR + L, c11), vstore(c + 2 * NR + L, c21);
    vstore(c + 3 * NR + L, c31), vstore(c + 4 * NR + L, c41), vstore(c + 5 * NR + L, c51);
  }
}

// The same product with one 64-byte accumulator per tile row, for the AVX-512 variant:
// six FMAs per k whose A operand is a broadcast from memory (one instruction each)
// where the 32-byte form needs twelve FMAs and six separate broadcasts. Same panels,
// same B layout, same summation order per element (k ascending), so the same bits.
template <class F, bool kUnitK>
FASTCNN_ALWAYS_INLINE void micro_kernel_wide(int64_t kc, const APanel<F>& a, const F* b, F* c, bool accumulate) {
  using V = typename WideVec<F>::type;
  constexpr int NR = kNR<F>;
  static_assert(sizeof(V) == NR * sizeof(F), "a wide vector holds one tile row");
  V c0{}, c1{}, c2{}, c3{}, c4{}, c5{};
  if (accumulate) {
    vload(c0, c + 0 * NR), vload(c1, c + 1 * NR), vload(c2, c + 2 * NR);
    vload(c3, c + 3 * NR), vload(c4, c + 4 * NR), vload(c5, c + 5 * NR);
  }
  const int64_t seg_len = a.seg_len > 0 ? a.seg_len : kc;
  for (int64_t k0 = 0, seg = 0; k0 < kc; k0 += seg_len, ++seg) {
    const int64_t len = std::min(seg_len, kc - k0);
    if constexpr (kUnitK) {
      const auto [r0, r1, r2, r3, r4, r5] = panel_rows(a, seg);
      for (int64_t k = 0; k < len; ++k) {
        V bk;
        vload(bk, b);
        b += NR;
        c0 += bk * r0[k], c1 += bk * r1[k], c2 += bk * r2[k];
        c3 += bk * r3[k], c4 += bk * r4[k], c5 += bk * r5[k];
      }
    } else {
      const F* ak = a.ptr + seg * a.seg_stride;
      const int64_t rs = a.rs, cs = a.cs;
      for (int64_t k = 0; k < len; ++k) {
        V bk;
        vload(bk, b);
        b += NR;
        c0 += bk * ak[0], c1 += bk * ak[rs], c2 += bk * ak[2 * rs];
        c3 += bk * ak[3 * rs], c4 += bk * ak[4 * rs], c5 += bk * ak[5 * rs];
        ak += cs;
      }
    }
  }
  vstore(c + 0 * NR, c0), vstore(c + 1 * NR, c1), vstore(c + 2 * NR, c2);
  vstore(c + 3 * NR, c3), vstore(c + 4 * NR, c4), vstore(c + 5 * NR, c5);
}

// Shared epilogue of one tile row: out[j] = act(tile[j] + bias[j] + row_bias + residual[j]),
// rounded once to T. bias/residual may be null; strides in elements. One pass per
// element; the common cases (stride 1, no act or ReLU) get loops the compiler vectorises.
template <class T>
FASTCNN_ALWAYS_INLINE void store_row(const acc_t<T>* tile, int64_t cnt, T* out, int64_t out_stride,
                                     const T* bias, acc_t<T> row_bias, const T* residual,
                                     int64_t residual_stride, Act act) {
  using F = acc_t<T>;
  if constexpr (std::is_same_v<T, F>) {
    if (cnt == kNR<F> && out_stride == 1 && (residual == nullptr || residual_stride == 1) &&
        (act == Act::none || act == Act::relu)) {  // a whole row: two vectors, same sums
      using V = typename Vec<F>::type;
      constexpr int L = kLanes<F>;
      V v0, v1;
      vload(v0, tile), vload(v1, tile + L);
      v0 += row_bias, v1 += row_bias;
      if (bias != nullptr) {
        V b0, b1;
        vload(b0, bias), vload(b1, bias + L);
        v0 += b0, v1 += b1;
      }
      if (residual != nullptr) {
        V r0, r1;
        vload(r0, residual), vload(r1, residual + L);
        v0 += r0, v1 += r1;
      }
      if (act == Act::relu) {  // NaN passes, as below
        const V zero{};
        v0 = v0 < zero ? zero : v0;
        v1 = v1 < zero ? zero : v1;
      }
      vstore(out, v0), vstore(out + L, v1);
      return;
    }
  }
  F v[kNR<F>];
  if (bias != nullptr) {
    for (int64_t j = 0; j < cnt; ++j) v[j] = tile[j] + row_bias + load(bias, j);
  } else {
    for (int64_t j = 0; j < cnt; ++j) v[j] = tile[j] + row_bias;
  }
  if (residual != nullptr) {
    if (residual_stride == 1) {  // channels_last: a loop the compiler vectorises
      for (int64_t j = 0; j < cnt; ++j) v[j] += load(residual, j);
    } else {
      for (int64_t j = 0; j < cnt; ++j) v[j] += load(residual, j * residual_stride);
    }
  }
  if (out_stride == 1 && (act == Act::relu || act == Act::none)) {
    if (act == Act::relu) {
      for (int64_t j = 0; j < cnt; ++j) store(out, j, v[j] < F(0) ? F(0) : v[j]);  // NaN passes
    } else {
      for (int64_t j = 0; j < cnt; ++j) store(out, j, v[j]);
    }
    return;
  }
  if (act == Act::tanh || act == Act::sigmoid) {
    act_vector::apply_row(v, cnt, act);
    for (int64_t j = 0; j < cnt; ++j) store(out, j * out_stride, v[j]);
    return;
  }
  for (int64_t j = 0; j < cnt; ++j) store(out, j * out_stride, apply_act(v[j], act));
}

// tanh or sigmoid of a whole tile in place, after adding a per-column bias (null: none):
// tile rows hold NR values (the first ncols in use), so whole vectors go in and out.
// Row by row through store_row, a partial row copied into a vector and back stalls
// store forwarding (~40 cycles a row: most of LeNet-5's tanh convolutions).
// Returns false (tile untouched) where store_row must do it: double, other acts.
template <class T>
FASTCNN_ALWAYS_INLINE bool activate_tile(acc_t<T>* tile, int64_t nrows, int64_t ncols, const T* col_bias, Act act) {
  using F = acc_t<T>;
  if constexpr (!std::is_same_v<F, float>) {
    return false;
  } else {
    if (act != Act::tanh && act != Act::sigmoid) return false;
    constexpr int NR = kNR<F>;
    alignas(32) F bias_row[NR] = {};
    if (col_bias != nullptr)
      for (int64_t j = 0; j < ncols; ++j) bias_row[j] = F(to_float(col_bias[j]));
    act_vector::f8 b0, b1;
    vload(b0, bias_row);
    vload(b1, bias_row + 8);
    const bool two = ncols > 8;
    for (int64_t i = 0; i < nrows; ++i) {
      F* row = tile + i * NR;
      act_vector::f8 x0, x1;
      vload(x0, row);
      x0 += b0;
      act_vector::apply8(x0, act);
      vstore(row, x0);
      if (two) {
        vload(x1, row + 8);
        x1 += b1;
        act_vector::apply8(x1, act);
        vstore(row + 8, x1);
      }
    }
    return true;
  }
}

// Aligned scratch owned by one thread.
template <class F> class Scratch {
 public:
  explicit Scratch(int64_t n)
      : p_(static_cast<F*>(std::aligned_alloc(64, size_t(round_up(std::max<int64_t>(n, 1) * int64_t(sizeof(F)), 64))))) {
    if (p_ == nullptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  F* get() const { return p_; }

 private:
  F* p_;
};

// Block sizes and the task grid (groups x N blocks x M blocks, or x 1 with m_inside) of one call.
struct Plan {
  int64_t groups, M, N, K;
  int64_t k_run, kc, k_subs, k_blocks;
  int64_t mc, nc, m_blocks, n_blocks, n_panels;
  bool prepacked;
  bool m_inside;  // a task runs every M block of its N block, over one packing of each B block

  int64_t m_per_task() const { return m_inside ? m_blocks : 1; }
  int64_t m_tasks() const { return m_inside ? 1 : m_blocks; }
  int64_t tasks() const { return groups * m_tasks() * n_blocks; }
  void k_block(int64_t kb, int64_t& k0, int64_t& kl) const {
    const int64_t run = kb / k_subs, sub = kb % k_subs;
    k0 = run * k_run + sub * kc;
    kl = std::min(kc, k_run - sub * kc);
  }
};

// K blocking depends on the shape only (it fixes the summation order); the M/N
// split also looks at the thread count, to hand every thread the same work.
// a_cost: one A element read into a tile against one B element packed (read and
// written: 2), for the choice of m_inside. uneven_rows: rows differ in work (row_cost),
// so M is cut finer, for ranges of equal work to be cut from.
inline Plan make_plan(int64_t groups, int64_t M, int64_t N, int64_t K, int64_t k_run, int64_t k_align,
                      int64_t nr, bool prepacked, int64_t threads, int64_t a_cost = 1, bool uneven_rows = false) {
  Plan p{};
  p.groups = groups;
  p.M = M;
  p.N = N;
  p.K = K;
  p.k_run = k_run;
  p.k_subs = ceil_div(k_run, kKcTarget);
  p.kc = round_up(ceil_div(k_run, p.k_subs), std::max<int64_t>(k_align, 1));
  p.k_subs = ceil_div(k_run, p.kc);
  p.k_blocks = (K / k_run) * p.k_subs;
  p.n_panels = ceil_div(N, nr);
  const int64_t m_max = ceil_div(M, MR), n_max = p.n_panels;
  // Grow one split until every thread gets the same number of tiles: M first where B
  // is packed once (free to split), N first where each tile packs its own B.
  const auto balance = [&](int64_t& blocks, int64_t max_blocks, int64_t others) {
    for (int64_t b = blocks; b <= std::min(max_blocks, blocks + threads); ++b) {
      if ((others * b) % threads == 0) {
        blocks = b;
        return;
      }
    }
  };
  int64_t m_blocks = ceil_div(M, kMcTarget), n_blocks = ceil_div(N, kNcTarget);
  if (uneven_rows && threads > 1) m_blocks = std::max(m_blocks, std::min(8 * threads, ceil_div(M, 4 * MR)));
  if (threads > 1 && groups * m_blocks * n_blocks < 8 * threads) {
    if (prepacked) {
      balance(m_blocks, m_max, groups * n_blocks);
      if ((groups * m_blocks * n_blocks) % threads != 0) balance(n_blocks, n_max, groups * m_blocks);
    } else {
      balance(n_blocks, n_max, groups * m_blocks);
      if ((groups * m_blocks * n_blocks) % threads != 0) balance(m_blocks, m_max, groups * n_blocks);
    }
  }
  // B packed per tile (kPrepackB false) and several M blocks: a task per (M, N) block packs
  // each B block m_blocks times over (VGG-16's 512->512 3x3 weight gradient at 28x28: ~20%
  // of its time). A task may instead run every M block of its N block on one packing of
  // each B block, with N blocks narrow enough for all their accumulators to fit in about
  // L2; it then reads A once per N block. Taken where that moves less: A read n_blocks
  // times and B packed once, against m_blocks times (ResNet-50's 512->2048 1x1 at 7x7, A
  // packed, lost 10% with A read six times where it was read twice).
  const int64_t m_rows = round_up(M + ceil_div(M, kMcTarget) * MR, MR);  // bounds m_blocks * mc
  const int64_t nc_inside = std::min(kNcTarget, kMInsideElements / m_rows / nr * nr);
  if (!prepacked && m_blocks > 1 && nc_inside > 0 && groups * n_max >= threads) {
    int64_t n_inside = ceil_div(N, nc_inside);
    if (threads > 1 && groups * n_inside < 8 * threads) balance(n_inside, n_max, groups);
    if (a_cost * M * n_inside + 2 * N < a_cost * M * n_blocks + 2 * N * m_blocks) {
      p.m_inside = true;
      m_blocks = ceil_div(M, kMcTarget);
      n_blocks = n_inside;
    }
  }
  p.mc = round_up(ceil_div(M, m_blocks), MR);
  p.m_blocks = ceil_div(M, p.mc);
  p.nc = round_up(ceil_div(N, n_blocks), nr);
  p.n_blocks = ceil_div(N, p.nc);
  p.prepacked = prepacked;
  return p;
}

template <class T, class Problem>
FASTCNN_ALWAYS_INLINE void pack_b_body(const Problem* prob, const Plan* plan, acc_t<T>* packed,
                                       int64_t begin, int64_t end) {
  using F = acc_t<T>;
  constexpr int NR = kNR<F>;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t g = t / plan->n_panels, n0 = (t % plan->n_panels) * NR;
    prob->pack_b(g, n0, std::min<int64_t>(NR, plan->N - n0), 0, plan->K, packed + t * plan->K * NR);
  }
}
FASTCNN_ISA_VARIANTS(gemm_pack_b, pack_b_body)

// Whether Problem has prefetch_store (an optional part of the interface).
template <class Problem, class = void> struct has_prefetch_store : std::false_type {};
template <class Problem>
struct has_prefetch_store<Problem, std::void_t<decltype(std::declval<const Problem&>().prefetch_store(
                                       int64_t(0), static_cast<const typename Problem::Row*>(nullptr), int64_t(0),
                                       int64_t(0), int64_t(0)))>> : std::true_type {};

// Whether Problem has uneven_rows and row_cost (an optional part of the interface).
template <class Problem, class = void> struct has_row_cost : std::false_type {};
template <class Problem>
struct has_row_cost<Problem, std::void_t<decltype(std::declval<const Problem&>().row_cost(int64_t(0), int64_t(0))),
                                         decltype(std::declval<const Problem&>().uneven_rows)>> : std::true_type {};
template <class Problem>
bool rows_uneven(const Problem& prob) {
  if constexpr (has_row_cost<Problem>::value) {
    return prob.uneven_rows;
  } else {
    return false;
  }
}

// One tile's product over a K block with the micro-kernel that fits its panel: none
// for an all-zero block, the wide one for full-width tiles in the AVX-512 variant.
template <class F, bool kWide>
FASTCNN_ALWAYS_INLINE void multiply_tile(int64_t kl, const APanel<F>& a, const F* b, F* tile, bool accumulate,
                                         bool half) {
  if (a.ptr == nullptr) {
    if (!accumulate) std::memset(tile, 0, sizeof(F) * MR * kNR<F>);
    return;
  }
  if constexpr (kWide) {
    if (!half) {
      if (a.cs == 1) {
        micro_kernel_wide<F, true>(kl, a, b, tile, accumulate);
      } else {
        micro_kernel_wide<F, false>(kl, a, b, tile, accumulate);
      }
      return;
    }
  }
  if (a.cs == 1) {
    if (half) {
      micro_kernel<F, true, true>(kl, a, b, tile, accumulate);
    } else {
      micro_kernel<F, true>(kl, a, b, tile, accumulate);
    }
  } else if (half) {
    micro_kernel<F, false, true>(kl, a, b, tile, accumulate);
  } else {
    micro_kernel<F, false>(kl, a, b, tile, accumulate);
  }
}

// kWide: the AVX-512 variant (micro_kernel_wide for full-width panels).
template <class T, bool kWide = false, class Problem>
FASTCNN_ALWAYS_INLINE void tiles_body(const Problem* prob, const Plan* plan, const acc_t<T>* packed_b,
                                      int64_t begin, int64_t end) {
  using F = acc_t<T>;
  using Row = typename Problem::Row;
  constexpr int NR = kNR<F>;
  const Plan& pl = *plan;
  const int64_t mc_pad = round_up(pl.mc, MR), nc_pad = round_up(pl.nc, NR);
  const int64_t m_run = pl.m_per_task();
  // With one K block each tile is stored as soon as it is made: one tile's scratch (in L1)
  // serves them all.
  Scratch<F> a_buf(mc_pad * pl.kc), c_buf(pl.k_blocks == 1 ? MR * NR : m_run * mc_pad * nc_pad);
  Scratch<F> b_buf(pl.prepacked ? 0 : nc_pad * pl.kc);
  std::vector<Row> rows(size_t(m_run * pl.mc));
  std::vector<APanel<F>> panels(size_t(mc_pad / MR));
  const int64_t per_group = pl.m_tasks() * pl.n_blocks;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t g = t / per_group, nb = (t % per_group) / pl.m_tasks(), mb0 = (t % pl.m_tasks()) * m_run;
    const int64_t mb_end = std::min(mb0 + m_run, pl.m_blocks);
    const int64_t n0 = nb * pl.nc, ncols = std::min(pl.nc, pl.N - n0);
    const int64_t np = ceil_div(ncols, NR);
    for (int64_t mb = mb0; mb < mb_end; ++mb)
      prob->rows(mb * pl.mc, std::min(pl.mc, pl.M - mb * pl.mc), rows.data() + (mb - mb0) * pl.mc);
    for (int64_t kb = 0; kb < pl.k_blocks; ++kb) {
      int64_t k0, kl;
      pl.k_block(kb, k0, kl);
      const F* b_block;
      int64_t b_panel_stride;
      if constexpr (Problem::kPrepackB) {
        b_block = packed_b + ((g * pl.n_panels + n0 / NR) * pl.K + k0) * NR;
        b_panel_stride = pl.K * NR;
      } else {
        prob->pack_b_block(g, n0, ncols, k0, kl, b_buf.get());
        b_block = b_buf.get();
        b_panel_stride = kl * NR;
      }
      const bool accumulate = kb > 0, last = kb == pl.k_blocks - 1;
      for (int64_t mb = mb0; mb < mb_end; ++mb) {
        const int64_t mrows = std::min(pl.mc, pl.M - mb * pl.mc), mp = ceil_div(mrows, MR);
        const Row* block_rows = rows.data() + (mb - mb0) * pl.mc;
        F* c_block = c_buf.get() + (mb - mb0) * mc_pad * nc_pad;
        prob->a_block(g, block_rows, mrows, k0, kl, a_buf.get(), panels.data());
        for (int64_t jp = 0; jp < np; ++jp) {
          const F* b = b_block + jp * b_panel_stride;
          for (int64_t ip = 0; ip < mp; ++ip) {
            F* tile = pl.k_blocks == 1 ? c_buf.get() : c_block + (ip * np + jp) * (MR * NR);
            const APanel<F>& a = panels[size_t(ip)];
            const bool half = std::min<int64_t>(NR, ncols - jp * NR) <= kLanes<F>;
            if constexpr (has_prefetch_store<Problem>::value) {
              if (last)
                prob->prefetch_store(g, block_rows + ip * MR, std::min<int64_t>(MR, mrows - ip * MR), n0 + jp * NR,
                                     std::min<int64_t>(NR, ncols - jp * NR));
            }
            multiply_tile<F, kWide>(kl, a, b, tile, accumulate, half);
            if (last)  // the epilogue runs on the tile just written, still in L1
              prob->store(g, block_rows + ip * MR, std::min<int64_t>(MR, mrows - ip * MR), n0 + jp * NR,
                          std::min<int64_t>(NR, ncols - jp * NR), tile);
          }
        }
      }
    }
  }
}
FASTCNN_ISA_VARIANTS(gemm_tiles, tiles_body)
template <class T, class... A>
FASTCNN_AVX512_TARGET __attribute__((noinline)) void gemm_tiles_avx512(A... a) {
  tiles_body<T, true>(a...);
}

// make_plan's a_cost for a problem: A packed per tile costs a read, a write and a read.
template <class Problem>
int64_t a_read_cost(const Problem& prob) {
  if constexpr (Problem::kPrepackB) {
    return 1;
  } else {
    return prob.a_in_place ? 1 : 3;
  }
}

// Elements (acc_t) of a prepacked B: per group, ceil(N / NR) panels of [K][NR]. It
// depends on the groups, N and K alone, so a B packed once (a layer's weights at
// inference) serves every call whatever M, the thread count or the K blocking.
template <class T>
inline int64_t packed_b_elements(int64_t groups, int64_t N, int64_t K) {
  constexpr int NR = kNR<acc_t<T>>;
  return groups * ceil_div(N, NR) * K * NR;
}

// Packs the whole B of a kPrepackB problem into dst (packed_b_elements long).
template <class T, class Problem>
void pack_b_into(const Problem& prob, acc_t<T>* dst) {
  constexpr int NR = kNR<acc_t<T>>;
  Plan plan{};
  plan.groups = prob.groups;
  plan.N = prob.N;
  plan.K = prob.K;
  plan.n_panels = ceil_div(prob.N, NR);
  parallel_for(plan.groups * plan.n_panels, 1, [&](int64_t begin, int64_t end) {
    FASTCNN_ISA_CALL(gemm_pack_b, T, &prob, &plan, dst, begin, end);
  });
}

// Runs the whole GEMM of `prob` on the thread pool. prepacked_b: B as pack_b_into
// left it (kPrepackB problems only), or null to pack it here.
template <class T, class Problem>
void run(const Problem& prob, const acc_t<T>* prepacked_b = nullptr) {
  using F = acc_t<T>;
  constexpr int NR = kNR<F>;
  const int64_t threads = omp_get_max_threads();
  const Plan plan = make_plan(prob.groups, prob.M, prob.N, prob.K, prob.k_run, prob.k_align, NR,
                              Problem::kPrepackB, threads, a_read_cost(prob), rows_uneven(prob));
  const bool pack_here = plan.prepacked && prepacked_b == nullptr;
  Scratch<F> packed(pack_here ? packed_b_elements<T>(plan.groups, plan.N, plan.K) : 0);
  if (pack_here) pack_b_into<T>(prob, packed.get());
  const F* packed_b = pack_here ? packed.get() : prepacked_b;
  const auto tiles = [&](int64_t begin, int64_t end) {
    if (cpu_has_avx512()) {
      gemm_tiles_avx512<T>(&prob, &plan, packed_b, begin, end);
    } else {
      FASTCNN_ISA_CALL(gemm_tiles, T, &prob, &plan, packed_b, begin, end);
    }
  };
  if constexpr (has_row_cost<Problem>::value) {
    if (prob.uneven_rows && threads > 1 && plan.tasks() > 1) {
      // Ranges of tiles of equal work, not of equal count (ResNet's 3x3/2 input gradients:
      // rows of one stride phase meet one of the nine taps, another phase's four; split by
      // count, one thread took the light phases and waited: 0.72-0.76x -> 0.9x eager).
      // Still ranges: a thread's neighbouring tiles share their B block.
      const int64_t m_tasks = plan.m_tasks(), m_run = plan.m_per_task();
      std::vector<int64_t> work_before(size_t(plan.tasks()) + 1, int64_t(0));
      for (int64_t t = 0; t < plan.tasks(); ++t) {
        const int64_t m0 = (t % m_tasks) * m_run * plan.mc;
        work_before[size_t(t) + 1] = work_before[size_t(t)] + prob.row_cost(m0, std::min(m_run * plan.mc, plan.M - m0));
      }
      std::vector<int64_t> first(size_t(threads) + 1, plan.tasks());
      first[0] = 0;
      for (int64_t c = 1; c < threads; ++c) {  // the task boundary nearest c / threads of the work
        const int64_t share = work_before.back() * c / threads;
        int64_t i = std::upper_bound(work_before.begin(), work_before.end(), share) - work_before.begin() - 1;
        if (i < plan.tasks() && work_before[size_t(i) + 1] - share < share - work_before[size_t(i)]) ++i;
        first[size_t(c)] = std::max(i, first[size_t(c) - 1]);
      }
      parallel_for(threads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) tiles(first[size_t(c)], first[size_t(c) + 1]);
      });
      return;
    }
  }
  parallel_for(plan.tasks(), 1, [&](int64_t begin, int64_t end) { tiles(begin, end); });
}

// Runs `count` independent problems (kPrepackB false) on the pool, each blocked as for
// one thread, so that every task reads whole rows of its operands; the tasks of all
// problems are shared out together. For pixel splits of a weight gradient, where the
// blocks of one problem split over threads each read a part of every pixel's channels.
template <class T, class Problem>
void run_each(const Problem* probs, int64_t count) {
  static_assert(!Problem::kPrepackB, "each problem packs its own B");
  constexpr int NR = kNR<acc_t<T>>;
  auto plans = std::vector<Plan>(size_t(count));
  std::vector<int64_t> first(size_t(count) + 1, int64_t(0));
  for (int64_t i = 0; i < count; ++i) {
    const Problem& p = probs[i];
    plans[size_t(i)] = make_plan(p.groups, p.M, p.N, p.K, p.k_run, p.k_align, NR, false, 1, a_read_cost(p));
    first[size_t(i) + 1] = first[size_t(i)] + plans[size_t(i)].tasks();
  }
  parallel_for(first.back(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t b = std::max(begin, first[size_t(i)]) - first[size_t(i)];
      const int64_t e = std::min(end, first[size_t(i) + 1]) - first[size_t(i)];
      if (b >= e) continue;
      if (cpu_has_avx512()) {
        gemm_tiles_avx512<T>(probs + i, plans.data() + i, static_cast<const acc_t<T>*>(nullptr), b, e);
      } else {
        FASTCNN_ISA_CALL(gemm_tiles, T, probs + i, plans.data() + i, static_cast<const acc_t<T>*>(nullptr), b, e);
      }
    }
  });
}

// Packs MR rows of a strided matrix A[i][k] = src[i * rs + k * cs] (count < MR rows
// valid, the rest zero) in the layout that reads the source in order.
template <class T>
FASTCNN_ALWAYS_INLINE APanel<acc_t<T>> pack_strided_a(const T* src, int64_t rs, int64_t cs, int64_t count,
                                                      int64_t kl, acc_t<T>* dst) {
  using F = acc_t<T>;
  if (cs == 1) {  // [MR][kl]
    for (int64_t i = 0; i < MR; ++i) {
      F* d = dst + i * kl;
      if (i < count) {
        const T* s = src + i * rs;
        for (int64_t k = 0; k < kl; ++k) d[k] = F(to_float(s[k]));
      } else {
        for (int64_t k = 0; k < kl; ++k) d[k] = F(0);
      }
    }
    return {dst, kl, 1};
  }
  for (int64_t k = 0; k < kl; ++k) {  // [kl][MR]
    const T* s = src + k * cs;
    for (int64_t i = 0; i < MR; ++i) dst[k * MR + i] = i < count ? F(to_float(s[i * rs])) : F(0);
  }
  return {dst, 1, MR};
}

// dst[u * ds + j] = src[j * ss + u] for u, j < 8: eight whole-vector loads, shuffles,
// eight stores. Column by column, the eight reads of one k fall a row stride apart,
// and a power-of-two stride (a 512-channel weight's) lands them in one L1 set.
FASTCNN_ALWAYS_INLINE void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  using V = Vec<float>::type;
  typedef int Mask __attribute__((vector_size(32)));
  V r0, r1, r2, r3, r4, r5, r6, r7;
  vload(r0, src), vload(r1, src + ss), vload(r2, src + 2 * ss), vload(r3, src + 3 * ss);
  vload(r4, src + 4 * ss), vload(r5, src + 5 * ss), vload(r6, src + 6 * ss), vload(r7, src + 7 * ss);
  const Mask lo2{0, 8, 1, 9, 4, 12, 5, 13}, hi2{2, 10, 3, 11, 6, 14, 7, 15};
  const V t0 = __builtin_shuffle(r0, r1, lo2), t1 = __builtin_shuffle(r0, r1, hi2);
  const V t2 = __builtin_shuffle(r2, r3, lo2), t3 = __builtin_shuffle(r2, r3, hi2);
  const V t4 = __builtin_shuffle(r4, r5, lo2), t5 = __builtin_shuffle(r4, r5, hi2);
  const V t6 = __builtin_shuffle(r6, r7, lo2), t7 = __builtin_shuffle(r6, r7, hi2);
  const Mask lo4{0, 1, 8, 9, 4, 5, 12, 13}, hi4{2, 3, 10, 11, 6, 7, 14, 15};
  const V s0 = __builtin_shuffle(t0, t2, lo4), s1 = __builtin_shuffle(t0, t2, hi4);
  const V s2 = __builtin_shuffle(t1, t3, lo4), s3 = __builtin_shuffle(t1, t3, hi4);
  const V s4 = __builtin_shuffle(t4, t6, lo4), s5 = __builtin_shuffle(t4, t6, hi4);
  const V s6 = __builtin_shuffle(t5, t7, lo4), s7 = __builtin_shuffle(t5, t7, hi4);
  const Mask lo8{0, 1, 2, 3, 8, 9, 10, 11}, hi8{4, 5, 6, 7, 12, 13, 14, 15};
  vstore(dst, __builtin_shuffle(s0, s4, lo8)), vstore(dst + 4 * ds, __builtin_shuffle(s0, s4, hi8));
  vstore(dst + ds, __builtin_shuffle(s1, s5, lo8)), vstore(dst + 5 * ds, __builtin_shuffle(s1, s5, hi8));
  vstore(dst + 2 * ds, __builtin_shuffle(s2, s6, lo8)), vstore(dst + 6 * ds, __builtin_shuffle(s2, s6, hi8));
  vstore(dst + 3 * ds, __builtin_shuffle(s3, s7, lo8)), vstore(dst + 7 * ds, __builtin_shuffle(s3, s7, hi8));
}

// Packs B[k][n] = src[k * ks + n * ns] for k < kl, n < ncols into [kl][NR].
template <class T>
FASTCNN_ALWAYS_INLINE void pack_strided_b(const T* src, int64_t ks, int64_t ns, int64_t ncols, int64_t kl,
                                          acc_t<T>* dst) {
  using F = acc_t<T>;
  constexpr int NR = kNR<F>;
  if constexpr (std::is_same_v<T, float>) {
    if (ks == 1 && ns != 1) {  // each column contiguous in k: 8 x 8 blocks transposed whole
      const int64_t kl8 = kl / 8 * 8, ncols8 = ncols / 8 * 8;
      // Eight columns down the whole run, so that only their eight source lines are live.
      for (int64_t j = 0; j < ncols8; j += 8)
        for (int64_t k = 0; k < kl8; k += 8) transpose8x8(src + k + j * ns, ns, dst + k * NR + j, NR);
      for (int64_t k = 0; k < kl8; ++k) {
        for (int64_t j = ncols8; j < ncols; ++j) dst[k * NR + j] = src[k + j * ns];
        for (int64_t j = ncols; j < NR; ++j) dst[k * NR + j] = F(0);
      }
      src += kl8;
      dst += kl8 * NR;
      kl -= kl8;
    }
  }
  for (int64_t k = 0; k < kl; ++k) {
    const T* s = src + k * ks;
    F* d = dst + k * NR;
    if (ns == 1) {
      for (int64_t j = 0; j < ncols; ++j) d[j] = F(to_float(s[j]));
    } else {
      for (int64_t j = 0; j < ncols; ++j) d[j] = F(to_float(s[j * ns]));
    }
    for (int64_t j = ncols; j < NR; ++j) d[j] = F(0);
  }
}

}  // namespace fastcnn::cpu::gemm
