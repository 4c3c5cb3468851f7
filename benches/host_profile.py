"""Where a layer's time goes: the host (Python, dispatch, Triton's launcher) or the GPU.

The first H100 run timed no fastcnn layer under 0.18 ms, however small, while eager
took 0.03-0.09 ms for the same layers: this splits each call of a few layers into
  host_us    wall time per call of a batch of calls launched without syncing
             (the time the host spends before the next call can start),
  kernel_us  GPU kernel time per call (torch.profiler's device events),
  kernels    kernels launched per call,
and writes the host's hottest functions per layer (cProfile) to a log. Forward,
no grad, float16 channels_last on a GPU:

    python benches/host_profile.py OUT_DIR [--layers NAME ...] [--backend triton]

On a CPU (a dry run) it profiles the same calls with the CPU's backends; under
TRITON_INTERPRET=1 with --backend triton, the interpreter's time swamps the rest
unless --stub-launch replaces every Triton launch with a no-op, which leaves
fastcnn's own Python per call (the part of host_us this machine can measure).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastcnn  # noqa: E402
from fastcnn.bench.layer_cases import layer_case  # noqa: E402
from fastcnn.bench.layers import distinct_layers, on_device  # noqa: E402

# Small layers (host-bound on the H100) and one large one (kernel-bound) for contrast.
DEFAULT_LAYERS = ["lenet5 fc2", "lenet5 conv2", "resnet18 layer1 conv1", "resnet18 layer4 conv2",
                  "alexnet fc8", "vgg16 conv 256->256 at 56"]


class _NoLaunch:
    """Stands in for launchable(kernel)[grid]: takes the launch's arguments, runs nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_triton_launches() -> None:
    import importlib
    import pkgutil

    import fastcnn.triton
    for info in pkgutil.iter_modules(fastcnn.triton.__path__):
        module = importlib.import_module(f"fastcnn.triton.{info.name}")
        if hasattr(module, "launchable"):
            module.launchable = lambda kernel: _NoLaunch()


def host_us(fn, calls: int) -> float:
    """Microseconds per call the host spends launching (no sync inside the batch)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def wall_us(fn, calls: int) -> float:
    """Microseconds per call, launch to finish, over a batch of calls."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def kernel_profile(fn, calls: int) -> tuple[float, float, list[str]]:
    """(kernel microseconds per call, kernels per call, the kernels' names)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    total_us, count, names = 0.0, 0, []
    for event in prof.key_averages():
        if event.device_type == DeviceType.CUDA:
            total_us += event.self_device_time_total
            count += event.count
            names.append(event.key[:80])
    return total_us / calls, count / calls, names


def host_hotspots(fn, calls: int, top: int = 20) -> str:
    """The functions with the most own time, in microseconds per call of fn."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, prim calls, own s, cumulative s, ...)
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    lines = [f"{'own us':>9} {'cum us':>9} {'calls':>6}  function"]
    for (file, line, name), (_, ncalls, own, cumulative, _) in rows:
        where = f"{Path(file).name}:{line}({name})" if line else name
        lines.append(f"{own / calls * 1e6:9.2f} {cumulative / calls * 1e6:9.2f} {ncalls / calls:6.1f}  {where}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", nargs="*", default=DEFAULT_LAYERS,
                        help="layer labels' beginnings, as 'resnet18 layer1 conv1'")
    parser.add_argument("--backend", default=None, help="fastcnn backend (default: the device's)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="default float16 on a GPU, float32 on the CPU")
    parser.add_argument("--stub-launch", action="store_true",
                        help="Triton launches do nothing (fastcnn's Python cost alone; outputs are garbage)")
    args = parser.parse_args()
    if args.stub_launch:
        stub_triton_launches()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (getattr(torch, args.dtype) if args.dtype
             else torch.float16 if device.type == "cuda" else torch.float32)
    backend = args.backend or fastcnn.backends.resolve(device)
    calls = args.calls if device.type == "cuda" or args.stub_launch else max(5, args.calls // 20)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, log = [], []
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def save():  # after every layer: a run cut short by its time limit keeps what it measured
        (args.out / "host-profile.json").write_text(json.dumps(
            {"device": device_name, "torch": torch.__version__, "dtype": str(dtype), "calls": calls, "rows": rows},
            indent=1))
        (args.out / "host-profile-hotspots.txt").write_text("\n".join(log))
    for layer in distinct_layers():
        label = f"{layer.net} {layer.name}"
        if not any(label.startswith(want) for want in args.layers):
            continue
        case = layer_case(on_device(layer, device))
        torch.manual_seed(0)
        inputs = case.make_inputs(case.shape, dtype, device, case.channels_last)
        row = {"layer": case.label, "backend": backend, "stub_launch": args.stub_launch}
        with torch.no_grad(), fastcnn.use_backend(backend):
            for contender, fn in (("eager", lambda: case.eager(*inputs)),
                                  ("fastcnn", lambda: case.fastcnn(*inputs))):
                for _ in range(3):
                    fn()  # compiles, tunes, prepares
                kernel, kernels, names = kernel_profile(fn, min(calls, 50))
                row[contender] = {"host_us": host_us(fn, calls), "wall_us": wall_us(fn, calls), "kernel_us": kernel,
                             "kernels_per_call": kernels, "kernel_names": names}
            log.append(f"==== {case.label} [{backend}]\n" + host_hotspots(lambda: case.fastcnn(*inputs), calls))
        rows.append(row)
        e, f = row["eager"], row["fastcnn"]
        print(f"{case.label[:58]:58s} host us {f['host_us']:7.1f} (eager {e['host_us']:6.1f})  "
              f"kernel us {f['kernel_us']:7.1f} (eager {e['kernel_us']:6.1f})  "
              f"kernels/call {f['kernels_per_call']:.1f} (eager {e['kernels_per_call']:.1f})  "
              f"wall us {f['wall_us']:7.1f} (eager {e['wall_us']:6.1f})", flush=True)
        save()
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
