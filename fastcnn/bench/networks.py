"""Whole networks: images per second of fastcnn's models against the same network
in eager PyTorch (fastcnn.models.reference, in NCHW or channels_last, whichever is
faster) and torch.compile of it, for inference and for a training step.

Inference: fastcnn's model fused (BatchNorm folded, model.fuse()) under
torch.no_grad, against the eager network in eval mode. A training step: forward,
cross-entropy against fixed labels, backward and an SGD step, all three the same
way. Every contender gets the same weights. With `autocast`, weights and inputs
stay float32 and each call runs under torch.autocast in the dtype asked for (mixed
precision, as training is usually run); otherwise everything is in that dtype."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as torch_F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

import fastcnn
from fastcnn import models
from fastcnn.bench import graphs
from fastcnn.bench.timing import time_ms, time_ms_interleaved
from fastcnn.models import reference

DEFAULT_NETS = ["lenet5", "alexnet", "vgg16", "resnet50", "googlenet"]
MODES = ("infer", "train")
NUM_CLASSES = 1000


def input_shape(net: str) -> tuple[int, int, int]:
    """(C, H, W) the network was designed for."""
    if net == "lenet5":
        return (1, 32, 32)
    if net == "alexnet_original":
        return (3, 227, 227)
    return (3, 224, 224)


def default_batches(device: torch.device) -> list[int]:
    """Batch 1 and 8 on the CPU (latency and a small batch); 256 on a GPU."""
    return [256] if device.type == "cuda" else [1, 8]


@dataclass
class NetRow:
    net: str
    mode: str
    batch: int
    dtype: str
    backend: str
    ms: float  # fastcnn, per batch
    eager_ms: float  # eager PyTorch in its faster layout
    eager_layout: str  # "nchw" or "channels_last"
    compile_ms: float | None
    matches_eager: bool
    cuda_graphs: bool = False  # every contender captured once and replayed (bench/graphs.py)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.ms * 1e3

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.ms

    @property
    def speedup_vs_compile(self) -> float | None:
        return None if self.compile_ms is None else self.compile_ms / self.ms


@dataclass
class Workload:
    """One network at one batch size: fastcnn's model, the eager reference with the
    same weights, an input batch and its labels."""
    net: str
    mode: str
    model: nn.Module
    eager: nn.Module
    x: torch.Tensor
    labels: torch.Tensor
    autocast_dtype: torch.dtype | None = None  # calls run under torch.autocast in this dtype


def workload(net: str, mode: str, batch: int, dtype: torch.dtype, device: torch.device,
             autocast: bool = False) -> Workload:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    classes = 10 if net == "lenet5" else NUM_CLASSES
    torch.manual_seed(0)
    model = models.get_model(net, num_classes=classes)
    eager = getattr(reference, net)(num_classes=classes)
    eager.load_state_dict(model.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(0)
    storage_dtype = torch.float32 if autocast else dtype
    x = torch.randn(batch, *input_shape(net), generator=gen).to(device, storage_dtype)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    model, eager = model.to(device, storage_dtype), eager.to(device, storage_dtype)
    model.train(mode == "train")
    eager.train(mode == "train")
    return Workload(net, mode, model, eager, x, labels, dtype if autocast else None)


def contender(w: Workload, name: str, channels_last: bool = True):
    """A callable running one inference or training step of `name`: "fastcnn" (the
    model, fused for inference, in channels_last), "eager" or "compile" (the
    reference, as it is or torch.compile'd) in the layout asked for. Each gets its
    own copy of the weights."""
    if name == "fastcnn":
        module = copy.deepcopy(w.model)
        module = module.fuse(inplace=True) if w.mode == "infer" else module
    elif name in ("eager", "compile"):
        module = copy.deepcopy(w.eager)
    else:
        raise ValueError(f"contender must be 'fastcnn', 'eager' or 'compile', got {name!r}")
    x = w.x
    if channels_last:
        module, x = module.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if name == "compile":
        module = torch.compile(module)
    precision = (torch.autocast(x.device.type, dtype=w.autocast_dtype) if w.autocast_dtype is not None
                 else contextlib.nullcontext())
    if w.mode == "infer":
        def infer():
            with torch.no_grad(), precision:
                return module(x)
        return infer
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        with torch.enable_grad():
            opt.zero_grad(set_to_none=True)
            with precision:  # the forward and the loss; the backward follows the forward's dtypes
                loss = _loss(module(x), w.labels)
            loss.backward()
            opt.step()
        return loss.detach()

    return train_step


def _loss(out, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(out, tuple):  # GoogLeNet in training: each side classifier weighs 0.3, as in the paper
        logits, *aux = out
        return torch_F.cross_entropy(logits, labels) + sum(0.3 * torch_F.cross_entropy(a, labels) for a in aux)
    return torch_F.cross_entropy(out, labels)


def first_result(fn):
    """The first call's result (logits, or a training step's loss), with the same
    dropout masks for every contender."""
    torch.manual_seed(1)
    return fn()


def run_network(net: str, mode: str, batch: int, dtype: torch.dtype, device: torch.device, backend: str,
                with_compile: bool, autocast: bool = False, cuda_graphs: bool = False) -> NetRow:
    """Times fastcnn, eager in both layouts and (with_compile) torch.compile in
    interleaved rounds (timing.time_ms_interleaved): about a second each, 5 to 200
    samples (a batch-1 LeNet-5 call takes ~0.2 ms on a CPU, a batch-8 VGG-16 call
    seconds; with 3, one slow spell of the machine could move a median by 2x).
    cuda_graphs (inference on a GPU): every contender is captured in a CUDA graph and
    replayed, and fastcnn's output is checked from a replay."""
    if cuda_graphs and mode != "infer":
        raise ValueError(f"cuda_graphs: inference only, not {mode!r}")
    graphed = (lambda fn: graphs.capture(fn, device)) if cuda_graphs else (lambda fn: fn)
    w = workload(net, mode, batch, dtype, device, autocast)
    eager = {layout: contender(w, "eager", channels_last=layout == "channels_last")
             for layout in ("nchw", "channels_last")}
    expected = first_result(eager["nchw"])
    eager = {layout: graphed(fn) for layout, fn in eager.items()}
    contenders = {f"eager-{layout}": fn for layout, fn in eager.items()}
    if with_compile:
        # Compiled for the layout eager is faster in, judged by a first quick timing.
        quick = {layout: time_ms(fn, device, warmup=1, repeats=3) for layout, fn in eager.items()}
        compiled = contender(w, "compile", channels_last=min(quick, key=quick.get) == "channels_last")
        time_ms(compiled, device, warmup=1, repeats=1)  # compiles
        contenders["compile"] = graphed(compiled)
    with fastcnn.use_backend(backend):  # eager and compiled PyTorch run no fastcnn op
        contenders["fastcnn"] = fn = graphed(contender(w, "fastcnn"))
        got = first_result(fn)
        ms = time_ms_interleaved(contenders, device, min_repeats=5)
    eager_layout = min(eager, key=lambda layout: ms[f"eager-{layout}"])
    dtype_text = str(dtype).removeprefix("torch.") + (" autocast" if autocast else "")
    return NetRow(net, mode, batch, dtype_text, backend, ms["fastcnn"],
                  ms[f"eager-{eager_layout}"], eager_layout, ms.get("compile"), close(got, expected, dtype),
                  cuda_graphs)


def close(got, expected, dtype) -> bool:
    """Same logits (or first loss) as eager within the dtype's rounding of deep sums,
    judged against the result's own scale."""
    tol = {torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype, 3e-2)
    scale = max(1.0, float(expected.float().abs().max()))
    return bool(torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol * scale))


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def run(device: torch.device, dtype: torch.dtype, *, nets: list[str] | None = None, batches: list[int] | None = None,
        modes: list[str] | None = None, backends: list[str], with_compile: bool | None = None,
        autocast: bool = False, console: Console | None = None, cuda_graphs: bool = False) -> list[NetRow]:
    """with_compile: time torch.compile too; None (the default) times it for inference
    everywhere and for training on a GPU only: compiling every network's forward and
    backward graphs is slow on a CPU. autocast: float32 weights and inputs, calls
    under torch.autocast in `dtype`. cuda_graphs: every contender replayed from a CUDA
    graph (inference on a GPU; the default modes are then inference only)."""
    if cuda_graphs:
        if device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
        if modes is not None and "train" in modes:
            raise ValueError("cuda_graphs times inference only (--mode infer)")
        modes = ["infer"]
    console = console or Console()
    nets = nets or DEFAULT_NETS
    unknown = [n for n in nets if n not in models.list_models()]
    if unknown:
        raise ValueError(f"unknown network(s) {', '.join(unknown)}; the networks are: {', '.join(models.list_models())}")
    batches = batches or default_batches(device)
    modes = modes or list(MODES)
    jobs = [(n, m, b, be) for n in nets for m in modes for b in batches for be in backends]
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(jobs))
        for net, mode, batch, backend in jobs:
            progress.update(task, description=f"{net} {mode} batch {batch} [{backend}]")
            compile_this = with_compile if with_compile is not None else (mode == "infer" or device.type == "cuda")
            rows.append(run_network(net, mode, batch, dtype, device, backend, compile_this, autocast, cuda_graphs))
            progress.advance(task)
    return rows


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


COLUMNS = ["net", "mode", "batch", "backend", "fastcnn ms", "images/s", "eager ms", "eager layout", "compile ms",
           "vs eager", "vs compile", "matches eager"]


def _cells(r: NetRow) -> list[str]:
    return [r.net, r.mode + (" (CUDA graphs)" if r.cuda_graphs else ""), str(r.batch), r.backend, _ms(r.ms), f"{r.images_per_s:.1f}", _ms(r.eager_ms),
            r.eager_layout, _ms(r.compile_ms), _ratio(r.speedup), _ratio(r.speedup_vs_compile),
            "yes" if r.matches_eager else "NO"]


def table(rows: list[NetRow], title: str) -> Table:
    t = Table(title=title)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("net", "mode", "backend", "eager layout") else "right")
    for r in rows:
        t.add_row(*_cells(r))
    return t


def summary_lines(rows: list[NetRow]) -> list[str]:
    lines = []
    for mode in MODES:
        for backend in sorted({r.backend for r in rows}):
            group = [r for r in rows if r.mode == mode and r.backend == backend]
            if not group:
                continue
            line = (f"{mode} [{backend}]: geometric mean {geomean([r.speedup for r in group]):.2f}x eager over "
                    f"{len(group)} runs, worst {min(r.speedup for r in group):.2f}x")
            compiled = [r.speedup_vs_compile for r in group if r.speedup_vs_compile is not None]
            if compiled:
                line += f"; {geomean(compiled):.2f}x torch.compile"
            lines.append(line)
    return lines


def markdown(rows: list[NetRow], device_text: str) -> str:
    lines = [f"Device: {device_text}; torch {torch.__version__}", "",
             "| " + " | ".join(COLUMNS) + " |",
             "| " + " | ".join("---" if c in ("net", "mode", "backend", "eager layout") else "---:"
                               for c in COLUMNS) + " |"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += ["", *[f"- {line}" for line in summary_lines(rows)]]
    return "\n".join(lines) + "\n"


def save(rows: list[NetRow], device_text: str, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        payload = {"device": device_text, "torch": torch.__version__,
                   "rows": [{**asdict(r), "images_per_s": r.images_per_s, "speedup": r.speedup,
                             "speedup_vs_compile": r.speedup_vs_compile} for r in rows]}
        Path(json_path).write_text(json.dumps(payload, indent=2))
    if markdown_path:
        Path(markdown_path).write_text(markdown(rows, device_text))


def plot(rows: list[NetRow], path: str, device_text: str) -> None:
    """A bar chart of fastcnn's speedup over eager (and torch.compile) per run."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("the bar chart needs matplotlib: pip install 'fastcnn[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.net}\n{r.mode} b{r.batch}" + (f"\n{r.backend}" if len({x.backend for x in rows}) > 1 else "")
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 4.5))
    xs = range(len(rows))
    with_compile = any(r.compile_ms is not None for r in rows)
    width = 0.4 if with_compile else 0.6
    ax.bar([x - (width / 2 if with_compile else 0) for x in xs], [r.speedup for r in rows], width,
           label="vs eager PyTorch")
    if with_compile:
        ax.bar([x + width / 2 for x in xs], [r.speedup_vs_compile or 0 for r in rows], width,
               label="vs torch.compile")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("speedup (higher is faster)")
    ax.set_title(f"fastcnn speedup, {rows[0].dtype if rows else ''} on {device_text}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
