"""Command line: `python -m fastcnn bench`, `python -m fastcnn summary` and
`python -m fastcnn train` (also the `fastcnn` console script)."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def positive_int(text: str) -> int:
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fastcnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark the classic networks (default), their layers (--layers) or "
                                         "the single ops (--kernels) against eager PyTorch and torch.compile")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="default: float16 on a GPU, float32 on the CPU")
    bench.add_argument("--kernels", action="store_true",
                       help="each op on the shapes the networks give it, instead of whole networks")
    bench.add_argument("--ops", nargs="+", default=None,
                       help="with --kernels (implied): only these ops (e.g. add_act max_pool2d)")
    bench.add_argument("--backends", "--backend", nargs="+", default=None, help="only these fastcnn backends")
    bench.add_argument("--quick", action="store_true", help="with --kernels: fewer shapes and repeats")
    bench.add_argument("--layers", action="store_true",
                       help="every distinct conv and FC layer of the classic networks instead of the op cases")
    bench.add_argument("--nets", nargs="+", default=None,
                       help="these networks (default lenet5 alexnet vgg16 resnet50 googlenet; any of "
                            "fastcnn.models.list_models()); with --layers: their layers (lenet5 alexnet "
                            "vgg16 resnet18 resnet50 googlenet)")
    bench.add_argument("--batch", nargs="+", type=positive_int, default=None,
                       help="networks: batch sizes (default 1 and 8 on the CPU, 256 on a GPU)")
    bench.add_argument("--mode", choices=["infer", "train"], default=None,
                       help="networks: inference or a training step only (default both)")
    bench.add_argument("--no-compile", action="store_true",
                       help="networks: do not time torch.compile (by default it is timed for inference, and for "
                            "training on a GPU; --compile adds training on a CPU)")
    bench.add_argument("--autocast", action="store_true",
                       help="networks: float32 weights and inputs, each call under torch.autocast in --dtype "
                            "(default then float16 on a GPU, bfloat16 on the CPU): mixed precision")
    bench.add_argument("--cuda-graphs", action="store_true",
                       help="networks, inference on a GPU: every contender captured once in a CUDA graph and "
                            "replayed (the kernels' time without the host's per-op cost)")
    bench.add_argument("--plot", default=None, help="networks: write a bar chart of the speedups here (PNG)")
    bench.add_argument("--backward", action="store_true", help="with --layers: time forward + backward")
    bench.add_argument("--nchw", action="store_true", help="with --layers: NCHW instead of channels_last")
    bench.add_argument("--compile", action="store_true",
                       help="also time torch.compile of the eager code (slow): with --kernels or --layers, and "
                            "for network training on a CPU")
    bench.add_argument("--json", default=None, help="write the results as JSON here")
    bench.add_argument("--markdown", default=None, help="write the results as a markdown table here")
    summary = sub.add_parser("summary", help="per-layer shapes, parameters, multiply-adds and bytes of a model, "
                                            "and its layers on this machine's roofline (--roofline)")
    summary.add_argument("model", help="a registered model (fastcnn.models.list_models()) or module:attr, the "
                                       "attr a torch.nn.Module or a callable returning one")
    summary.add_argument("--input", default=None,
                         help="input size N,C,H,W (default: batch 1 at the size a registered model was designed "
                              "for, 1,1,32,32 for LeNet-5; else 1,3,224,224)")
    summary.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the dtype bytes are counted in")
    summary.add_argument("--roofline", default=None,
                         help="also measure this machine's ceilings, print each conv/FC layer's bound and time "
                              "floor, and write a roofline plot here (PNG)")
    summary.add_argument("--device", default=None, help="with --roofline: cpu or cuda (default: cuda when present)")
    summary.add_argument("--time", action="store_true",
                         help="with --roofline: run the model on the device and time each layer against its floor")
    train = sub.add_parser("train", help="train a model on scikit-learn's digits or an image folder (also under "
                                         "torchrun, with DistributedDataParallel)")
    from fastcnn.train import add_arguments

    add_arguments(train)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "bench":
        from rich.console import Console

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        default = torch.float16 if device.type == "cuda" else torch.bfloat16 if args.autocast else torch.float32
        dtype = DTYPES[args.dtype] if args.dtype else default
        console = Console() if sys.stdout.isatty() else Console(width=160)
        check_bench_args(args, device, dtype)
        if args.layers or args.kernels or args.ops:
            return bench_ops(args, device, dtype, console)
        return bench_networks(args, device, dtype, console)
    if args.command == "summary":
        return summarize(args)
    if args.command == "train":
        return train(args)
    return 2


def check_bench_args(args, device: torch.device, dtype: torch.dtype) -> None:
    """The arguments' combinations, checked before anything is timed: a clear message
    instead of a traceback (or a silently ignored option) minutes into a run."""
    from pathlib import Path

    from fastcnn import backends, models
    from fastcnn.bench.layers import NETWORKS

    def refuse(message: str):
        raise SystemExit(f"fastcnn bench: {message}")

    per_op = args.layers or args.kernels or args.ops
    if per_op:
        networks_only = [flag for flag, given in (("--cuda-graphs", args.cuda_graphs), ("--mode", args.mode),
                                                  ("--batch", args.batch), ("--plot", args.plot),
                                                  ("--autocast", args.autocast), ("--no-compile", args.no_compile))
                         if given]
        if networks_only:
            refuse(f"{networks_only[0]} applies to the networks only, not to --layers, --kernels or --ops")
        if args.nets and not args.layers:
            refuse("--nets picks the networks, or with --layers their layers; --kernels times the op cases")
    known = sorted(NETWORKS) if args.layers else models.list_models()
    unknown = [n for n in args.nets or () if n not in known]
    if unknown:
        refuse(f"unknown network {unknown[0]!r}{' for --layers' if args.layers else ''}; known: {', '.join(known)}")
    if args.ops:
        from fastcnn.bench.cases import cases
        ops = sorted({case.op for case in cases(device, quick=True)})
        unknown = [o for o in args.ops if o not in ops]
        if unknown:
            refuse(f"unknown op {unknown[0]!r}; known: {', '.join(ops)}")
    if args.autocast and dtype not in (torch.float16, torch.bfloat16):
        refuse(f"--autocast runs in float16 or bfloat16, not {str(dtype).removeprefix('torch.')}")
    available = backends.available_backends(device)
    missing = [b for b in args.backends or () if b not in available]
    if missing:
        refuse(f"backend {missing[0]!r} cannot run on {device}; available here: {', '.join(available)}")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            refuse(f"{flag} {path}: its directory does not exist")


def train(args) -> int:
    from fastcnn.train import run

    run(args)
    return 0


def bench_networks(args, device, dtype, console) -> int:
    from fastcnn.bench import networks, runner

    backends = args.backends or runner.benchmark_backends(device)
    if args.cuda_graphs and (device.type != "cuda" or args.mode == "train"):
        raise SystemExit("fastcnn bench: --cuda-graphs times inference on a CUDA device only "
                         f"(device {device}, mode {args.mode or 'infer'})")
    console.print(f"[bold]fastcnn bench[/bold]: networks on {runner.describe(device)}; backends: "
                  f"{', '.join(backends)}; dtype {dtype}")
    rows = networks.run(device, dtype, nets=args.nets, batches=args.batch,
                        modes=[args.mode] if args.mode else None, backends=backends,
                        with_compile=False if args.no_compile else (True if args.compile else None),
                        autocast=args.autocast, console=console, cuda_graphs=args.cuda_graphs)
    console.print(networks.table(rows, f"images per second: fastcnn vs eager PyTorch and torch.compile, {dtype}"))
    for line in networks.summary_lines(rows):
        console.print(line, markup=False)
    networks.save(rows, runner.describe(device), args.json, args.markdown)
    if args.plot:
        networks.plot(rows, args.plot, runner.describe(device))
    return 0 if all(r.matches_eager for r in rows) else 1


def bench_ops(args, device, dtype, console) -> int:
    from fastcnn.bench import runner

    limits, rows = runner.run(device, dtype, ops=args.ops, backends=args.backends, quick=args.quick,
                              console=console, layers=args.layers, nets=args.nets, backward=args.backward,
                              with_compile=args.compile, channels_last=not args.nchw)
    console.print(runner.table(rows, limits))
    for line in runner.summary_lines(rows):
        console.print(line, markup=False)
    runner.save(rows, limits, device, args.json, args.markdown)
    return 0 if all(r.matches_eager for r in rows) else 1


def load_model(spec: str, device: str | None = None) -> torch.nn.Module:
    """A registered model's name (built on `device`: "meta" allocates no weights), or
    module:attr (a Module, or a callable building one)."""
    import importlib

    from fastcnn import models
    if ":" not in spec:
        if device is None:
            return models.get_model(spec)
        with torch.device(device):
            return models.get_model(spec)
    module_name, attr = spec.split(":", 1)
    obj = getattr(importlib.import_module(module_name), attr)
    model = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{spec} gives a {type(model).__name__}, not a torch.nn.Module")
    return model


def summarize(args) -> int:
    from fastcnn.cost import roofline, tracing

    if args.input is None:
        from fastcnn.bench.networks import input_shape
        size = [1, *input_shape(args.model)]
    else:
        try:
            size = [int(v) for v in args.input.split(",")]
        except ValueError:
            raise SystemExit(f"fastcnn summary: --input must be comma-separated ints such as 1,3,224,224, "
                             f"got {args.input!r}") from None
    try:
        model = load_model(args.model, None if args.time else "meta")
    except (ValueError, ImportError, AttributeError, TypeError) as e:
        raise SystemExit(f"fastcnn summary: cannot build {args.model!r}: {e}") from None
    dtype = DTYPES[args.dtype]
    try:
        result = tracing.summary(model, size, dtype, print_table=True)
    except ValueError as e:
        print(f"fastcnn summary: {e}", file=sys.stderr)
        return 2
    if args.roofline:
        from fastcnn.bench.ceilings import measure

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        limits = measure(device, quick=True, dtype=dtype)
        measured = roofline.measure_layer_ms(model, size, dtype, device) if args.time else None
        tracing.wide_console().print(roofline.table(result, limits, measured))
        roofline.plot(result, limits, args.roofline, measured_ms=measured)
        print(f"roofline plot written to {args.roofline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
