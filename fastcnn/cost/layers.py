"""Per-layer cost formulas: multiply-accumulates of convolutions and FC layers, and the
fewest bytes a layer must move (every input, weight and output once).

A multiply-accumulate is one multiplication and one addition of a dot product; the
bias, activation, fused residual add, pooling and normalisation are elementwise work,
counted in bytes but not in MACs (as torchvision's "GFLOPS", which count MACs)."""

from __future__ import annotations

import math

from torch import Tensor, nn


def layer_macs(module: nn.Module, inputs: tuple, output) -> int:
    """Multiply-accumulates of one call: convolutions (any groups, transposed too) and
    linear layers; 0 for everything else."""
    out = first_tensor(output)
    if out is None:
        return 0
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        if module.transposed:  # each input element is scattered over kernel * C_out/groups outputs
            x = first_tensor(inputs)
            return x.numel() * module.out_channels // module.groups * kernel if x is not None else 0
        # Each output element is a dot product over C_in/groups * kernel inputs.
        return out.numel() * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    if isinstance(module, nn.Bilinear):
        return out.numel() * module.in1_features * module.in2_features
    return 0


# Modules that only reshape or pass their input on: they move no data.
_NO_DATA_MOVED = (nn.Identity, nn.Flatten, nn.Unflatten)


def moved_bytes(module: nn.Module, args: tuple, kwargs: dict, output) -> tuple[int, int]:
    """(bytes read, bytes written) of one call: the tensor inputs (a residual included;
    `out=`, the destination, is written, not read), the parameters and floating-point
    buffers (BatchNorm's running statistics), and the outputs."""
    inputs = tensors(args) + [t for k, t in _kwarg_tensors(kwargs) if k != "out"]
    outputs = tensors(output)
    passthrough = all(any(o is i for i in inputs) for o in outputs) and not getattr(module, "inplace", False)
    if isinstance(module, _NO_DATA_MOVED) or (outputs and passthrough):
        return 0, 0
    weights = [*module.parameters(recurse=False),
               *(b for b in module.buffers(recurse=False) if b.is_floating_point())]
    read = sum(nbytes(t) for t in (*inputs, *weights))
    return read, sum(nbytes(t) for t in outputs)


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def tensors(value) -> list[Tensor]:
    """The tensors in a module's arguments or output (tuples, lists, dicts, NamedTuples)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    return []


def first_tensor(value) -> Tensor | None:
    found = tensors(value)
    return found[0] if found else None


def _kwarg_tensors(kwargs: dict):
    for key, value in kwargs.items():
        for t in tensors(value):
            yield key, t

