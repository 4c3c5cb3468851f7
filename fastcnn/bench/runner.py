"""Runs the benchmark cases on every available backend and reports them against
eager PyTorch and this machine's measured ceilings."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import fastcnn
from fastcnn.backends import available_backends, triton_interpreting
from fastcnn.bench import ceilings as ceilings_mod
from fastcnn.bench.cases import Case, cases
from fastcnn.bench.timing import time_ms


@dataclass
class Row:
    op: str
    case: str
    shape: str
    dtype: str
    backend: str
    ms: float
    eager_ms: float
    speedup: float
    gbps: float
    fraction_of_copy: float
    matches_eager: bool


def benchmark_backends(device: torch.device) -> list[str]:
    """Backends worth timing: not the torch reference, not Triton's CPU interpreter."""
    names = [b for b in available_backends(device) if b != "torch"]
    if device.type == "cpu" and triton_interpreting():
        names = [b for b in names if b != "triton"]
    return names


def run_case(case: Case, backend: str, dtype: torch.dtype, device: torch.device, limits, quick: bool) -> Row:
    torch.manual_seed(0)
    inputs = case.make_inputs(case.shape, dtype, device, case.channels_last)
    repeats = 5 if quick else 15
    with torch.no_grad():
        expected = case.eager(*inputs)
        eager_ms = time_ms(lambda: case.eager(*inputs), device, repeats=repeats)
        with fastcnn.use_backend(backend):
            got = case.fastcnn(*inputs)
            ms = time_ms(lambda: case.fastcnn(*inputs), device, repeats=repeats)
    tol = {torch.float32: 1e-4, torch.float64: 1e-8}.get(dtype, 2e-2)
    matches = bool(torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol, equal_nan=True))
    gbps = case.bytes_moved(inputs, got) / ms / 1e6
    return Row(case.op, case.label, "x".join(map(str, case.shape)), str(dtype).removeprefix("torch."), backend,
               ms, eager_ms, eager_ms / ms, gbps, gbps / limits.copy_gbps, matches)


def run(device: torch.device, dtype: torch.dtype, *, ops: list[str] | None = None, backends: list[str] | None = None,
        quick: bool = False, console: Console | None = None):
    console = console or Console()
    selected = [c for c in cases(device, quick=quick) if ops is None or c.op in ops]
    names = backends or benchmark_backends(device)
    console.print(f"[bold]fastcnn bench[/bold] on {describe(device)}; backends: {', '.join(names)}; dtype {dtype}")
    limits = ceilings_mod.measure(device, quick=quick)
    console.print(f"measured ceilings: copy {limits.copy_gbps:.1f} GB/s, "
                  f"{limits.matmul_dtype} matmul {limits.matmul_tflops:.2f} TFLOP/s")
    rows: list[Row] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(selected) * len(names))
        for case in selected:
            for backend in names:
                progress.update(task, description=f"{case.op} {case.label} [{backend}]")
                rows.append(run_case(case, backend, dtype, device, limits, quick))
                progress.advance(task)
    return limits, rows


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def table(rows: list[Row], limits) -> Table:
    t = Table(title=f"fastcnn vs eager PyTorch (copy ceiling {limits.copy_gbps:.0f} GB/s)")
    for col in ("op", "case", "shape", "backend", "ms", "eager ms", "speedup", "GB/s", "% of copy", "ok"):
        t.add_column(col, justify="right" if col not in ("op", "case", "backend") else "left")
    for r in rows:
        t.add_row(r.op, r.case, r.shape, r.backend, f"{r.ms:.3f}", f"{r.eager_ms:.3f}", f"{r.speedup:.2f}x",
                  f"{r.gbps:.1f}", f"{100 * r.fraction_of_copy:.0f}%", "yes" if r.matches_eager else "NO")
    return t


def markdown(rows: list[Row], limits, device: torch.device) -> str:
    lines = [f"Device: {describe(device)}; torch {torch.__version__}; measured copy {limits.copy_gbps:.1f} GB/s, "
             f"{limits.matmul_dtype} matmul {limits.matmul_tflops:.2f} TFLOP/s", "",
             "| op | case | shape | dtype | backend | ms | eager ms | speedup | GB/s | % of copy | matches eager |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.op} | {r.case} | {r.shape} | {r.dtype} | {r.backend} | {r.ms:.3f} | {r.eager_ms:.3f} | "
                     f"{r.speedup:.2f}x | {r.gbps:.1f} | {100 * r.fraction_of_copy:.0f}% | {r.matches_eager} |")
    return "\n".join(lines) + "\n"


def save(rows: list[Row], limits, device: torch.device, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        payload = {"device": describe(device), "torch": torch.__version__, "ceilings": asdict(limits),
                   "rows": [asdict(r) for r in rows]}
        Path(json_path).write_text(json.dumps(payload, indent=2))
    if markdown_path:
        Path(markdown_path).write_text(markdown(rows, limits, device))
