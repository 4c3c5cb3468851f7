"""Runs the benchmark cases on every available backend and reports them against
eager PyTorch and this machine's measured ceilings."""

from __future__ import annotations

import json
import math
import platform
from collections import defaultdict
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
from fastcnn.bench.timing import time_ms, time_ms_interleaved
from fastcnn.cost import roofline


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
    tflops: float = 0.0  # compute-bound ops (conv, linear) only
    fraction_of_matmul: float = 0.0
    compile_ms: float | None = None  # torch.compile of the eager code, when asked for
    # Compute-bound ops: the roofline's time floor from the ceilings (fastcnn.cost.roofline).
    floor_ms: float | None = None
    bound: str | None = None  # "compute" or "memory": which ceiling sets floor_ms

    @property
    def compute_bound(self) -> bool:
        return self.tflops > 0


def benchmark_backends(device: torch.device) -> list[str]:
    """Backends worth timing: not the torch reference, not Triton's CPU interpreter."""
    names = [b for b in available_backends(device) if b != "torch"]
    if device.type == "cpu" and triton_interpreting():
        names = [b for b in names if b != "triton"]
    return names


def _repeats(case: Case, quick: bool) -> int:
    """Fewer repeats for calls that take long (the big convolutions)."""
    repeats = 5 if quick else 15
    if case.flops > 2e10:
        repeats = 3
    return repeats


def run_case(case: Case, backend: str, dtype: torch.dtype, device: torch.device, limits, quick: bool,
             with_compile: bool = False) -> Row:
    torch.manual_seed(0)
    inputs = case.make_inputs(case.shape, dtype, device, case.channels_last)
    repeats = _repeats(case, quick)
    warmup = 1 if case.flops > 2e10 else 3
    with torch.enable_grad() if case.needs_grad else torch.no_grad():
        expected = case.eager(*inputs).detach().clone()
        contenders = {"eager": lambda: case.eager(*inputs)}
        if with_compile:
            compiled = torch.compile(case.eager)
            time_ms(lambda: compiled(*inputs), device, repeats=1, warmup=1)  # compiles
            contenders["compile"] = lambda: compiled(*inputs)
        with fastcnn.use_backend(backend):  # the eager and compiled code run no fastcnn op
            got = case.fastcnn(*inputs).detach().clone()
            contenders["fastcnn"] = lambda: case.fastcnn(*inputs)
            for _ in range(warmup - 1):
                for fn in contenders.values():
                    fn()
            # Interleaved rounds: a slow spell of the machine falls on every contender alike.
            times = time_ms_interleaved(contenders, device, min_repeats=repeats, max_repeats=repeats)
    ms, eager_ms, compile_ms = times["fastcnn"], times["eager"], times.get("compile")
    tol = {torch.float32: 1e-4, torch.float64: 1e-8}.get(dtype, 2e-2)
    if case.compute_bound:  # sums of many terms: judged against the result's own scale
        tol_abs = tol * max(1.0, float(expected.float().abs().max()))
    else:
        tol_abs = tol
    matches = bool(torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol_abs, equal_nan=True))
    nbytes = case.bytes_moved(inputs, got)
    gbps = nbytes / ms / 1e6
    tflops = case.flops / ms / 1e9
    floor_ms, bound = ((roofline.time_floor_ms(case.flops, nbytes, limits), roofline.bound(case.flops, nbytes, limits))
                       if case.compute_bound else (None, None))
    return Row(case.op, case.label, "x".join(map(str, case.shape)), str(dtype).removeprefix("torch."), backend,
               ms, eager_ms, eager_ms / ms, gbps, gbps / limits.copy_gbps, matches, tflops,
               tflops / limits.matmul_tflops, compile_ms, floor_ms, bound)


def layer_set_cases(device: torch.device, nets: list[str] | None, backward: bool, channels_last: bool) -> list[Case]:
    """Every distinct conv and FC layer of the networks (fastcnn/bench/layers.py)."""
    from fastcnn.bench.layer_cases import layer_case
    from fastcnn.bench.layers import distinct_layers, on_device
    return [layer_case(on_device(layer, device), channels_last=channels_last, backward=backward)
            for layer in distinct_layers(nets)]


def run(device: torch.device, dtype: torch.dtype, *, ops: list[str] | None = None, backends: list[str] | None = None,
        quick: bool = False, console: Console | None = None, layers: bool = False, nets: list[str] | None = None,
        backward: bool = False, with_compile: bool = False, channels_last: bool = True):
    console = console or Console()
    pool = (layer_set_cases(device, nets, backward, channels_last) if layers else cases(device, quick=quick))
    selected = [c for c in pool if ops is None or c.op in ops]
    names = backends or benchmark_backends(device)
    console.print(f"[bold]fastcnn bench[/bold] on {describe(device)}; backends: {', '.join(names)}; dtype {dtype}")
    limits = ceilings_mod.measure(device, quick=quick, dtype=dtype)
    console.print(f"measured ceilings: copy {limits.copy_gbps:.1f} GB/s, "
                  f"{limits.matmul_dtype} matmul {limits.matmul_tflops:.2f} TFLOP/s")
    rows: list[Row] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(selected) * len(names))
        for case in selected:
            for backend in names:
                progress.update(task, description=f"{case.op} {case.label} [{backend}]")
                rows.append(run_case(case, backend, dtype, device, limits, quick, with_compile))
                progress.advance(task)
    return limits, rows


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def achieved(r: Row) -> tuple[str, str]:
    """(achieved rate, its fraction of this machine's ceiling): TFLOP/s against the
    matrix product for compute-bound ops, GB/s against the copy for the others."""
    if r.compute_bound:
        return f"{r.tflops:.3f} TFLOP/s", f"{100 * r.fraction_of_matmul:.0f}% of matmul"
    return f"{r.gbps:.1f} GB/s", f"{100 * r.fraction_of_copy:.0f}% of copy"


def _compile_text(r: Row) -> str:
    return "" if r.compile_ms is None else f"{r.compile_ms:.3f}"


def floor_texts(r: Row) -> tuple[str, str]:
    """(the roofline's time floor and its bound, the floor as a fraction of the
    measured time: 100% runs at the floor); empty for ops without multiply-adds
    (pools, elementwise), whose "of ceiling" already says it."""
    if r.floor_ms is None:
        return "", ""
    return f"{r.floor_ms:.3f} ({r.bound})", f"{100 * r.floor_ms / r.ms:.0f}%"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def geomean_speedups(rows: list[Row]) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(op, backend) -> (geometric mean speedup, worst speedup, layer count)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r.op, r.backend)].append(r.speedup)
    return {k: (_geomean(v), min(v), len(v)) for k, v in groups.items()}


def table(rows: list[Row], limits) -> Table:
    t = Table(title=f"fastcnn vs eager PyTorch (copy {limits.copy_gbps:.0f} GB/s, "
                    f"matmul {limits.matmul_tflops:.2f} TFLOP/s)")
    with_compile = any(r.compile_ms is not None for r in rows)
    with_floor = any(r.floor_ms is not None for r in rows)
    columns = ["op", "case", "shape", "backend", "ms", "eager ms", *(["compile ms"] if with_compile else []),
               "speedup", "achieved", "of ceiling", *(["floor ms", "of floor"] if with_floor else []), "ok"]
    for col in columns:
        t.add_column(col, justify="right" if col not in ("op", "case", "backend") else "left")
    for r in rows:
        t.add_row(r.op, r.case, r.shape, r.backend, f"{r.ms:.3f}", f"{r.eager_ms:.3f}",
                  *([_compile_text(r)] if with_compile else []), f"{r.speedup:.2f}x", *achieved(r),
                  *(floor_texts(r) if with_floor else []), "yes" if r.matches_eager else "NO")
    return t


def summary_lines(rows: list[Row]) -> list[str]:
    lines = []
    for (op, backend), (g, worst, n) in geomean_speedups(rows).items():
        if n < 2:
            continue
        line = f"{op} [{backend}]: geometric mean {g:.2f}x eager over {n} cases, worst {worst:.2f}x"
        compiled = [r.compile_ms / r.ms for r in rows if r.op == op and r.backend == backend and r.compile_ms]
        if compiled:
            line += f"; {_geomean(compiled):.2f}x torch.compile"
        lines.append(line)
    return lines


def markdown(rows: list[Row], limits, device: torch.device) -> str:
    with_compile = any(r.compile_ms is not None for r in rows)
    with_floor = any(r.floor_ms is not None for r in rows)
    lines = [f"Device: {describe(device)}; torch {torch.__version__}; measured copy {limits.copy_gbps:.1f} GB/s, "
             f"{limits.matmul_dtype} matmul {limits.matmul_tflops:.2f} TFLOP/s", "",
             "| op | case | shape | dtype | backend | ms | eager ms |" + (" compile ms |" if with_compile else "")
             + " speedup | achieved | of ceiling |" + (" floor ms | of floor |" if with_floor else "")
             + " matches eager |",
             "| --- | --- | --- | --- | --- | ---: | ---: |" + (" ---: |" if with_compile else "")
             + " ---: | ---: | ---: |" + (" ---: | ---: |" if with_floor else "") + " --- |"]
    for r in rows:
        rate, fraction = achieved(r)
        lines.append(f"| {r.op} | {r.case} | {r.shape} | {r.dtype} | {r.backend} | {r.ms:.3f} | {r.eager_ms:.3f} | "
                     + (f"{_compile_text(r)} | " if with_compile else "")
                     + f"{r.speedup:.2f}x | {rate} | {fraction} | "
                     + ("{} | {} | ".format(*floor_texts(r)) if with_floor else "") + f"{r.matches_eager} |")
    summary = summary_lines(rows)
    if summary:
        lines += ["", *[f"- {line}" for line in summary]]
    return "\n".join(lines) + "\n"


def save(rows: list[Row], limits, device: torch.device, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        payload = {"device": describe(device), "torch": torch.__version__, "ceilings": asdict(limits),
                   "rows": [asdict(r) for r in rows]}
        Path(json_path).write_text(json.dumps(payload, indent=2))
    if markdown_path:
        Path(markdown_path).write_text(markdown(rows, limits, device))
