"""Config choice for the convolution and GEMM kernels.

A config is (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). For one launch
(kernel name, shape key, dtype) the choice is, in order:
  1. the committed table of tuned configs for this GPU kind
     (fastcnn/triton/tuned/<gpu-kind>.json, written by benches/tune_triton.py);
  2. the on-disk cache of earlier timings ($FASTCNN_CACHE_DIR, else
     $XDG_CACHE_HOME/fastcnn, else ~/.cache/fastcnn; never inside the package);
  2b. in each of those, the same shape tuned at another batch (the nearest one),
     since the table is tuned at one batch and the networks run at several;
  3. timing every candidate that fits the GPU's shared memory with
     triton.testing.do_bench, and caching the winner (memory and disk).
Under the interpreter, while torch.compile traces with fake tensors, during CUDA
graph capture, without a GPU, or with FASTCNN_TRITON_TUNE=0 in the environment (test
suites: timing every candidate compiles each of them), nothing is timed: a
table/cache hit or one default.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import triton
import triton.testing

from fastcnn.triton.common import next_power_of_2

TABLE_DIR = Path(__file__).with_name("tuned")


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int

    def capped_warps(self, max_warps: int) -> "Config":
        return self._replace(num_warps=min(self.num_warps, max_warps))


# Flattened (r, s, c) K loops miscompiled with num_warps >= 8 (pytorch issue #173068).
FLAT_MAX_WARPS = 4
# A table entry serves the same shape at another batch up to this ratio either way.
NEAREST_BATCH_RATIO = 4
# GEMMs of at most this many rows take the small-M configs.
SMALL_M = 16

_TENSOR_CORE_CONFIGS = [
    Config(64, 64, 32, 2, 4), Config(64, 128, 32, 3, 4), Config(128, 64, 32, 3, 4),
    Config(128, 128, 32, 3, 4), Config(128, 128, 32, 3, 8), Config(128, 128, 64, 3, 8),
    Config(128, 256, 32, 3, 8), Config(256, 128, 32, 3, 8), Config(64, 256, 32, 4, 4),
    Config(256, 64, 32, 4, 4), Config(128, 64, 64, 4, 4), Config(64, 128, 64, 4, 4),
    Config(64, 64, 64, 4, 4), Config(32, 64, 64, 4, 4), Config(64, 32, 64, 4, 4),
    Config(128, 128, 64, 4, 8), Config(256, 128, 64, 3, 8),
]
_FP32_CONFIGS = [
    Config(64, 64, 16, 2, 4), Config(64, 64, 32, 3, 4), Config(128, 64, 32, 3, 4),
    Config(64, 128, 32, 3, 4), Config(128, 128, 16, 3, 8), Config(128, 128, 32, 3, 8),
    Config(32, 64, 32, 4, 4), Config(64, 32, 32, 4, 4), Config(128, 64, 16, 4, 4),
]
_FP64_CONFIGS = [
    Config(32, 32, 8, 1, 4), Config(64, 32, 8, 1, 4), Config(32, 64, 8, 1, 4), Config(16, 32, 16, 1, 4),
]
# For GEMMs with few rows (fully connected layers at batch 8, weight gradients of small layers).
_SMALL_M_CONFIGS = [
    Config(16, 64, 64, 4, 4), Config(16, 128, 64, 4, 4), Config(16, 64, 128, 4, 4), Config(16, 32, 128, 4, 4),
    Config(16, 256, 32, 4, 4), Config(32, 64, 64, 4, 4), Config(32, 128, 32, 4, 4),
]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def shared_memory_bytes(config: Config, dtype: torch.dtype) -> int:
    """Shared memory the software pipeline holds: num_stages copies of an A and a B tile.
    (The epilogue's layout conversion reuses that space after the loop.)"""
    return config.num_stages * (config.block_m * config.block_k + config.block_k * config.block_n) * element_size(dtype)


def candidates(dtype: torch.dtype, *, shared_memory: int, flat: bool = False, small_m: bool = False) -> list[Config]:
    """The configs worth timing for this dtype, pruned to those that fit `shared_memory`
    bytes; warps capped for flattened K loops (duplicates dropped, order kept)."""
    if dtype == torch.float64:
        pool = list(_FP64_CONFIGS)
    elif dtype == torch.float32:
        pool = list(_FP32_CONFIGS)
    else:
        pool = list(_TENSOR_CORE_CONFIGS)
    if small_m and dtype != torch.float64:
        small = [c._replace(block_k=min(c.block_k, 32)) if dtype == torch.float32 else c for c in _SMALL_M_CONFIGS]
        pool = small + pool
    if flat:
        pool = [c.capped_warps(FLAT_MAX_WARPS) for c in pool]
    out: list[Config] = []
    for c in pool:
        if c not in out and shared_memory_bytes(c, dtype) <= shared_memory:
            out.append(c)
    return out


def default_config(dtype: torch.dtype, m: int, n: int, k: int, *, interpreting: bool, flat: bool = False) -> Config:
    """The one config used when nothing may be timed. Under the interpreter the tiles are
    shrunk to the problem (its cost grows with tile area, not with useful work)."""
    if interpreting:
        def fit(size: int, lo: int, hi: int) -> int:
            return max(lo, min(hi, next_power_of_2(max(size, 1))))
        return Config(fit(m, 16, 256), fit(n, 16, 64), fit(k, 16, 64), 1, 4)
    if dtype == torch.float64:
        return _FP64_CONFIGS[0]
    if m <= SMALL_M:
        c = _SMALL_M_CONFIGS[0]
    elif dtype == torch.float32:
        c = Config(64, 64, 32, 3, 4)
    else:
        c = Config(128, 128, 32, 3, 4) if min(m, n) >= 128 else Config(64, 64, 32, 3, 4)
    if dtype == torch.float32:
        c = c._replace(block_k=min(c.block_k, 32))
    # Few output channels (LeNet-5's 6 and 16): a 64-wide N tile would be mostly masked
    # lanes; 16 is the narrowest a tensor-core dot takes.
    c = c._replace(block_n=min(c.block_n, max(16, next_power_of_2(n))))
    return c.capped_warps(FLAT_MAX_WARPS) if flat else c


def gpu_kind(device: torch.device) -> str:
    """A file-name-safe name of the GPU model, e.g. 'nvidia-h100-80gb-hbm3'."""
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_shared_memory(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        from triton.runtime import driver
        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - older drivers: torch knows the opt-in limit too
        return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


def cache_dir() -> Path | None:
    """Where tuned configs are kept between runs; None where no home directory can be
    found (HOME unset and a user without a passwd entry, as in some containers):
    tuning then lasts for the process."""
    explicit = os.environ.get("FASTCNN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "fastcnn"
    try:
        return Path.home() / ".cache" / "fastcnn"
    except RuntimeError:
        return None


def _entry_key(key: str, dtype: torch.dtype) -> str:
    return f"{key}|{_dtype_name(dtype)}"


def _read_json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _configs_of(data: dict) -> dict[str, dict[str, Config]]:
    out: dict[str, dict[str, Config]] = {}
    for kernel, entries in data.get("configs", {}).items():
        if isinstance(entries, dict):
            out[kernel] = {k: Config(*v) for k, v in entries.items() if isinstance(v, list) and len(v) == 5}
    return out


def write_configs(path: Path, configs: dict[str, dict[str, Config]], header: dict | None = None) -> None:
    """Merges `configs` into the JSON file at `path` (written atomically)."""
    data = _read_json(path)
    merged = _configs_of(data)
    for kernel, entries in configs.items():
        merged.setdefault(kernel, {}).update(entries)
    data.update(header or {})
    data["configs"] = {kernel: {k: list(c) for k, c in sorted(entries.items())}
                       for kernel, entries in sorted(merged.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(format_json(data) + "\n")
    os.replace(tmp, path)


def format_json(data) -> str:
    """Indented JSON with each config on one line (readable diffs of the committed table)."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[([\d,\s]+)\]", lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def do_bench_ms(fn: Callable[[], None]) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=40))


@dataclass
class Tuner:
    """Chooses configs for one GPU kind. Everything it touches is injected, so that its
    logic runs (and is tested) without a GPU."""
    gpu_kind: str
    shared_memory: int
    table_path: Path | None
    cache_path: Path | None
    timer: Callable[[Callable[[], None]], float] = do_bench_ms
    interpreting: bool = False
    # Set by benches/tune_triton.py: time every candidate regardless of table and cache,
    # and skip configs whose result `verify(kernel, config, run)` (which runs it) refuses.
    retune: bool = False
    verify: Callable[[str, Config, Callable[[], None]], bool] | None = None
    # At most this many candidates are timed (the tuning script's dry run).
    limit: int | None = None

    def __post_init__(self):
        self._table = _configs_of(_read_json(self.table_path))
        self._cache = _configs_of(_read_json(self.cache_path))
        self.timings: dict[tuple[str, str], dict[Config, float]] = {}
        self.failures: dict[tuple[str, Config], str] = {}
        self._nearest: dict[tuple[str, str], Config | None] = {}

    def lookup(self, kernel: str, key: str, dtype: torch.dtype) -> Config | None:
        """The table's (else the cache's) config for this exact key, else for the same
        shape at the nearest batch (the key's first field; see _nearest_batch)."""
        entry = _entry_key(key, dtype)
        for source in (self._table, self._cache):
            config = source.get(kernel, {}).get(entry)
            if config is not None and shared_memory_bytes(config, dtype) <= self.shared_memory:
                return config
        try:
            return self._nearest[(kernel, entry)]
        except KeyError:
            found = self._nearest[(kernel, entry)] = self._nearest_batch(kernel, key, dtype)
            return found

    def _nearest_batch(self, kernel: str, key: str, dtype: torch.dtype) -> Config | None:
        """A layer's best config hardly moves with the batch once the tiles are full, and
        the table is tuned at one batch: the entry whose key differs only in its first
        field (the batch of a conv, the rows of a GEMM), nearest to it on a log scale
        (the larger batch on a tie), within NEAREST_BATCH_RATIO either way and on the
        same side of SMALL_M (few rows take other tiles); None if there is none."""
        head, sep, rest = key.partition("x")
        if not sep or not head.isdigit() or int(head) <= 0:
            return None
        batch, suffix = int(head), f"x{rest}|{_dtype_name(dtype)}"
        best: tuple[float, int, Config] | None = None
        for source in (self._table, self._cache):
            for entry, config in source.get(kernel, {}).items():
                head = entry[:-len(suffix)] if entry.endswith(suffix) else ""
                other = int(head) if head.isdigit() else 0
                if not 1 / NEAREST_BATCH_RATIO <= other / batch <= NEAREST_BATCH_RATIO or \
                        (other <= SMALL_M) != (batch <= SMALL_M) or \
                        shared_memory_bytes(config, dtype) > self.shared_memory:
                    continue
                rank = (abs(math.log2(other / batch)), -other, config)
                if best is None or rank[:2] < best[:2]:
                    best = rank
            if best is not None:
                return best[2]  # the table's entries come before the cache's
        return None

    def choose(self, kernel: str, key: str, dtype: torch.dtype, configs: list[Config], default: Config,
               run: Callable[[Config], None], *, can_time: bool = True, max_warps: int | None = None) -> Config:
        """The config for this launch; `run(config)` launches the kernel (only called when timing)."""
        cap = (lambda c: c.capped_warps(max_warps)) if max_warps else (lambda c: c)
        if not self.retune:
            hit = self.lookup(kernel, key, dtype)
            if hit is not None:
                return cap(hit)
        if self.interpreting or not can_time or not configs:
            return cap(default)
        times: dict[Config, float] = {}
        for config in configs[:self.limit]:
            try:
                # The first run compiles: a config that does not fit fails here, not in the timing.
                if self.verify is not None:
                    if not self.verify(kernel, config, lambda: run(config)):
                        continue
                else:
                    run(config)
                times[config] = self.timer(lambda: run(config))
            except Exception as e:  # noqa: BLE001 - out of resources, or a config that does not compile
                self.failures[(kernel, config)] = f"{type(e).__name__}: {e}"[:300]
                continue
        if not times:
            return cap(default)
        best = min(times, key=times.__getitem__)
        self.timings[(kernel, _entry_key(key, dtype))] = times
        self._cache.setdefault(kernel, {})[_entry_key(key, dtype)] = best
        self._nearest.clear()
        if self.cache_path is not None and not self.retune:
            try:
                write_configs(self.cache_path, {kernel: {_entry_key(key, dtype): best}},
                              {"gpu": self.gpu_kind, "triton": triton.__version__})
            except OSError:
                pass  # a read-only home: keep the choice in memory
        return cap(best)

    def chosen(self) -> dict[str, dict[str, Config]]:
        """Every config this tuner timed (what benches/tune_triton.py writes to the table)."""
        out: dict[str, dict[str, Config]] = {}
        for (kernel, entry), times in self.timings.items():
            out.setdefault(kernel, {})[entry] = min(times, key=times.__getitem__)
        return out


_tuners: dict[object, Tuner] = {}


def interpreting(device: torch.device) -> bool:
    """True when Triton runs this device's kernels in its interpreter (any CPU tensor)."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuner_for(device: torch.device) -> Tuner:
    if interpreting(device):
        key: object = "interpreter"
        if key not in _tuners:
            _tuners[key] = Tuner("interpreter", 1 << 30, None, None, interpreting=True)
        return _tuners[key]
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _tuners:
        kind = gpu_kind(torch.device("cuda", index))
        cache = cache_dir()
        _tuners[index] = Tuner(kind, device_shared_memory(torch.device("cuda", index)),
                               TABLE_DIR / f"{kind}.json",
                               cache / f"triton-{triton.__version__}-{kind}.json" if cache is not None else None)
    return _tuners[index]


def set_tuner(device: torch.device, tuner: Tuner) -> None:
    """Replaces the tuner of a device (benches/tune_triton.py and tests); prepared
    launches forget the configs they kept from the old one."""
    from fastcnn.ops import prepared
    prepared.clear()
    if interpreting(device):
        _tuners["interpreter"] = tuner
    else:
        _tuners[device.index if device.index is not None else torch.cuda.current_device()] = tuner


def never_times(device: torch.device) -> bool:
    """True where choose() cannot time anything for the rest of the process: the
    interpreter, or FASTCNN_TRITON_TUNE=0 (read when a launcher first chooses)."""
    return interpreting(device) or os.environ.get("FASTCNN_TRITON_TUNE", "1") == "0"


def may_time(*tensors: torch.Tensor | None) -> bool:
    """False while torch.compile traces (fake or functional tensors) or a CUDA graph is captured."""
    from torch._subclasses.fake_tensor import is_fake
    for t in tensors:
        if t is not None and (is_fake(t) or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)):
            return False
    if torch.compiler.is_compiling() or os.environ.get("FASTCNN_TRITON_TUNE", "1") == "0":
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def lookup(kernel: str, key: str, dtype: torch.dtype, device: torch.device, *, flat: bool = False) -> Config | None:
    """The config choose() would take from the table or the cache (nearest batch
    included), without timing anything; None where it would time or use the default."""
    tuner = tuner_for(device)
    hit = None if tuner.retune else tuner.lookup(kernel, key, dtype)
    return hit.capped_warps(FLAT_MAX_WARPS) if hit is not None and flat else hit


class LaunchConfig:
    """The config of a launcher that serves tensors of one signature (a prepared call's):
    from the table or the cache (lookup) as soon as either has it, then kept, per dot
    mode (TF32 can be switched between calls); until then choose(), which may time.
    Where nothing can ever be timed (the interpreter, FASTCNN_TRITON_TUNE=0) the
    default is kept too: looking it up again on every call cost ~20 us of host time."""

    def __init__(self, kernel: str, *, m: int, n: int, k: int, flat: bool = False, small_m: bool = False):
        self.kernel, self.m, self.n, self.k, self.flat, self.small_m = kernel, m, n, k, flat, small_m
        self._settled: dict[int, Config] = {}
        self._keys: dict[int, str] = {}

    def get(self, dot: int, key_of: Callable[[int], str], dtype: torch.dtype, device: torch.device,
            run: Callable[[Config], None], tensors: tuple) -> Config:
        config = self._settled.get(dot)
        if config is not None:
            return config
        key = self._keys.get(dot) or self._keys.setdefault(dot, key_of(dot))
        config = lookup(self.kernel, key, dtype, device, flat=self.flat)
        if config is not None:
            self._settled[dot] = config
            return config
        config = choose(self.kernel, key, dtype, device, run, tensors, m=self.m, n=self.n, k=self.k, flat=self.flat,
                        small_m=self.small_m)
        if never_times(device):
            self._settled[dot] = config
        return config


def choose(kernel: str, key: str, dtype: torch.dtype, device: torch.device, run: Callable[[Config], None],
           tensors: tuple, *, m: int, n: int, k: int, flat: bool = False, small_m: bool = False) -> Config:
    """The config for one launch of `kernel` (see the module docstring)."""
    tuner = tuner_for(device)
    max_warps = FLAT_MAX_WARPS if flat else None
    default = default_config(dtype, m, n, k, interpreting=tuner.interpreting, flat=flat)
    if tuner.interpreting:
        return tuner.choose(kernel, key, dtype, [], default, run, can_time=False, max_warps=max_warps)
    can_time = may_time(*tensors)
    # The candidates only where they may be timed: this runs on every launch.
    configs = candidates(dtype, shared_memory=tuner.shared_memory, flat=flat, small_m=small_m) if can_time else []
    return tuner.choose(kernel, key, dtype, configs, default, run, can_time=can_time, max_warps=max_warps)
