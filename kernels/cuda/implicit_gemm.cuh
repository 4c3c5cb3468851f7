// The tiled GEMM core shared by conv2d forward, its input and weight gradients and linear.
//
// A problem ("Prob") describes C[m, n] = sum_k A[m, k] * B[k, n] by the address of each operand element,
// split into an outer part (the row m of A, the column n of B, fixed for a block) and an inner part (the
// reduction index k, one K tile at a time). Each part is an Entry; the element sits at
// outer.off + inner.off and exists iff 0 <= outer.h + inner.h < bound_h and likewise for w, which covers
// convolution padding (h, w are image coordinates) and the tile edges (an entry past M, N or K is
// invalid). A block computes each entry once into shared-memory tables, so the per-element gather is
// two table reads and an add; the Prob also supplies the fused epilogue emit(m, n, acc).
//
// Per K tile: global -> registers (prefetched one tile ahead) -> shared tiles -> Math (WMMA tensor
// cores for the 16-bit types, register-blocked FMA for float and double). A fixed split of K
// (plan_split, from the shape alone) writes partial tiles to a workspace that split_sum_kernel adds up
// in split order: deterministic, no atomics.
//
// FASTCNN_GEMM_HOST_MODEL (defined only by a host-side emulation of the tiling, never by the build)
// replaces the WMMA fragments by plain arrays so that every index expression here runs on a CPU.
#pragma once
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "fastcnn/cuda_scalar.cuh"
#ifndef FASTCNN_GEMM_HOST_MODEL
#include <mma.h>
#endif

#define FASTCNN_HD __host__ __device__ __forceinline__
// Unroll hints for the device pass only (the host compiler would warn about an unknown pragma).
#ifdef __CUDA_ARCH__
#define FASTCNN_UNROLL _Pragma("unroll")
#define FASTCNN_UNROLL_4 _Pragma("unroll 4")
#else
#define FASTCNN_UNROLL
#define FASTCNN_UNROLL_4
#endif
#ifdef FASTCNN_GEMM_HOST_MODEL
#define FASTCNN_WMMA_FN inline
#else
#define FASTCNN_WMMA_FN __device__ __forceinline__
#endif

namespace fastcnn::cuda::gemm {

// ---------------------------------------------------------------------------------------------------
// Element addressing

struct Entry {
  int64_t off;
  int32_t h, w;
};
// Far enough below zero that two of them, or one plus any real coordinate, stay negative.
constexpr int32_t kInvalidCoord = -(1 << 29);
FASTCNN_HD Entry invalid_entry() { return {0, kInvalidCoord, kInvalidCoord}; }
FASTCNN_HD Entry plain_entry(int64_t off) { return {off, 0, 0}; }

template <class T> FASTCNN_HD T zero_value() { return T(0); }
template <> FASTCNN_HD __half zero_value<__half>() { return __float2half_rn(0.0f); }
template <> FASTCNN_HD __nv_bfloat16 zero_value<__nv_bfloat16>() { return __float2bfloat16_rn(0.0f); }

template <class T>
FASTCNN_HD T gather(const T* p, const Entry& outer, const Entry& inner, int32_t bound_h, int32_t bound_w) {
  const int32_t h = outer.h + inner.h, w = outer.w + inner.w;
  return (uint32_t(h) < uint32_t(bound_h) && uint32_t(w) < uint32_t(bound_w)) ? p[outer.off + inner.off]
                                                                               : zero_value<T>();
}

// The same for 16 bytes of consecutive elements sharing one validity (see vec_ok).
template <class T>
FASTCNN_HD void gather_vec(const T* p, const Entry& outer, const Entry& inner, int32_t bound_h, int32_t bound_w,
                           T* dst) {
  const int32_t h = outer.h + inner.h, w = outer.w + inner.w;
  uint4 bits = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits: +0 in every type
  if (uint32_t(h) < uint32_t(bound_h) && uint32_t(w) < uint32_t(bound_w))
    bits = *reinterpret_cast<const uint4*>(p + outer.off + inner.off);
  memcpy(dst, &bits, sizeof(bits));
}

// Host-and-device loads, stores and activation for the epilogues.
FASTCNN_HD float to_acc(float v) { return v; }
FASTCNN_HD double to_acc(double v) { return v; }
FASTCNN_HD float to_acc(__half v) { return __half2float(v); }
FASTCNN_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
FASTCNN_HD void store_acc(float* p, float v) { *p = v; }
FASTCNN_HD void store_acc(double* p, double v) { *p = v; }
FASTCNN_HD void store_acc(__half* p, float v) { *p = __float2half_rn(v); }
FASTCNN_HD void store_acc(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <class F> FASTCNN_HD F activate(F v, int act) {
#ifdef __CUDA_ARCH__
  return dapply_act<F>(v, act);
#else
  return apply_act<F>(v, Act(act));
#endif
}

// What every Prob carries besides its own fields: sizes, operand bases, bounds and the load order.
// along_k: consecutive threads load consecutive k (pick it when k has the smaller stride: coalescing).
template <class T> struct GemmOperands {
  const T* a;
  const T* b;
  int64_t M, N, K;
  int32_t a_bound_h, a_bound_w, b_bound_h, b_bound_w;
  bool a_along_k, b_along_k;
  bool a_vec, b_vec;  // load 16 bytes at a time along the along_k direction (vec_ok holds)
};

// Whether an operand can be loaded 16 bytes at a time along its load direction: unit stride there, the
// base and every other stride 16-byte aligned, and the extent of the index that direction walks a
// multiple of the vector (so no vector straddles a tile edge, a kernel tap or a group).
template <class T>
inline bool vec_ok(const T* base, int64_t unit_stride, std::initializer_list<int64_t> other_strides,
                   int64_t extent) {
  constexpr int64_t V = int64_t(16 / sizeof(T));
  if (unit_stride != 1 || extent % V != 0 || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (const int64_t st : other_strides)
    if (st % V != 0) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Math: shared tiles, accumulators, the inner product and the accumulator readout.

// float / double: each thread owns a TM x TN block of C at rows ty + i * TY, columns tx + j * TX
// (interleaved: shared-memory reads are conflict-free and epilogue stores run along n across a warp).
template <class T, int BM_, int BN_, int BK_, int TM, int TN> struct SimtMath {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int TY = BM / TM, TX = BN / TN, THREADS = TY * TX;
  static constexpr int LDA = BM + 1, LDB = BN + 1;  // +1: column-order stores avoid bank conflicts
  static_assert(BM % TM == 0 && BN % TN == 0, "tile");
  using F = T;
  struct Tiles {
    T a[BK * LDA];  // a[k * LDA + m]
    T b[BK * LDB];  // b[k * LDB + n]
  };
  struct Acc {
    F v[TM][TN];
  };
  static FASTCNN_HD void put_a(Tiles& t, int m, int k, T v) { t.a[k * LDA + m] = v; }
  static FASTCNN_HD void put_b(Tiles& t, int k, int n, T v) { t.b[k * LDB + n] = v; }
  // V elements at (m, k .. k + V - 1) / (k .. k + V - 1, n).
  template <int V> static FASTCNN_HD void put_a_along_k(Tiles& t, int m, int k, const T* v) {
    FASTCNN_UNROLL
    for (int j = 0; j < V; ++j) put_a(t, m, k + j, v[j]);
  }
  template <int V> static FASTCNN_HD void put_b_along_k(Tiles& t, int k, int n, const T* v) {
    FASTCNN_UNROLL
    for (int j = 0; j < V; ++j) put_b(t, k + j, n, v[j]);
  }
  static FASTCNN_HD void zero(Acc& acc) {
    FASTCNN_UNROLL
    for (int i = 0; i < TM; ++i)
      FASTCNN_UNROLL
      for (int j = 0; j < TN; ++j) acc.v[i][j] = F(0);
  }
  static FASTCNN_HD void mma(const Tiles& t, Acc& acc, int tid) {
    const int ty = tid / TX, tx = tid % TX;
    FASTCNN_UNROLL_4
    for (int k = 0; k < BK; ++k) {
      F a[TM], b[TN];
      FASTCNN_UNROLL
      for (int i = 0; i < TM; ++i) a[i] = t.a[k * LDA + ty + i * TY];
      FASTCNN_UNROLL
      for (int j = 0; j < TN; ++j) b[j] = t.b[k * LDB + tx + j * TX];
      FASTCNN_UNROLL
      for (int i = 0; i < TM; ++i)
        FASTCNN_UNROLL
        for (int j = 0; j < TN; ++j) acc.v[i][j] = fma(a[i], b[j], acc.v[i][j]);
    }
  }
  // emit(row, col, value) for every C element of this thread (tile-local coordinates).
  template <class Emit> static FASTCNN_HD void readout(Tiles&, const Acc& acc, int tid, const Emit& emit) {
    const int ty = tid / TX, tx = tid % TX;
    FASTCNN_UNROLL
    for (int i = 0; i < TM; ++i)
      FASTCNN_UNROLL
      for (int j = 0; j < TN; ++j) emit(ty + i * TY, tx + j * TX, acc.v[i][j]);
  }
};

#ifdef FASTCNN_GEMM_HOST_MODEL
// Row-major 16x16 fragments in plain arrays: the semantics of load/store_matrix_sync and mma_sync.
struct ModelFrag {
  float x[256];
};
using FragAcc = ModelFrag;
template <class T> using FragA = ModelFrag;
template <class T> using FragB = ModelFrag;
inline void frag_fill_zero(ModelFrag& f) {
  for (float& v : f.x) v = 0.0f;
}
template <class T> inline void frag_load(ModelFrag& f, const T* p, int ld) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = float(to_acc(p[r * ld + c]));
}
template <class T> inline void frag_load_col(ModelFrag& f, const T* p, int ld) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = float(to_acc(p[c * ld + r]));
}
inline void frag_mma(ModelFrag& acc, const ModelFrag& a, const ModelFrag& b) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      float s = acc.x[r * 16 + c];
      for (int k = 0; k < 16; ++k) s += a.x[r * 16 + k] * b.x[k * 16 + c];
      acc.x[r * 16 + c] = s;
    }
}
inline void frag_store(float* p, const ModelFrag& f, int ld) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[r * ld + c] = f.x[r * 16 + c];
}
inline void warp_sync() {}
#else
using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
template <class T> using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
template <class T> using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
__device__ __forceinline__ void frag_fill_zero(FragAcc& f) { nvcuda::wmma::fill_fragment(f, 0.0f); }
template <class Frag, class T> __device__ __forceinline__ void frag_load(Frag& f, const T* p, int ld) {
  nvcuda::wmma::load_matrix_sync(f, p, unsigned(ld));
}
// The layout is part of the fragment type: the same call.
template <class Frag, class T> __device__ __forceinline__ void frag_load_col(Frag& f, const T* p, int ld) {
  nvcuda::wmma::load_matrix_sync(f, p, unsigned(ld));
}
template <class T>
__device__ __forceinline__ void frag_mma(FragAcc& acc, const FragA<T>& a, const FragB<T>& b) {
  nvcuda::wmma::mma_sync(acc, a, b, acc);
}
__device__ __forceinline__ void frag_store(float* p, const FragAcc& f, int ld) {
  nvcuda::wmma::store_matrix_sync(p, f, unsigned(ld), nvcuda::wmma::mem_row_major);
}
__device__ __forceinline__ void warp_sync() { __syncwarp(); }
#endif

// float16 / bfloat16 on tensor cores: warps in a WARPS_M x WARPS_N grid, each owning FM x FN 16x16
// accumulator fragments (fp32). Both shared tiles keep k contiguous (A row-major [m][k], B column-major
// [n][k]): the usual operands (channels_last activations and weights, nn.Linear weights) load along k,
// so a 16-byte vector lands in shared memory as one 16-byte store. Readout goes one fragment at a time
// through a per-warp 16x16 float staging tile, so the epilogue sees plain (row, col, value) triples.
template <class T, int BM_, int BN_, int BK_, int WARPS_M, int WARPS_N> struct WmmaMath {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WARPS = WARPS_M * WARPS_N, THREADS = 32 * WARPS;
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N, FM = WTM / 16, FN = WTN / 16;
  // Leading dimensions: multiples of 8 halves / 4 floats (WMMA), padded against bank conflicts; every
  // fragment pointer below is then 32-byte aligned.
  static constexpr int LDA = BK + 8, LDB = BK + 8, LDC = 16 + 4;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0 && BK % 16 == 0, "tile");
  using F = float;
  struct Tiles {
    // Raw bytes: a __shared__ object may not have a non-trivial constructor, and __half has one.
    alignas(128) unsigned char a_raw[BM * LDA * sizeof(T)];  // a[m * LDA + k]
    alignas(128) unsigned char b_raw[BN * LDB * sizeof(T)];  // b[n * LDB + k]
    alignas(128) float stage[WARPS][16 * LDC];
    FASTCNN_HD T* a() { return reinterpret_cast<T*>(a_raw); }
    FASTCNN_HD T* b() { return reinterpret_cast<T*>(b_raw); }
    FASTCNN_HD const T* a() const { return reinterpret_cast<const T*>(a_raw); }
    FASTCNN_HD const T* b() const { return reinterpret_cast<const T*>(b_raw); }
  };
  struct Acc {
    FragAcc f[FM][FN];
  };
  static FASTCNN_HD void put_a(Tiles& t, int m, int k, T v) { t.a()[m * LDA + k] = v; }
  static FASTCNN_HD void put_b(Tiles& t, int k, int n, T v) { t.b()[n * LDB + k] = v; }
  // V = 8 elements along k: one 16-byte store (k is a multiple of 8, rows are 80 bytes).
  template <int V> static FASTCNN_HD void put_a_along_k(Tiles& t, int m, int k, const T* v) {
    static_assert(V * sizeof(T) == 16, "one 16-byte vector");
    uint4 bits;
    memcpy(&bits, v, 16);
    *reinterpret_cast<uint4*>(t.a() + m * LDA + k) = bits;
  }
  template <int V> static FASTCNN_HD void put_b_along_k(Tiles& t, int k, int n, const T* v) {
    static_assert(V * sizeof(T) == 16, "one 16-byte vector");
    uint4 bits;
    memcpy(&bits, v, 16);
    *reinterpret_cast<uint4*>(t.b() + n * LDB + k) = bits;
  }
  static FASTCNN_WMMA_FN void zero(Acc& acc) {
    FASTCNN_UNROLL
    for (int i = 0; i < FM; ++i)
      FASTCNN_UNROLL
      for (int j = 0; j < FN; ++j) frag_fill_zero(acc.f[i][j]);
  }
  static FASTCNN_WMMA_FN void mma(const Tiles& t, Acc& acc, int tid) {
    const int warp = tid / 32, wm = warp / WARPS_N, wn = warp % WARPS_N;
    FASTCNN_UNROLL
    for (int kk = 0; kk < BK; kk += 16) {
      FragA<T> a[FM];
      FragB<T> b[FN];
      FASTCNN_UNROLL
      for (int i = 0; i < FM; ++i) frag_load(a[i], t.a() + (wm * WTM + i * 16) * LDA + kk, LDA);
      FASTCNN_UNROLL
      for (int j = 0; j < FN; ++j) frag_load_col(b[j], t.b() + (wn * WTN + j * 16) * LDB + kk, LDB);
      FASTCNN_UNROLL
      for (int i = 0; i < FM; ++i)
        FASTCNN_UNROLL
        for (int j = 0; j < FN; ++j) frag_mma(acc.f[i][j], a[i], b[j]);
    }
  }
  template <class Emit> static FASTCNN_WMMA_FN void readout(Tiles& t, Acc& acc, int tid, const Emit& emit) {
    const int warp = tid / 32, lane = tid % 32, wm = warp / WARPS_N, wn = warp % WARPS_N;
    float* stage = t.stage[warp];
    FASTCNN_UNROLL
    for (int i = 0; i < FM; ++i)
      FASTCNN_UNROLL
      for (int j = 0; j < FN; ++j) {
        frag_store(stage, acc.f[i][j], LDC);
        warp_sync();
        // Lanes 0-15 and 16-31 take two rows at a time, 16 consecutive columns each.
        FASTCNN_UNROLL
        for (int e = lane; e < 256; e += 32) {
          const int r = e / 16, c = e % 16;
          emit(wm * WTM + i * 16 + r, wn * WTN + j * 16 + c, stage[r * LDC + c]);
        }
        warp_sync();  // the next fragment overwrites the staging tile
      }
  }
};

// Tile configuration per storage type.
template <class T> struct MathFor;
template <> struct MathFor<float> { using type = SimtMath<float, 128, 128, 16, 8, 8>; };
template <> struct MathFor<double> { using type = SimtMath<double, 64, 64, 16, 4, 4>; };
template <> struct MathFor<__half> { using type = WmmaMath<__half, 128, 128, 32, 2, 4>; };
template <> struct MathFor<__nv_bfloat16> { using type = WmmaMath<__nv_bfloat16, 128, 128, 32, 2, 4>; };
template <class T> using math_for_t = typename MathFor<T>::type;

struct TileShape {
  int64_t bm, bn, bk;
};
template <class T> TileShape tile_shape_of() {
  using M = math_for_t<T>;
  return {M::BM, M::BN, M::BK};
}
// The same numbers for the host-side plans (workspace queries take a dtype code).
inline TileShape tile_shape(int dtype) {
  switch (DType(dtype)) {
    case DType::float64: return tile_shape_of<double>();
    case DType::float16: return tile_shape_of<__half>();
    case DType::bfloat16: return tile_shape_of<__nv_bfloat16>();
    default: return tile_shape_of<float>();
  }
}

// ---------------------------------------------------------------------------------------------------
// Split of K (deterministic: depends on the shape only)

struct SplitPlan {
  int64_t splits;   // 1: no workspace, the GEMM kernel applies the epilogue itself
  int64_t chunk_k;  // K elements per split, a multiple of the K tile
};

// Enough blocks for about two waves of a 132-SM GPU; each split keeps at least 4 K tiles.
inline SplitPlan plan_split(int64_t tiles, int64_t K, int64_t bk) {
  constexpr int64_t kTargetBlocks = 264, kMinTilesPerSplit = 4, kMaxSplits = 64;
  const int64_t k_tiles = (K + bk - 1) / bk;
  if (k_tiles <= 0 || tiles <= 0) return {1, bk};
  int64_t splits = 1;
  if (tiles < kTargetBlocks) {
    splits = (kTargetBlocks + tiles - 1) / tiles;
    if (splits > k_tiles / kMinTilesPerSplit) splits = k_tiles / kMinTilesPerSplit;
    if (splits > kMaxSplits) splits = kMaxSplits;
    if (splits < 1) splits = 1;
  }
  const int64_t chunk_tiles = (k_tiles + splits - 1) / splits;
  splits = (k_tiles + chunk_tiles - 1) / chunk_tiles;  // no empty split
  return {splits, chunk_tiles * bk};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------
// The block: each step takes the thread index, so that the host emulation can run it thread by thread.

template <class T, class Math, class Prob> struct Block {
  static constexpr int BM = Math::BM, BN = Math::BN, BK = Math::BK, THREADS = Math::THREADS;
  static constexpr int EA = BM * BK / THREADS, EB = BN * BK / THREADS;
  static_assert(EA * THREADS == BM * BK && EB * THREADS == BN * BK, "tile loads must split evenly");
  static_assert(THREADS >= 2 * BK, "one thread per inner entry");
  static constexpr int V = int(16 / sizeof(T));  // elements per 16-byte vector load
  static_assert(EA % V == 0 && EB % V == 0 && BK % V == 0 && BM % V == 0 && BN % V == 0, "vector slots");
  using F = typename Math::F;

  struct Shared {
    typename Math::Tiles tiles;
    Entry a_outer[BM], b_outer[BN], a_inner[BK], b_inner[BK];
    typename Prob::EpRow ep[BM];
  };
  struct Regs {
    T a[EA], b[EB];
  };

  // Load slot idx -> (outer, k) in a tile of BO outer indices: along_k walks k fastest across threads;
  // vec slots hold V consecutive elements along that direction.
  template <int BO> static FASTCNN_HD void slot(bool along_k, bool vec, int idx, int& o, int& k) {
    if (vec) {
      if (along_k) { o = idx / (BK / V); k = idx % (BK / V) * V; } else { o = idx % (BO / V) * V; k = idx / (BO / V); }
    } else if (along_k) { o = idx / BK; k = idx % BK; } else { o = idx % BO; k = idx / BO; }
  }
  static FASTCNN_HD void build_outer(const Prob& p, Shared& s, int tid, int64_t m0, int64_t n0) {
    for (int i = tid; i < BM; i += THREADS) {
      const int64_t m = m0 + i;
      if (m < p.M) {
        s.a_outer[i] = p.a_outer(m);
        s.ep[i] = p.ep_row(m);
      } else {
        s.a_outer[i] = invalid_entry();
      }
    }
    for (int i = tid; i < BN; i += THREADS) {
      const int64_t n = n0 + i;
      s.b_outer[i] = n < p.N ? p.b_outer(n) : invalid_entry();
    }
  }
  static FASTCNN_HD void build_inner(const Prob& p, Shared& s, int tid, int64_t k0, int64_t k_end) {
    if (tid < BK) {
      const int64_t k = k0 + tid;
      s.a_inner[tid] = k < k_end ? p.a_inner(k) : invalid_entry();
    } else if (tid < 2 * BK) {
      const int64_t k = k0 + (tid - BK);
      s.b_inner[tid - BK] = k < k_end ? p.b_inner(k) : invalid_entry();
    }
  }
  template <int BO, int E>
  static FASTCNN_HD void load_tile(const T* p, const Entry* outer, const Entry* inner, int32_t bound_h,
                                   int32_t bound_w, bool along_k, bool vec, int tid, T (&r)[E]) {
    int o, k;
    if (vec) {
      FASTCNN_UNROLL
      for (int i = 0; i < E / V; ++i) {
        slot<BO>(along_k, true, tid + i * THREADS, o, k);
        gather_vec(p, outer[o], inner[k], bound_h, bound_w, &r[i * V]);
      }
    } else {
      FASTCNN_UNROLL
      for (int i = 0; i < E; ++i) {
        slot<BO>(along_k, false, tid + i * THREADS, o, k);
        r[i] = gather(p, outer[o], inner[k], bound_h, bound_w);
      }
    }
  }
  static FASTCNN_HD void load(const Prob& p, const Shared& s, int tid, Regs& r) {
    load_tile<BM>(p.a, s.a_outer, s.a_inner, p.a_bound_h, p.a_bound_w, p.a_along_k, p.a_vec, tid, r.a);
    load_tile<BN>(p.b, s.b_outer, s.b_inner, p.b_bound_h, p.b_bound_w, p.b_along_k, p.b_vec, tid, r.b);
  }
  template <bool kIsA> static FASTCNN_HD void put(Shared& s, int o, int k, T v) {
    if constexpr (kIsA) Math::put_a(s.tiles, o, k, v);
    else Math::put_b(s.tiles, k, o, v);
  }
  template <bool kIsA> static FASTCNN_HD void put_along_k(Shared& s, int o, int k, const T* v) {
    if constexpr (kIsA) Math::template put_a_along_k<V>(s.tiles, o, k, v);
    else Math::template put_b_along_k<V>(s.tiles, k, o, v);
  }
  template <bool kIsA, int BO, int E>
  static FASTCNN_HD void store_tile(Shared& s, bool along_k, bool vec, int tid, const T (&r)[E]) {
    int o, k;
    if (vec) {
      FASTCNN_UNROLL
      for (int i = 0; i < E / V; ++i) {
        slot<BO>(along_k, true, tid + i * THREADS, o, k);
        if (along_k) {
          put_along_k<kIsA>(s, o, k, &r[i * V]);
        } else {
          FASTCNN_UNROLL
          for (int j = 0; j < V; ++j) put<kIsA>(s, o + j, k, r[i * V + j]);
        }
      }
    } else {
      FASTCNN_UNROLL
      for (int i = 0; i < E; ++i) {
        slot<BO>(along_k, false, tid + i * THREADS, o, k);
        put<kIsA>(s, o, k, r[i]);
      }
    }
  }
  static FASTCNN_HD void store(const Prob& p, Shared& s, int tid, const Regs& r) {
    store_tile<true, BM>(s, p.a_along_k, p.a_vec, tid, r.a);
    store_tile<false, BN>(s, p.b_along_k, p.b_vec, tid, r.b);
  }
  // Where C[m0 + r, n0 + c] goes: the epilogue, or this split's slice of the workspace.
  static FASTCNN_HD void emit(const Prob& p, const Shared& s, int64_t m0, int64_t n0, int64_t z,
                              int64_t split, int64_t splits, F* partial, int r, int c, F v) {
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= p.M || n >= p.N) return;
    if (splits > 1) {
      partial[((z * splits + split) * p.M + m) * p.N + n] = v;
    } else {
      p.emit(s.ep[r], m, n, v);
    }
  }
};

// grid: (ceil(max M / BM), ceil(N / BN), Z * splits); blockIdx.z = z * splits + split.
template <class T, class Math, class Prob>
__global__ void __launch_bounds__(Math::THREADS)
    implicit_gemm_kernel(const Prob prob, const int64_t splits, const int64_t chunk_k,
                         typename Math::F* __restrict__ partial) {
  using B = Block<T, Math, Prob>;
  __shared__ typename B::Shared s;
  const int64_t z = blockIdx.z / splits, split = blockIdx.z % splits;
  Prob p = prob;
  p.select(z);
  const int64_t m0 = int64_t(blockIdx.x) * B::BM, n0 = int64_t(blockIdx.y) * B::BN;
  if (m0 >= p.M) return;  // whole block: this z has fewer rows than the grid covers
  const int64_t k_begin = split * chunk_k;
  const int64_t k_end = splits > 1 ? (p.K < k_begin + chunk_k ? p.K : k_begin + chunk_k) : p.K;
  const int tid = int(threadIdx.x);

  typename Math::Acc acc;
  Math::zero(acc);
  typename B::Regs regs;
  B::build_outer(p, s, tid, m0, n0);
  B::build_inner(p, s, tid, k_begin, k_end);
  __syncthreads();
  if (k_begin < k_end) B::load(p, s, tid, regs);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += B::BK) {
    __syncthreads();  // previous tile's mma and this tile's inner-table reads are done
    B::store(p, s, tid, regs);
    const bool more = k0 + B::BK < k_end;
    if (more) B::build_inner(p, s, tid, k0 + B::BK, k_end);
    __syncthreads();
    if (more) B::load(p, s, tid, regs);  // next tile's loads fly during this tile's math
    Math::mma(s.tiles, acc, tid);
  }
  // No barrier needed: readout touches only this warp's staging tile (WMMA) or registers, and the
  // ep table has not changed since the first barrier.
  Math::readout(s.tiles, acc, tid, [&](int r, int c, typename Math::F v) {
    B::emit(p, s, m0, n0, z, split, splits, partial, r, c, v);
  });
}

// Adds the splits of C element i (of Z * M * N) in split order and applies the epilogue.
template <class F, class Prob>
FASTCNN_HD void split_sum_one(const Prob& prob, int64_t splits, const F* partial, int64_t i) {
  const int64_t MN = prob.M * prob.N, z = i / MN, mn = i % MN, m = mn / prob.N, n = mn % prob.N;
  const F* src = partial + z * splits * MN + mn;
  F sum = src[0];
  for (int64_t s = 1; s < splits; ++s) sum += src[s * MN];
  Prob p = prob;
  p.select(z);
  p.emit(p.ep_row(m), m, n, sum);
}

template <class F, class Prob>
__global__ void split_sum_kernel(const Prob prob, const int64_t Z, const int64_t splits,
                                 const F* __restrict__ partial) {
  const int64_t total = Z * prob.M * prob.N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x)
    split_sum_one(prob, splits, partial, i);
}

// Launches the GEMM (and the split sum when plan.splits > 1) for Z independent problems of at most
// max_M rows each; prob.N is the same for all. partial: plan.splits * Z * M * N elements or null.
template <class T, class Prob>
int launch_gemm(const Prob& prob, int64_t max_M, int64_t Z, SplitPlan plan, void* partial, void* stream) {
  using Math = math_for_t<T>;
  using F = typename Math::F;
  const cudaStream_t st = cudaStream_t(stream);
  const int64_t gx = ceil_div(max_M, Math::BM), gy = ceil_div(prob.N, Math::BN), gz = Z * plan.splits;
  if (gx <= 0 || gy <= 0 || gz <= 0) return int(cudaSuccess);
  if (gx > 0x7fffffffLL || gy > 65535 || gz > 65535) return int(cudaErrorInvalidConfiguration);
  if (plan.splits > 1 && partial == nullptr) return int(cudaErrorInvalidValue);
  implicit_gemm_kernel<T, Math, Prob><<<dim3(unsigned(gx), unsigned(gy), unsigned(gz)), Math::THREADS, 0, st>>>(
      prob, plan.splits, plan.chunk_k, static_cast<F*>(partial));
  if (plan.splits > 1) {
    constexpr int kThreads = 256;
    split_sum_kernel<F, Prob><<<grid_for(Z * prob.M * prob.N, kThreads), kThreads, 0, st>>>(
        prob, Z, plan.splits, static_cast<const F*>(partial));
  }
  return int(cudaGetLastError());
}

// |a| <= |b| for strides: which index of an operand walks memory more densely.
FASTCNN_HD bool denser(int64_t a, int64_t b) { return (a < 0 ? -a : a) <= (b < 0 ? -b : b); }

}  // namespace fastcnn::cuda::gemm
