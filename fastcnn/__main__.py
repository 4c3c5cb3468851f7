"""Command line: `python -m fastcnn bench` (also the `fastcnn` console script)."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fastcnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark every available backend of every op against eager PyTorch")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="default: float16 on a GPU, float32 on the CPU")
    bench.add_argument("--ops", nargs="+", default=None, help="only these ops (e.g. add_act max_pool2d)")
    bench.add_argument("--backends", nargs="+", default=None, help="only these backends")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    bench.add_argument("--layers", action="store_true",
                       help="every distinct conv and FC layer of the classic networks instead of the op cases")
    bench.add_argument("--nets", nargs="+", default=None,
                       help="with --layers: only these networks (lenet5 alexnet vgg16 resnet18 resnet50 googlenet)")
    bench.add_argument("--backward", action="store_true", help="with --layers: time forward + backward")
    bench.add_argument("--nchw", action="store_true", help="with --layers: NCHW instead of channels_last")
    bench.add_argument("--compile", action="store_true",
                       help="also time torch.compile of the eager code (compiles once per case: slow)")
    bench.add_argument("--json", default=None, help="write the results as JSON here")
    bench.add_argument("--markdown", default=None, help="write the results as a markdown table here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "bench":
        from rich.console import Console

        from fastcnn.bench import runner

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
        console = Console() if sys.stdout.isatty() else Console(width=160)
        limits, rows = runner.run(device, dtype, ops=args.ops, backends=args.backends, quick=args.quick,
                                  console=console, layers=args.layers, nets=args.nets, backward=args.backward,
                                  with_compile=args.compile, channels_last=not args.nchw)
        console.print(runner.table(rows, limits))
        for line in runner.summary_lines(rows):
            console.print(line, markup=False)
        runner.save(rows, limits, device, args.json, args.markdown)
        return 0 if all(r.matches_eager for r in rows) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
