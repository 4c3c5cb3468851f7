"""Roofline placement: given this machine's ceilings (fastcnn.bench.ceilings: copy
bandwidth and matrix-product rate), a layer of F FLOP moving B bytes can run no
faster than max(F / peak, B / bandwidth): it is compute-bound when the first term
is the larger (its intensity F/B lies right of the ridge point peak / bandwidth),
memory-bound otherwise."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastcnn.bench.ceilings import Ceilings
from fastcnn.cost.tracing import LayerCost, Summary


@dataclass(frozen=True)
class Placement:
    bound: str  # "compute" or "memory"
    floor_ms: float  # the least time the layer can take on this machine
    attainable_tflops: float  # the roof at the layer's intensity


def ridge_point(ceilings: Ceilings) -> float:
    """The intensity (FLOP per byte) where the bandwidth slope meets the compute roof."""
    return ceilings.matmul_tflops * 1e3 / ceilings.copy_gbps


def attainable_tflops(intensity: float, ceilings: Ceilings) -> float:
    return min(ceilings.matmul_tflops, intensity * ceilings.copy_gbps / 1e3)


def _compute_ms(flops: float, ceilings: Ceilings) -> float:
    return flops / (ceilings.matmul_tflops * 1e9)


def _memory_ms(nbytes: float, ceilings: Ceilings) -> float:
    return nbytes / (ceilings.copy_gbps * 1e6)


def time_floor_ms(flops: float, nbytes: float, ceilings: Ceilings) -> float:
    return max(_compute_ms(flops, ceilings), _memory_ms(nbytes, ceilings))


def bound(flops: float, nbytes: float, ceilings: Ceilings) -> str:
    return "compute" if flops > 0 and _compute_ms(flops, ceilings) >= _memory_ms(nbytes, ceilings) else "memory"


def place(layer: LayerCost, ceilings: Ceilings) -> Placement:
    return Placement(bound(layer.flops, layer.bytes, ceilings), time_floor_ms(layer.flops, layer.bytes, ceilings),
                     attainable_tflops(layer.intensity, ceilings))


def measure_layer_ms(model: nn.Module, input_size: Sequence[int], dtype: torch.dtype, device: torch.device,
                     *, repeats: int = 3) -> list[float]:
    """Milliseconds of each leaf-module call of one forward pass on `device` (the
    median over `repeats` passes after a warm-up), in the order of summary()'s rows.
    Each call is synchronised on a GPU, so tiny layers read slower than they run."""
    model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    x = torch.randn(tuple(input_size), device=device, dtype=dtype)
    runs: list[list[float]] = []
    starts: list[float] = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def before(module, args):
        sync()
        starts.append(time.perf_counter())

    def after(module, args, output):
        sync()
        runs[-1].append((time.perf_counter() - starts.pop()) * 1e3)

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [h for m in leaves for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        with torch.no_grad():
            for _ in range(repeats + 1):
                runs.append([])
                model(x)
    finally:
        for h in handles:
            h.remove()
    return [sorted(samples)[len(samples) // 2] for samples in zip(*runs[1:])]


def plot(result: Summary, ceilings: Ceilings, path: str, *, measured_ms: Sequence[float] | None = None,
         title: str | None = None) -> None:
    """A log-log roofline PNG of the layers that do multiply-adds: each at its
    intensity and attainable TFLOP/s (hollow), and, given measured_ms (one per row
    of `result`), at its achieved TFLOP/s (filled)."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("the roofline plot needs matplotlib: pip install 'fastcnn[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if measured_ms is not None and len(measured_ms) != len(result.rows):
        raise ValueError(f"measured_ms has {len(measured_ms)} times for {len(result.rows)} rows")
    chosen = [i for i, r in enumerate(result.rows) if r.macs > 0 and r.bytes > 0]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ridge = ridge_point(ceilings)
    lo = min([result.rows[i].intensity for i in chosen] + [ridge]) / 4
    hi = max([result.rows[i].intensity for i in chosen] + [ridge]) * 4
    xs = [lo, ridge, hi]
    ax.plot(xs, [attainable_tflops(x, ceilings) for x in xs], color="black", linewidth=1.2,
            label=f"roof: {ceilings.copy_gbps:.0f} GB/s, {ceilings.matmul_tflops:.2f} TFLOP/s")
    intensities = [result.rows[i].intensity for i in chosen]
    ax.scatter(intensities, [attainable_tflops(x, ceilings) for x in intensities], facecolors="none",
               edgecolors="tab:blue", label="attainable")
    if measured_ms is not None:
        achieved = [result.rows[i].flops / max(measured_ms[i], 1e-9) / 1e9 for i in chosen]
        ax.scatter(intensities, achieved, color="tab:red", s=14, label="achieved")
        for x, y in zip(intensities, achieved):
            ax.plot([x, x], [y, attainable_tflops(x, ceilings)], color="tab:red", linewidth=0.5, alpha=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title or f"{result.model} on the roofline ({len(chosen)} conv/FC layers, {result.dtype})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: Summary, ceilings: Ceilings, measured_ms: Sequence[float] | None = None):
    """The conv/FC layers' roofline placement as a rich Table: bound, time floor and,
    given measured_ms (one per row of `result`), the time measured against it."""
    from rich.table import Table

    t = Table(title=f"{result.model} on the roofline: ridge {ridge_point(ceilings):.1f} FLOP/B "
                    f"(copy {ceilings.copy_gbps:.1f} GB/s, {ceilings.matmul_dtype} matmul "
                    f"{ceilings.matmul_tflops:.2f} TFLOP/s)")
    columns = ["layer", "type", "MACs", "FLOP/B", "bound", "floor ms", *(["ms", "of floor"] if measured_ms else [])]
    for col in columns:
        t.add_column(col, justify="left" if col in ("layer", "type", "bound") else "right")
    for i, r in enumerate(result.rows):
        if r.macs == 0:
            continue
        p = place(r, ceilings)
        timed = [f"{measured_ms[i]:.3f}", f"{100 * p.floor_ms / measured_ms[i]:.0f}%"] if measured_ms else []
        t.add_row(r.label, r.type, f"{r.macs:,}", f"{r.intensity:.1f}", p.bound, f"{p.floor_ms:.4f}", *timed)
    return t
