"""Tunes the Triton convolution and GEMM kernels on this machine's GPU and writes the
committed table fastcnn/triton/tuned/<gpu-kind>.json that fastcnn.triton.tuning reads
first, so that the layers listed here need no tuning at run time.

For every conv layer (forward, input gradient, weight gradient) and FC layer
(forward and both gradient GEMMs, on the transposed views the backward passes), at
each dtype, every candidate config that fits the GPU's shared memory is run once and
checked against PyTorch (a config that miscompiles is dropped, not shipped), then
timed with triton.testing.do_bench; the fastest goes into the table.

    python benches/tune_triton.py                          # every layer, float16, batch 64
    python benches/tune_triton.py --nets resnet50 --dtypes float16 bfloat16 --batch 32
    python benches/tune_triton.py --kernels conv2d_forward linear --max-configs 6 --deadline 240
    TRITON_INTERPRET=1 python benches/tune_triton.py --dry-run   # the logic, on the CPU

--dry-run uses one tiny conv and one tiny GEMM, at most two configs each, times with
the wall clock, and writes nothing unless --out is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcnn.bench.layers import NETWORKS, conv_layers, linear_layers  # noqa: E402
from fastcnn.ops.conv_geometry import conv_params, geometry  # noqa: E402
from fastcnn.triton import conv2d as triton_conv  # noqa: E402
from fastcnn.triton import linear as triton_linear  # noqa: E402
from fastcnn.triton import tuning  # noqa: E402



def conv_layer_tuples(nets) -> list[tuple]:
    """(C, H, W, K, kernel, stride, padding, groups) of every distinct conv of the nets."""
    return list(dict.fromkeys((l.in_channels, *l.size, l.out_channels, l.kernel, l.stride, l.padding, l.groups)
                              for l in conv_layers(nets)))


def fc_layer_tuples(nets) -> list[tuple[int, int]]:
    """(in_features, out_features) of every distinct FC layer of the nets."""
    return [(l.in_features, l.out_features) for l in linear_layers(nets)]


STARTED = time.time()
KERNELS = ("conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad", "linear")
DRY_CONV = [(3, 6, 5, 4, 3, 1, 1, 1)]
DRY_FC = [(16, 8)]


def conv_tasks(layer: tuple, batch: int, dtype: torch.dtype, device: torch.device, kernels=KERNELS):
    """(kernel, launch, reference) for the conv kernels of one layer that `kernels` names
    (the backward reference is computed only where a gradient kernel is tuned)."""
    c, h, w, k, ksize, stride, pad, groups = layer
    x = torch.randn(batch, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(k, c // groups, ksize, ksize, device=device, dtype=dtype) / (c * ksize * ksize) ** 0.5)
    wt = wt.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(k, device=device, dtype=dtype)
    params = conv_params(x, wt, stride, pad, 1, groups)
    geom = geometry(params, x.shape, wt.shape)
    out = torch.empty(batch, k, geom[7], geom[8], device=device, dtype=dtype,
                      memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    grad_x = torch.empty_like(x)
    grad_w = torch.empty_like(wt)
    # The reference in float32 without TF32 (float64 convs of the big layers are slow on GPU).
    backward = any(k in kernels for k in ("conv2d_input_grad", "conv2d_weight_grad"))
    xd, wd = x.float().requires_grad_(backward), wt.float().requires_grad_(backward)
    y = F.conv2d(xd, wd, bias.float(), stride, pad, 1, groups)
    if backward:
        y.backward(grad.float())
    tasks = [
        ("conv2d_forward", out, lambda cfg: triton_conv.conv2d_forward(x, wt, bias, None, out, geom, "relu", False,
                                                                       config=cfg), lambda: torch.relu(y.detach())),
        ("conv2d_input_grad", grad_x, lambda cfg: triton_conv.conv2d_input_grad(grad, wt, grad_x, geom, False,
                                                                                config=cfg), lambda: xd.grad),
        ("conv2d_weight_grad", grad_w, lambda cfg: triton_conv.conv2d_weight_grad(grad, x, grad_w, geom, False,
                                                                                  config=cfg), lambda: wd.grad),
    ]
    return [(kernel, o, launch, ref()) for kernel, o, launch, ref in tasks if kernel in kernels]


def fc_tasks(layer: tuple[int, int], batch: int, dtype: torch.dtype, device: torch.device, kernels=KERNELS):
    """(kernel, launch, reference) for the forward GEMM and the two backward GEMMs."""
    k, n = layer
    x = torch.randn(batch, k, device=device, dtype=dtype)
    wt = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    grad = torch.randn(batch, n, device=device, dtype=dtype)
    gemms = [(x, wt), (grad, wt.t()), (grad.t(), x.t())]  # forward, grad_input, grad_weight
    tasks = []
    for a, b in gemms:
        out = torch.empty(a.shape[0], b.shape[0], device=device, dtype=dtype)
        ref = a.float() @ b.float().t()
        tasks.append(("linear", out, (lambda a, b, out: lambda cfg: triton_linear.linear(a, b, None, out, None, False,
                                                                                         config=cfg))(a, b, out), ref))
    return tasks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--dtypes", nargs="*", default=["float16"], choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=64, help="conv batch (the bench's GPU batch)")
    parser.add_argument("--fc-batch", type=int, default=8)
    parser.add_argument("--max-configs", type=int, default=None, help="time at most this many candidates")
    parser.add_argument("--kernels", nargs="*", default=list(KERNELS), choices=list(KERNELS),
                        help="tune only these kernels (default: all)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="start no new layer after this many seconds; what was tuned is written")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 configs, writes only --out")
    parser.add_argument("--out", type=Path, default=None, help="table to write (default: the committed one)")
    args = parser.parse_args(argv)
    args.started = STARTED if argv is None else time.time()  # the deadline counts from the start

    device = torch.device("cpu") if tuning.interpreting(torch.device("cuda")) else torch.device("cuda")
    if device.type == "cpu" and not args.dry_run:
        parser.error("no GPU here: only --dry-run runs under the Triton interpreter")
    if args.dry_run:
        kind, shared_memory = "dry-run", 228 * 1024
        timer = wall_clock_ms
        limit = 2 if args.max_configs is None else args.max_configs
        conv_shapes, fc_shapes, batch, fc_batch = DRY_CONV, DRY_FC, 2, 3
    else:
        kind, shared_memory = tuning.gpu_kind(device), tuning.device_shared_memory(device)
        timer, limit = tuning.do_bench_ms, args.max_configs
        conv_shapes, fc_shapes = conv_layer_tuples(args.nets), fc_layer_tuples(args.nets)
        batch, fc_batch = args.batch, args.fc_batch

    checked: dict[str, tuple] = {}

    def verify(kernel: str, config: tuning.Config, run) -> bool:
        out, ref, dtype = checked["current"]
        out.fill_(float("nan"))
        run()
        err = ((out.float() - ref) / (ref.abs() + 1)).abs().max().item()
        ok = err == err and err < {torch.float16: 2e-2, torch.bfloat16: 8e-2}.get(dtype, 1e-3)
        if not ok:
            print(f"  REJECTED {kernel} {config}: max error {err:.3g}", flush=True)
        return ok

    tuner = tuning.Tuner(kind, shared_memory, None, None, timer=timer, retune=True, verify=verify, limit=limit)
    tuning.set_tuner(device, tuner)
    previous_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    header = {"gpu": kind, "triton": tuning.triton.__version__, "torch": torch.__version__}
    path = args.out if args.out is not None else (None if args.dry_run else tuning.TABLE_DIR / f"{kind}.json")

    def save(chosen: dict) -> None:
        # After every layer, so that a run stopped from outside keeps what it tuned.
        if path is not None and chosen:
            tuning.write_configs(path, chosen, header)

    try:
        chosen = _tune(args, device, tuner, conv_shapes, fc_shapes, batch, fc_batch, checked, save)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    if args.dry_run:
        print(tuning.format_json({k: {e: list(c) for e, c in v.items()} for k, v in chosen.items()}))
    save(chosen)
    if path is not None:
        print(f"wrote {sum(len(v) for v in chosen.values())} configs to {path}")
    return chosen


def _tune(args, device, tuner, conv_shapes, fc_shapes, batch, fc_batch, checked, save) -> dict:
    started = args.started
    layers = []
    if any(k.startswith("conv2d") for k in args.kernels):
        layers += [(layer, conv_tasks) for layer in conv_shapes]
    if "linear" in args.kernels:
        layers += [(layer, fc_tasks) for layer in fc_shapes]
    for dtype_name, (layer, make_tasks) in ((d, item) for d in args.dtypes for item in layers):
        if args.deadline is not None and time.time() - started > args.deadline:
            print(f"deadline of {args.deadline:.0f} s reached: {dtype_name} from {layer} on is not tuned")
            break
        dtype = getattr(torch, dtype_name)
        tasks = make_tasks(layer, batch if make_tasks is conv_tasks else fc_batch, dtype, device, args.kernels)
        for kernel, out, launch, ref in tasks:
            checked["current"] = (out, ref, dtype)
            launch(None)  # the launcher asks the tuner, which times every candidate
            print(f"{dtype_name} {layer} {kernel}: {time.time() - started:.0f} s", flush=True)
        del tasks
        save(tuner.chosen())
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for (kernel, config), why in tuner.failures.items():
        print(f"  failed {kernel} {config}: {why}")
    return tuner.chosen()


def wall_clock_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


if __name__ == "__main__":
    main()
