"""Triton GEMM with a fused epilogue: out[m, n] = act(sum_k a[m, k] * b[n, k] + bias[n]),
every operand through its own strides (the backward passes transposed views).

When the output has few tiles and K is long (fully connected layers at batch 8, or
a weight gradient summing over the batch) K is split: each split writes float32
partial sums to a workspace, and a second kernel adds the splits in order, then
the bias and activation. The split count depends on the shape alone, so the result
has the same bits on every run."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from fastcnn.ops.precision import acc_dtype as workspace_dtype  # split sums are kept in the accumulation dtype
from fastcnn.triton import tuning
from fastcnn.triton.common import acc_dtype, act_code, apply_act, cdiv, launchable
from fastcnn.triton.conv2d import DOT_TF32, dot_chooser, mma, needs_int64, reduce_splits, split_chunk, swizzled_tile


@triton.jit
def linear_kernel(a_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, CHUNK,
                  sam, sak, sbn, sbk, som, son,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                  TO_WORKSPACE: tl.constexpr, IDX64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    split = tl.program_id(2)
    tile_m, tile_n = swizzled_tile(M, N, BLOCK_M, BLOCK_N, 8)
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if IDX64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    a_row = rm * sam
    b_col = rn * sbn
    k_lo = split * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if IDX64:
            rk = rk.to(tl.int64)
        k_ok = rk < k_hi
        a = tl.load(a_ptr + a_row[:, None] + rk[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_col[None, :] + rk[:, None] * sbk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(acc, a, b, DOT)
    mask = m_ok[:, None] & n_ok[None, :]
    if TO_WORKSPACE:
        # ws[split, m, n], contiguous; the epilogue runs after the ordered sum.
        tl.store(out_ptr + (split.to(tl.int64) * M + rm)[:, None] * N + rn[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
        acc = apply_act(acc, ACT)
        tl.store(out_ptr + (rm * som)[:, None] + (rn * son)[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def linear_splits(m: int, n: int, k: int) -> tuple[int, int]:
    """(splits, chunk) of the K reduction: from the shape alone."""
    return split_chunk(k, cdiv(m, 64) * cdiv(n, 64), 512)


def linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, act: str | None,
           allow_tf32: bool, config: tuning.Config | None = None) -> None:
    linear_launcher(a, b, out, act)(a, b, bias, out, allow_tf32, config)


def linear_launcher(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, act: str | None) -> Callable[..., None]:
    """linear for operands of these sizes and strides, with all that depends on them alone
    worked out once: run(a, b, bias, out, allow_tf32, config=None), which keeps the config
    once the table or the cache has one (as conv2d.forward_launcher)."""
    m, k = a.shape
    n = b.shape[0]
    splits, chunk = linear_splits(m, n, k)
    acc, act_c = acc_dtype(out.dtype), act_code(act)
    ws_reach = splits * m * n if splits > 1 else 0
    idx64 = needs_int64(a, b, out, extra=max(m, n, k, ws_reach) + 256)
    strides = (*a.stride(), *b.stride(), *out.stride())
    reduce_strides = (out.stride(0), out.stride(1), 0, 0)
    layout = ("k" if a.stride(1) == 1 else "m") + ("k" if b.stride(1) == 1 else "n")
    choice = tuning.LaunchConfig("linear", m=m, n=n, k=min(k, chunk), small_m=m <= tuning.SMALL_M)

    def launch(cfg, dot, a, b, bias, out) -> None:
        ws = torch.empty((splits, m, n), dtype=workspace_dtype(out.dtype), device=out.device) if splits > 1 else None
        grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), 1, splits)
        launchable(linear_kernel)[grid](
            a, b, bias if bias is not None else out, ws if ws is not None else out, m, n, k, chunk, *strides,
            HAS_BIAS=bias is not None, ACT=act_c, ACC=acc, DOT=dot, TO_WORKSPACE=ws is not None,
            IDX64=idx64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if ws is not None:
            reduce_splits(ws, bias, out, n, 1, reduce_strides, act_c, acc)

    dot_for = dot_chooser(a.dtype, a.device)

    def run(a, b, bias, out, allow_tf32: bool, config: tuning.Config | None = None) -> None:
        dot = dot_for(allow_tf32)
        if config is None:
            config = choice.get(dot, lambda dot: f"{m}x{n}x{k}-{layout}" + ("-tf32" if dot == DOT_TF32 else ""),
                                a.dtype, a.device, lambda cfg: launch(cfg, dot, a, b, bias, out), (a, b, out))
        launch(config, dot, a, b, bias, out)
    return run
