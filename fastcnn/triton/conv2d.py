"""Triton convolution kernels: the fused forward (implicit GEMM with a bias, residual,
activation and cast epilogue), the input gradient (a gather-style implicit GEMM) and
the weight gradient (a GEMM over N*OH*OW with a deterministic split), plus the GEMM
pieces fastcnn/triton/linear.py shares (the tile product, the ordered split sum).

Every tensor is addressed through its own element strides, so any layout works;
channels_last (C stride 1) makes the channel axis, the inner K axis, contiguous.
Three K-loop shapes (the MODE constexpr), chosen from the shape alone:
  MODE_GEMM  1x1, no padding: a straight GEMM over channels, no H/W masks (the input
             gradient takes it at stride 1 only; strided 1x1 forward and weight
             gradient read every sh-th row, every sw-th column);
  MODE_TAPS  one loop over (tap (r, s), channel block), padding by masks;
  MODE_FLAT  (r, s, c) flattened into one K axis, for few channels per group
             (C = 1 or 3 fills a 16-wide K block with several taps).
Geometry: the 16-int list of fastcnn/ops/conv_geometry.py
[N, C, H, W, K, R, S, OH, OW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, groups].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from fastcnn.ops.precision import acc_dtype as workspace_dtype  # split sums are kept in the accumulation dtype
from fastcnn.triton import tuning
from fastcnn.triton.common import acc_dtype, act_code, apply_act, cdiv, launchable

MODE_GEMM, MODE_TAPS, MODE_FLAT = 0, 1, 2

# Dot modes (the DOT constexpr).
DOT_SUM = 0      # float64: broadcast-multiply-sum in float64 (no portable fp64 tl.dot)
DOT_IEEE = 1     # float32 tiles with exact float32 products (every dtype under the interpreter)
DOT_TF32 = 2     # float32 on tensor cores as TF32, when the caller allows it
DOT_NATIVE = 3   # float16/bfloat16 tiles on tensor cores, float32 accumulation

# 32-bit index math below this reach (masked lanes compute offsets a little past the end).
_INT32_SAFE = 2**30


def dot_mode(dtype: torch.dtype, allow_tf32: bool, device: torch.device) -> int:
    if dtype == torch.float64:
        return DOT_SUM
    # The interpreter mishandles 16-bit dots: it gets float32 tiles.
    if tuning.interpreting(device) or (dtype == torch.float32 and not allow_tf32):
        return DOT_IEEE
    return DOT_TF32 if dtype == torch.float32 else DOT_NATIVE


def dot_chooser(dtype: torch.dtype, device: torch.device) -> Callable[[bool], int]:
    """dot_mode(dtype, allow_tf32, device) as a function of allow_tf32 alone, for a plan
    whose dtype and device are fixed: a constant where TF32 cannot matter (the
    interpreter's TRITON_INTERPRET is read once, not on every launch)."""
    if dtype != torch.float32 or tuning.interpreting(device):
        fixed = dot_mode(dtype, False, device)
        return lambda allow_tf32: fixed
    return lambda allow_tf32: DOT_TF32 if allow_tf32 else DOT_IEEE


def _reach(t: torch.Tensor | None) -> int:
    """One past the largest element offset the tensor's strides address."""
    if t is None:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def needs_int64(*tensors: torch.Tensor | None, extra: int = 0) -> bool:
    return max([_reach(t) for t in tensors] + [extra]) >= _INT32_SAFE


def split_chunk(reduction: int, tiles: int, min_chunk: int) -> tuple[int, int]:
    """(splits, chunk) for a reduction of `reduction` terms feeding `tiles` output tiles
    of 64 x 64: about 256 programs in all, each summing at least `min_chunk` terms. The
    chunk is a multiple of 128 (the largest BLOCK_K), so every config sums the same terms
    in each split: the split depends on the shape alone, never on the config."""
    splits = max(1, min(cdiv(reduction, min_chunk), 256 // max(tiles, 1)))
    chunk = cdiv(cdiv(reduction, splits), 128) * 128
    return cdiv(reduction, chunk), chunk


def _layout(t: torch.Tensor) -> str:
    return "cl" if t.stride(1) == 1 and t.shape[1] > 1 else ("nchw" if t.is_contiguous() else "strided")


def _launch_options(config: tuning.Config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


@triton.jit
def mma(acc, a, b, DOT: tl.constexpr):
    """acc + a @ b for tiles a [BM, BK] and b [BK, BN] as loaded (storage dtype)."""
    if DOT == 0:
        acc += tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif DOT == 1:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT == 2:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def swizzled_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of this program on a 1-D grid: GROUP_M consecutive row tiles
    run across all column tiles together, so their A rows stay in L2 while B streams by."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_rows, (pid % width) // group_rows


@triton.jit
def conv2d_forward_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
        NB, H, W, OH, OW, Cg, Kg, R, S, sh, sw, ph, pw, dh, dw,
        xsn, xsc, xsh, xsw, wsk, wsc, wsr, wss, rsn, rsc, rsh, rsw, osn, osc, osh, osw,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
        DOT: tl.constexpr, MODE: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Rows: output pixels (n, oh, ow); columns: output channels of group g; K: (r, s, c).
    g = tl.program_id(2)
    tile_m, tile_n = swizzled_tile(NB * OH * OW, Kg, BLOCK_M, BLOCK_N, 8)
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if IDX64:
        g = g.to(tl.int64)
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    m_ok = rm < NB * OH * OW
    n_ok = rn < Kg
    ow = rm % OW
    t = rm // OW
    oh = t % OH
    nb = t // OH
    k_out = g * Kg + rn
    x_base = nb * xsn + (g * Cg) * xsc
    w_base = k_out * wsk
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    if MODE == 0:
        x_row = x_base + (oh * sh) * xsh + (ow * sw) * xsw
        for c0 in range(0, Cg, BLOCK_K):
            rc = c0 + tl.arange(0, BLOCK_K)
            if IDX64:
                rc = rc.to(tl.int64)
            c_ok = rc < Cg
            a = tl.load(x_ptr + x_row[:, None] + rc[None, :] * xsc, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_ptr + w_base[None, :] + rc[:, None] * wsc, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(acc, a, b, DOT)
    elif MODE == 1:
        # One loop over (tap, channel block), so that the pipeliner sees every iteration.
        ih0 = oh * sh - ph
        iw0 = ow * sw - pw
        blocks = tl.cdiv(Cg, BLOCK_K)
        for it in range(0, R * S * blocks):
            tap = it // blocks
            r = tap // S
            s = tap % S
            ih = ih0 + r * dh
            iw = iw0 + s * dw
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            rc = (it % blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            if IDX64:
                rc = rc.to(tl.int64)
            c_ok = rc < Cg
            a = tl.load(x_ptr + (x_base + ih * xsh + iw * xsw)[:, None] + rc[None, :] * xsc,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_ptr + (w_base + r * wsr + s * wss)[None, :] + rc[:, None] * wsc,
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(acc, a, b, DOT)
    else:
        ih0 = oh * sh - ph
        iw0 = ow * sw - pw
        KT = R * S * Cg
        for k0 in range(0, KT, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if IDX64:
                rk = rk.to(tl.int64)
            k_ok = rk < KT
            c = rk % Cg
            t2 = rk // Cg
            s = t2 % S
            r = t2 // S
            ih = ih0[:, None] + (r * dh)[None, :]
            iw = iw0[:, None] + (s * dw)[None, :]
            ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + x_base[:, None] + (c * xsc)[None, :] + ih * xsh + iw * xsw, mask=ok, other=0.0)
            b = tl.load(w_ptr + w_base[None, :] + (c * wsc + r * wsr + s * wss)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(acc, a, b, DOT)
    # Epilogue in the accumulator type: + bias + residual, activation, one rounding.
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k_out, mask=n_ok, other=0.0).to(ACC)[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + (nb * rsn + oh * rsh + ow * rsw)[:, None] + (k_out * rsc)[None, :], mask=mask,
                      other=0.0)
        acc += res.to(ACC)
    acc = apply_act(acc, ACT)
    o = (nb * osn + oh * osh + ow * osw)[:, None] + (k_out * osc)[None, :]
    tl.store(out_ptr + o, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv2d_input_grad_kernel(
        g_ptr, w_ptr, gx_ptr,
        NB, H, W, OH, OW, Cg, Kg, R, S, sh, sw, ph, pw, dh, dw,
        gsn, gsc, gsh, gsw, wsk, wsc, wsr, wss, xsn, xsc, xsh, xsw, PH_H, PH_W, STEP_H, STEP_W,
        ACC: tl.constexpr, DOT: tl.constexpr, MODE: tl.constexpr, IDX64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Rows: input pixels (n, ih, iw); columns: input channels of group g; K: (r, s, k).
    # Each pixel gathers the output positions oh = (ih + ph - r*dh) / sh that hit it
    # (divisible and in range), so strides need neither zero insertion nor atomics.
    # With PH_H = sh, PH_W = sw (MODE_TAPS) a program holds pixels of one stride phase
    # (ih % sh, iw % sw) only: a tap then hits all of its rows or none, and the taps
    # that hit none are skipped whole instead of multiplied by masked zeros.
    phase = tl.program_id(2) % (PH_H * PH_W)
    g = tl.program_id(2) // (PH_H * PH_W)
    ah = phase // PH_W
    aw = phase % PH_W
    HI = (H - ah + PH_H - 1) // PH_H
    WI = (W - aw + PH_W - 1) // PH_W
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if IDX64:
        g = g.to(tl.int64)
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    m_ok = rm < NB * HI * WI
    n_ok = rn < Cg
    iw = aw + (rm % tl.maximum(WI, 1)) * PH_W
    t = rm // tl.maximum(WI, 1)
    ih = ah + (t % tl.maximum(HI, 1)) * PH_H
    nb = t // tl.maximum(HI, 1)
    c_in = g * Cg + rn
    g_base = nb * gsn + (g * Kg) * gsc
    w_base = (g * Kg) * wsk + rn * wsc
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    if MODE == 0:
        g_row = g_base + ih * gsh + iw * gsw
        for k0 in range(0, Kg, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if IDX64:
                rk = rk.to(tl.int64)
            k_ok = rk < Kg
            a = tl.load(g_ptr + g_row[:, None] + rk[None, :] * gsc, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + w_base[None, :] + rk[:, None] * wsk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(acc, a, b, DOT)
    elif MODE == 1:
        # The taps r that hit this phase: (ah + ph - r*dh) % PH_H == 0, i.e. r0, r0 + STEP_H, ...
        # (STEP_H = PH_H / gcd(PH_H, dh)); likewise s. C and Python disagree on negative %,
        # but agree on when it is 0.
        r0 = ah * 0 + R  # a tensor from the start (R may be a constexpr 1), as the loop carries it
        for rr in range(0, PH_H):
            r0 = tl.where(((ah + ph - rr * dh) % PH_H == 0) & (rr < r0), rr, r0)
        s0 = aw * 0 + S
        for ss in range(0, PH_W):
            s0 = tl.where(((aw + pw - ss * dw) % PH_W == 0) & (ss < s0), ss, s0)
        taps_r = tl.maximum(R - r0 + STEP_H - 1, 0) // STEP_H
        taps_s = tl.maximum(S - s0 + STEP_W - 1, 0) // STEP_W
        blocks = tl.cdiv(Kg, BLOCK_K)
        # One loop over (hitting tap, channel block), so that the pipeliner sees every iteration.
        for it in range(0, taps_r * taps_s * blocks):
            tap = it // blocks
            r = r0 + (tap // taps_s) * STEP_H
            s = s0 + (tap % taps_s) * STEP_W
            th_raw = ih + ph - r * dh
            tw_raw = iw + pw - s * dw
            th = tl.maximum(th_raw, 0)
            tw = tl.maximum(tw_raw, 0)
            oh = th // sh
            ow = tw // sw
            row_ok = m_ok & (th_raw >= 0) & (tw_raw >= 0) & (oh * sh == th) & (ow * sw == tw) & (oh < OH) & (ow < OW)
            rk = (it % blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            if IDX64:
                rk = rk.to(tl.int64)
            k_ok = rk < Kg
            a = tl.load(g_ptr + (g_base + oh * gsh + ow * gsw)[:, None] + rk[None, :] * gsc,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + (w_base + r * wsr + s * wss)[None, :] + rk[:, None] * wsk,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(acc, a, b, DOT)
    else:
        KT = R * S * Kg
        for k0 in range(0, KT, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if IDX64:
                rk = rk.to(tl.int64)
            k_ok = rk < KT
            kk = rk % Kg
            t2 = rk // Kg
            s = t2 % S
            r = t2 // S
            th_raw = ih[:, None] + ph - (r * dh)[None, :]
            tw_raw = iw[:, None] + pw - (s * dw)[None, :]
            th = tl.maximum(th_raw, 0)
            tw = tl.maximum(tw_raw, 0)
            oh = th // sh
            ow = tw // sw
            ok = (m_ok[:, None] & k_ok[None, :] & (th_raw >= 0) & (tw_raw >= 0) & (oh * sh == th) & (ow * sw == tw)
                  & (oh < OH) & (ow < OW))
            a = tl.load(g_ptr + g_base[:, None] + (kk * gsc)[None, :] + oh * gsh + ow * gsw, mask=ok, other=0.0)
            b = tl.load(w_ptr + w_base[None, :] + (kk * wsk + r * wsr + s * wss)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(acc, a, b, DOT)
    o = (nb * xsn + ih * xsh + iw * xsw)[:, None] + (c_in * xsc)[None, :]
    tl.store(gx_ptr + o, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def conv2d_weight_grad_kernel(
        g_ptr, x_ptr, out_ptr,
        NB, H, W, OH, OW, Cg, Kg, K, R, S, sh, sw, ph, pw, dh, dw, SPLITS, CHUNK,
        gsn, gsc, gsh, gsw, xsn, xsc, xsh, xsw, osk, osc, osr, oss,
        TO_WORKSPACE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, MODE: tl.constexpr,
        IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Rows: output channels k of group g; columns: (r, s, c), c fastest; K: output pixels
    # (n, oh, ow) in the contiguous chunk of this split, summed in order.
    g = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    CRS = R * S * Cg
    m_ok = rm < Kg
    n_ok = rn < CRS
    k_out = g * Kg + rm
    c = rn % Cg
    t = rn // Cg
    s = t % S
    r = t // S
    g_col = k_out * gsc
    x_col = (g * Cg + c) * xsc
    if IDX64:
        g_col = k_out.to(tl.int64) * gsc
        x_col = (g * Cg + c).to(tl.int64) * xsc
    h_off = r * dh - ph
    w_off = s * dw - pw
    P = NB * OH * OW
    p_lo = split * CHUNK
    p_hi = tl.minimum(p_lo + CHUNK, P)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for p0 in range(p_lo, p_hi, BLOCK_K):
        rp = p0 + tl.arange(0, BLOCK_K)
        if IDX64:
            rp = rp.to(tl.int64)
        p_ok = rp < p_hi
        ow = rp % OW
        t2 = rp // OW
        oh = t2 % OH
        nb = t2 // OH
        a = tl.load(g_ptr + g_col[:, None] + (nb * gsn + oh * gsh + ow * gsw)[None, :],
                    mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        if MODE == 0:
            b = tl.load(x_ptr + (nb * xsn + (oh * sh) * xsh + (ow * sw) * xsw)[:, None] + x_col[None, :],
                        mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            ih = (oh * sh)[:, None] + h_off[None, :]
            iw = (ow * sw)[:, None] + w_off[None, :]
            ok = p_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b = tl.load(x_ptr + (nb * xsn)[:, None] + x_col[None, :] + ih * xsh + iw * xsw, mask=ok, other=0.0)
        acc = mma(acc, a, b, DOT)
    mask = m_ok[:, None] & n_ok[None, :]
    if TO_WORKSPACE:
        # ws[split, k, (r, s, c)], contiguous
        o = (split.to(tl.int64) * K + k_out)[:, None] * CRS + rn[None, :]
        tl.store(out_ptr + o, acc, mask=mask)
    else:
        o = (k_out * osk)[:, None] + (c * osc + r * osr + s * oss)[None, :]
        tl.store(out_ptr + o, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def reduce_splits_kernel(ws_ptr, bias_ptr, out_ptr, ROWS, COLS, PLANE, SPLITS, CI, S,
                         os_row, os_c, os_r, os_s,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[row, col] = act(sum over splits, in order, of ws[split, row, col] + bias[col]).
    A column is (r, s, c), c fastest over CI and s over S: a weight's (r, s, c) for the
    conv weight gradient; for linear CI = COLS and S = 1."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    ws = ws_ptr + rows.to(tl.int64)[:, None] * COLS + cols[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for _ in range(0, SPLITS):
        acc += tl.load(ws, mask=mask, other=0.0).to(ACC)
        ws += PLANE  # pointer arithmetic is 64-bit
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < COLS, other=0.0).to(ACC)[None, :]
    acc = apply_act(acc, ACT)
    c = cols % CI
    t = cols // CI
    s = t % S
    r = t // S
    o = rows.to(tl.int64)[:, None] * os_row + (c.to(tl.int64) * os_c + r * os_r + s * os_s)[None, :]
    tl.store(out_ptr + o, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, ci: int, s: int,
                  out_strides: tuple[int, int, int, int], act: int, acc) -> None:
    splits, rows, cols = ws.shape
    block_r, block_c = 32, 64
    grid = (cdiv(rows, block_r), cdiv(cols, block_c))
    launchable(reduce_splits_kernel)[grid](
        ws, bias if bias is not None else ws, out, rows, cols, rows * cols, splits, ci, s, *out_strides,
        HAS_BIAS=bias is not None, ACT=act, ACC=acc, BLOCK_R=block_r, BLOCK_C=block_c)


def _unpack(geometry: list[int]):
    if len(geometry) != 16:
        raise ValueError(f"geometry must have 16 ints, got {len(geometry)}")
    return [int(v) for v in geometry]


def _flat(per_group: int) -> bool:
    """Few channels per group: flatten (r, s, c) so one K block covers several taps."""
    return per_group < 16 or per_group % 16 != 0


def _key(geometry: list[int], t: torch.Tensor, weight: torch.Tensor, dot: int) -> str:
    """The tuning key: the geometry, the layouts of the activation and the weight, and TF32."""
    tf32 = "-tf32" if dot == DOT_TF32 else ""
    return "x".join(str(v) for v in geometry) + "-" + _layout(t) + "-w" + _layout(weight) + tf32


def _unpadded_1x1(geometry: list[int]) -> bool:
    """A 1x1 kernel whose every tap lies inside the image: MODE_GEMM loads pixels
    unmasked. Padding at the bottom or right (the op schema's four-int form) puts the
    last rows or columns outside, though top and left padding are 0."""
    nb, c, h, w, k, r, s, oh, ow, sh, sw, ph, pw, dh, dw, groups = _unpack(geometry)
    return r == 1 and s == 1 and ph == 0 and pw == 0 and (oh - 1) * sh < h and (ow - 1) * sw < w


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   residual: torch.Tensor | None, out: torch.Tensor, geometry: list[int], act: str | None,
                   allow_tf32: bool, config: tuning.Config | None = None) -> None:
    forward_launcher(x, weight, residual, out, geometry, act)(x, weight, bias, residual, out, allow_tf32, config)


def forward_launcher(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor,
                     geometry: list[int], act: str | None) -> Callable[..., None]:
    """conv2d_forward for tensors of these sizes and strides (any device, meta too), with
    all that depends on them alone worked out once: run(x, weight, bias, residual, out,
    allow_tf32, config=None). A prepared call (ops/prepared.py) keeps one per signature;
    it also keeps the config once the table or the cache has one (lookups cost ~10 us a
    call)."""
    nb, c, h, w, k, r, s, oh, ow, sh, sw, ph, pw, dh, dw, groups = _unpack(geometry)
    cg, kg = c // groups, k // groups
    if _unpadded_1x1(geometry):
        mode = MODE_GEMM
    else:
        mode = MODE_FLAT if _flat(cg) else MODE_TAPS
    m = nb * oh * ow
    idx64 = needs_int64(x, weight, residual, out, extra=m + 256)
    sizes = (nb, h, w, oh, ow, cg, kg, r, s, sh, sw, ph, pw, dh, dw)
    strides = (*x.stride(), *weight.stride(), *(residual.stride() if residual is not None else (0, 0, 0, 0)),
               *out.stride())
    act_c, acc, has_res = act_code(act), acc_dtype(out.dtype), residual is not None
    # (tap, channel) loops are flattened loops in the miscompile's sense: warps are capped.
    choice = tuning.LaunchConfig("conv2d_forward", m=m, n=kg, k=r * s * cg, flat=mode != MODE_GEMM)

    def launch(cfg, dot, x, weight, bias, residual, out) -> None:
        grid = (cdiv(m, cfg.block_m) * cdiv(kg, cfg.block_n), 1, groups)
        launchable(conv2d_forward_kernel)[grid](
            x, weight, bias if bias is not None else out, residual if has_res else out, out, *sizes, *strides,
            HAS_BIAS=bias is not None, HAS_RES=has_res, ACT=act_c, ACC=acc, DOT=dot, MODE=mode, IDX64=idx64,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    dot_for = dot_chooser(x.dtype, x.device)

    def run(x, weight, bias, residual, out, allow_tf32: bool, config: tuning.Config | None = None) -> None:
        dot = dot_for(allow_tf32)
        if config is None:
            config = choice.get(dot, lambda dot: _key(geometry, x, weight, dot), x.dtype, x.device,
                                lambda cfg: launch(cfg, dot, x, weight, bias, residual, out), (x, out))
        launch(config, dot, x, weight, bias, residual, out)
    return run


def conv2d_input_grad(grad: torch.Tensor, weight: torch.Tensor, grad_x: torch.Tensor, geometry: list[int],
                      allow_tf32: bool, config: tuning.Config | None = None) -> None:
    input_grad_launcher(grad, weight, grad_x, geometry)(grad, weight, grad_x, allow_tf32, config)


def input_grad_launcher(grad: torch.Tensor, weight: torch.Tensor, grad_x: torch.Tensor,
                        geometry: list[int]) -> Callable[..., None]:
    """conv2d_input_grad for tensors of these sizes and strides, planned once (as
    forward_launcher): run(grad, weight, grad_x, allow_tf32, config=None)."""
    nb, c, h, w, k, r, s, oh, ow, sh, sw, ph, pw, dh, dw, groups = _unpack(geometry)
    cg, kg = c // groups, k // groups
    if r == 1 and s == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0 and oh == h and ow == w:
        mode = MODE_GEMM
    else:
        mode = MODE_FLAT if _flat(kg) else MODE_TAPS
    m = nb * h * w
    idx64 = needs_int64(grad, weight, grad_x, extra=m + 256)
    # Stride phases (see the kernel): the largest phase, phase (0, 0), sizes the grid.
    phases = (sh, sw) if mode == MODE_TAPS and groups * sh * sw < 65536 else (1, 1)
    steps = (phases[0] // math.gcd(phases[0], dh), phases[1] // math.gcd(phases[1], dw))
    rows = nb * cdiv(h, phases[0]) * cdiv(w, phases[1])
    args = (nb, h, w, oh, ow, cg, kg, r, s, sh, sw, ph, pw, dh, dw,
            *grad.stride(), *weight.stride(), *grad_x.stride(), *phases, *steps)
    acc = acc_dtype(grad_x.dtype)
    choice = tuning.LaunchConfig("conv2d_input_grad", m=m, n=cg, k=r * s * kg, flat=mode != MODE_GEMM)

    def launch(cfg, dot, grad, weight, grad_x) -> None:
        grid = (cdiv(rows, cfg.block_m), cdiv(cg, cfg.block_n), groups * phases[0] * phases[1])
        launchable(conv2d_input_grad_kernel)[grid](
            grad, weight, grad_x, *args, ACC=acc, DOT=dot, MODE=mode, IDX64=idx64,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **_launch_options(cfg))

    dot_for = dot_chooser(grad.dtype, grad.device)

    def run(grad, weight, grad_x, allow_tf32: bool, config: tuning.Config | None = None) -> None:
        dot = dot_for(allow_tf32)
        if config is None:
            config = choice.get(dot, lambda dot: _key(geometry, grad, weight, dot), grad.dtype, grad.device,
                                lambda cfg: launch(cfg, dot, grad, weight, grad_x), (grad, grad_x))
        launch(config, dot, grad, weight, grad_x)
    return run


def weight_grad_splits(geometry: list[int]) -> tuple[int, int]:
    """(splits, chunk) of the N*OH*OW reduction: from the shape alone."""
    nb, c, h, w, k, r, s, oh, ow, sh, sw, ph, pw, dh, dw, groups = _unpack(geometry)
    tiles = groups * cdiv(k // groups, 64) * cdiv(r * s * (c // groups), 64)
    return split_chunk(nb * oh * ow, tiles, 1024)


def conv2d_weight_grad(grad: torch.Tensor, x: torch.Tensor, grad_w: torch.Tensor, geometry: list[int],
                       allow_tf32: bool, config: tuning.Config | None = None) -> None:
    weight_grad_launcher(grad, x, grad_w, geometry)(grad, x, grad_w, allow_tf32, config)


def weight_grad_launcher(grad: torch.Tensor, x: torch.Tensor, grad_w: torch.Tensor,
                         geometry: list[int]) -> Callable[..., None]:
    """conv2d_weight_grad for tensors of these sizes and strides, planned once (as
    forward_launcher): run(grad, x, grad_w, allow_tf32, config=None)."""
    nb, c, h, w, k, r, s, oh, ow, sh, sw, ph, pw, dh, dw, groups = _unpack(geometry)
    cg, kg = c // groups, k // groups
    mode = MODE_GEMM if _unpadded_1x1(geometry) else MODE_TAPS
    crs = r * s * cg
    p = nb * oh * ow
    splits, chunk = weight_grad_splits(geometry)
    acc = acc_dtype(grad_w.dtype)
    idx64 = needs_int64(grad, x, grad_w, extra=max(p, splits * k * crs if splits > 1 else 0) + 256)
    args = (nb, h, w, oh, ow, cg, kg, k, r, s, sh, sw, ph, pw, dh, dw, splits, chunk,
            *grad.stride(), *x.stride(), *grad_w.stride())
    reduce_strides = tuple(grad_w.stride())
    # Columns are (r, s, c): a flattened loop in the miscompile's sense, so warps are capped.
    choice = tuning.LaunchConfig("conv2d_weight_grad", m=kg, n=crs, k=min(p, chunk), flat=True,
                                 small_m=kg <= tuning.SMALL_M)

    def launch(cfg, dot, grad, x, grad_w) -> None:
        ws = (torch.empty((splits, k, crs), dtype=workspace_dtype(grad_w.dtype), device=grad_w.device)
              if splits > 1 else None)
        grid = (cdiv(kg, cfg.block_m), cdiv(crs, cfg.block_n), groups * splits)
        launchable(conv2d_weight_grad_kernel)[grid](
            grad, x, ws if ws is not None else grad_w, *args,
            TO_WORKSPACE=ws is not None, ACC=acc, DOT=dot, MODE=mode, IDX64=idx64,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **_launch_options(cfg))
        if ws is not None:
            reduce_splits(ws, None, grad_w, cg, s, reduce_strides, 0, acc)

    dot_for = dot_chooser(x.dtype, x.device)

    def run(grad, x, grad_w, allow_tf32: bool, config: tuning.Config | None = None) -> None:
        dot = dot_for(allow_tf32)
        if config is None:
            config = choice.get(dot, lambda dot: _key(geometry, x, grad_w, dot), x.dtype, x.device,
                                lambda cfg: launch(cfg, dot, grad, x, grad_w), (grad, x, grad_w))
        launch(config, dot, grad, x, grad_w)
    return run
