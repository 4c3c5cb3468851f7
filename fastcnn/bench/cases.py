"""What `python -m fastcnn bench` measures: each op on the shapes the classic
networks give it, fastcnn against the way a user writes it in eager PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastcnn import functional as fcf


@dataclass(frozen=True)
class Case:
    op: str
    label: str
    shape: tuple[int, ...]
    channels_last: bool
    make_inputs: Callable[[tuple[int, ...], torch.dtype, torch.device, bool], tuple]
    eager: Callable[..., torch.Tensor]
    fastcnn: Callable[..., torch.Tensor]
    # Fewest bytes the op must move: every input read once, every output written once.
    bytes_moved: Callable[[tuple, torch.Tensor], int]
    # Floating-point operations of one call (2 per multiply-add); 0 for memory-bound ops.
    flops: int = 0
    # Forward + backward: timed with autograd on, compared on the input gradient.
    needs_grad: bool = False

    @property
    def compute_bound(self) -> bool:
        return self.flops > 0


def _activation(shape, dtype, device, channels_last):
    x = torch.randn(shape, dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _two_activations(shape, dtype, device, channels_last):
    return _activation(shape, dtype, device, channels_last), _activation(shape, dtype, device, channels_last)


def _activation_and_bias(shape, dtype, device, channels_last):
    return _activation(shape, dtype, device, channels_last), torch.randn(shape[1], dtype=dtype, device=device)


def _one(shape, dtype, device, channels_last):
    return (_activation(shape, dtype, device, channels_last),)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _bias_view(x, bias):
    return bias.view(1, -1, *([1] * (x.dim() - 2)))


def cases(device: torch.device, *, quick: bool = False) -> list[Case]:
    gpu = device.type == "cuda"
    # The GPU gets a larger batch so that each op moves far more than the 50 MB L2.
    batch = 64 if gpu else 8
    act_shapes = [(batch, 256, 56, 56)] if quick else [(batch, 256, 56, 56), (batch, 64, 112, 112)]
    out: list[Case] = []
    for shape in act_shapes:
        for cl in (False, True):
            layout = "channels_last" if cl else "nchw"
            out.append(Case("add_act", f"relu {layout}", shape, cl, _two_activations,
                            eager=lambda a, b: torch.relu(a + b), fastcnn=lambda a, b: fcf.add_act(a, b, "relu"),
                            bytes_moved=lambda inp, y: nbytes(*inp, y)))
            out.append(Case("bias_act", f"relu {layout}", shape, cl, _activation_and_bias,
                            eager=lambda x, b: torch.relu(x + _bias_view(x, b)),
                            fastcnn=lambda x, b: fcf.bias_act(x, b, "relu"),
                            bytes_moved=lambda inp, y: nbytes(*inp, y)))
    stem = (batch, 64, 112, 112)
    for cl in (False, True):
        layout = "channels_last" if cl else "nchw"
        out.append(Case("max_pool2d", f"3x3/2 pad 1 {layout}", stem, cl, _one,
                        eager=lambda x: F.max_pool2d(x, 3, 2, 1), fastcnn=lambda x: fcf.max_pool2d(x, 3, 2, 1),
                        bytes_moved=lambda inp, y: nbytes(*inp, y)))
        out.append(Case("avg_pool2d", f"2x2/2 {layout}", act_shapes[0], cl, _one,
                        eager=lambda x: F.avg_pool2d(x, 2), fastcnn=lambda x: fcf.avg_pool2d(x, 2),
                        bytes_moved=lambda inp, y: nbytes(*inp, y)))
        out.append(Case("global_avg_pool2d", f"{layout}", (batch, 2048, 7, 7), cl, _one,
                        eager=lambda x: F.adaptive_avg_pool2d(x, 1), fastcnn=fcf.global_avg_pool2d,
                        bytes_moved=lambda inp, y: nbytes(*inp, y)))
    out += representative_layer_cases(device)
    if not quick:
        out.append(Case("bias_act", "relu fc", (32 * batch, 4096), False, _activation_and_bias,
                        eager=lambda x, b: torch.relu(x + b), fastcnn=lambda x, b: fcf.bias_act(x, b, "relu"),
                        bytes_moved=lambda inp, y: nbytes(*inp, y)))
    return out


def representative_layer_cases(device: torch.device) -> list[Case]:
    """A few conv and FC layers for the main job; `--layers` runs all of them."""
    from fastcnn.bench.layer_cases import layer_case
    from fastcnn.bench.layers import BATCH, ConvLayer, LinearLayer, on_device

    picks = [ConvLayer("resnet18", "layer1 conv2", BATCH, 64, (56, 56), 64, 3, 1, 1, residual=True),
             ConvLayer("resnet50", "layer1.1 conv1", BATCH, 256, (56, 56), 64, 1),
             ConvLayer("resnet50", "stem", BATCH, 3, (224, 224), 64, 7, 2, 3),
             LinearLayer("alexnet", "fc7", BATCH, 4096, 4096)]
    return [layer_case(on_device(layer, device), channels_last=True) for layer in picks]
