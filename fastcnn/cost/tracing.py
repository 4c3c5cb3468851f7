"""fastcnn.summary: one row per call of each leaf module of any torch.nn model, from
one forward pass on the meta device (shapes only: no compute, no activation memory).

A module called several times (a shared layer) gets one row per call, numbered by
`call`; its parameters are counted on the first call only, so the rows' parameters
add up to the model's. Work done outside leaf modules (a `torch.cat` or `x + y`
written in a forward) has no row."""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from fastcnn.cost.layers import first_tensor, layer_macs, moved_bytes


@dataclass(frozen=True)
class LayerCost:
    name: str  # the module's qualified name in the model ("" for the model itself)
    type: str
    call: int  # 1 for a module's first call, 2 for its second, ...
    output_shape: tuple[int, ...]
    params: int
    macs: int
    bytes_read: int
    bytes_written: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity: FLOP per byte moved (0 for a layer that moves nothing)."""
        return self.flops / self.bytes if self.bytes else 0.0

    @property
    def label(self) -> str:
        name = self.name or self.type
        return name if self.call == 1 else f"{name} (call {self.call})"


@dataclass(frozen=True)
class Summary:
    model: str
    input_sizes: tuple[tuple[int, ...], ...]
    dtype: str
    rows: list[LayerCost] = field(default_factory=list)
    total_params: int = 0  # every parameter of the model once, used in the forward or not
    trainable_params: int = 0

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def total_flops(self) -> int:
        return 2 * self.total_macs

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def table(self):
        """The rows and totals as a rich Table."""
        from rich.table import Table

        sizes = ", ".join("x".join(map(str, s)) for s in self.input_sizes)
        t = Table(title=f"{self.model}: input {sizes}, {self.dtype}")
        for col in ("layer", "type", "output shape", "params", "MACs", "read", "written", "FLOP/B"):
            t.add_column(col, justify="left" if col in ("layer", "type") else "right")
        for r in self.rows:
            t.add_row(r.label, r.type, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}",
                      format_bytes(r.bytes_read), format_bytes(r.bytes_written), f"{r.intensity:.1f}")
        intensity = self.total_flops / self.total_bytes if self.total_bytes else 0.0
        t.add_section()
        t.add_row("total", f"{len(self.rows)} calls", "", f"{self.total_params:,}", f"{self.total_macs:,}",
                  format_bytes(sum(r.bytes_read for r in self.rows)),
                  format_bytes(sum(r.bytes_written for r in self.rows)), f"{intensity:.1f}", style="bold")
        return t


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def wide_console():
    """A rich Console; one that is not a terminal (a pipe, a log) gets room for the
    whole table instead of 80 columns."""
    from rich.console import Console
    return Console() if sys.stdout.isatty() else Console(width=160)


def summary(model: nn.Module, input_size: Sequence[int] | Sequence[Sequence[int]], dtype: torch.dtype = torch.float32,
            *, print_table: bool = True) -> Summary:
    """Shapes, parameters, multiply-accumulates and bytes (at `dtype`) of every leaf
    layer of `model` for an input of `input_size` (or a list of sizes for a model
    with several inputs), with totals; prints them as a table unless print_table is
    False. The model is not changed: a copy of it runs once, in eval mode, on the
    meta device. Raises ValueError naming the failing layer when the model cannot
    take an input of that size."""
    sizes = _input_sizes(input_size)
    meta = meta_copy(model, dtype).eval()
    names = {m: n for n, m in meta.named_modules()}
    calls: dict[nn.Module, int] = {}
    counted_params: set[int] = set()
    entered: list[str] = []
    rows: list[LayerCost] = []

    def before(module, args, kwargs):
        entered.append(names[module])

    def after(module, args, kwargs, output):
        entered.pop()
        calls[module] = calls.get(module, 0) + 1
        new_params = [p for p in module.parameters(recurse=False) if id(p) not in counted_params]
        counted_params.update(id(p) for p in new_params)
        read, written = moved_bytes(module, args, kwargs, output)
        out = first_tensor(output)
        rows.append(LayerCost(names[module], type(module).__name__, calls[module],
                              tuple(out.shape) if out is not None else (), sum(p.numel() for p in new_params),
                              layer_macs(module, args, output), read, written))

    leaves = [m for m in meta.modules() if next(m.children(), None) is None]
    handles = [h for m in leaves for h in (m.register_forward_pre_hook(before, with_kwargs=True),
                                           m.register_forward_hook(after, with_kwargs=True))]
    inputs = [torch.empty(s, device="meta", dtype=dtype) for s in sizes]
    try:
        with torch.no_grad():
            meta(*inputs)
    except Exception as e:
        where = (f"in layer {entered[-1]!r}" if entered else
                 f"after layer {rows[-1].label!r}" if rows else "before its first layer")
        shown = ", ".join("x".join(map(str, s)) for s in sizes)
        raise ValueError(f"{type(model).__name__} cannot take an input of size {shown}: it failed {where}: "
                         f"{type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    params = list(model.parameters())  # deduplicated: a shared parameter counts once
    result = Summary(type(model).__name__, sizes, str(dtype).removeprefix("torch."), rows,
                     sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
    if print_table:
        wide_console().print(result.table())
    return result


def meta_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` with its parameters and buffers on the meta device (floating
    ones in `dtype`), made without copying their data (VGG-16's 138M parameters cost
    nothing)."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(_meta_like(p, dtype), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = _meta_like(b, dtype)
    return copy.deepcopy(model, memo)


def _meta_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(t, device="meta", dtype=dtype if t.is_floating_point() else t.dtype)


def _input_sizes(input_size) -> tuple[tuple[int, ...], ...]:
    """One size (a sequence of ints) or several (a sequence of them), checked."""
    if isinstance(input_size, Sequence) and input_size and all(isinstance(s, Sequence) for s in input_size):
        sizes = tuple(tuple(s) for s in input_size)
    elif isinstance(input_size, Sequence):
        sizes = (tuple(input_size),)
    else:
        raise TypeError(f"input_size must be a sequence of ints or of sequences of ints, got {input_size!r}")
    for s in sizes:
        if not s or not all(type(v) is int and v >= 0 for v in s):
            raise ValueError(f"input_size must hold non-negative ints, got {input_size!r}")
    return sizes
