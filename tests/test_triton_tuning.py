"""The config choice of the Triton conv/GEMM kernels (fastcnn/triton/tuning.py), with an
injected timer, shared-memory size and paths: no GPU needed. Also runs the tuning
script's logic (benches/tune_triton.py --dry-run) under the interpreter."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastcnn.triton import tuning
from fastcnn.triton.tuning import Config, Tuner

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = Config(32, 32, 16, 1, 4)


class FakeTimer:
    """Times a config by a table of milliseconds; remembers what it timed."""

    def __init__(self, ms_by_config):
        self.ms_by_config = ms_by_config
        self.timed = []
        self.current = None

    def run(self, config):
        self.current = config

    def __call__(self, fn):
        fn()
        self.timed.append(self.current)
        return self.ms_by_config.get(self.current, 100.0)


def make_tuner(tmp_path, timer=None, table=None, shared_memory=228 * 1024, **kwargs):
    table_path = tmp_path / "table.json"
    if table is not None:
        table_path.write_text(json.dumps(table))
    return Tuner("test-gpu", shared_memory, table_path, tmp_path / "cache" / "tuning.json",
                 timer=timer or FakeTimer({}), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shared_memory", [48 * 1024, 100 * 1024, 228 * 1024])
def test_candidates_fit_shared_memory(dtype, shared_memory):
    configs = tuning.candidates(dtype, shared_memory=shared_memory)
    assert configs, "no config fits"
    assert len(set(configs)) == len(configs)
    for c in configs:
        assert tuning.shared_memory_bytes(c, dtype) <= shared_memory
    everything = tuning.candidates(dtype, shared_memory=1 << 30)
    assert set(configs) <= set(everything)


def test_small_shared_memory_prunes():
    big = tuning.candidates(torch.float16, shared_memory=228 * 1024)
    small = tuning.candidates(torch.float16, shared_memory=48 * 1024)
    assert len(small) < len(big)
    assert Config(256, 128, 64, 3, 8) in big and Config(256, 128, 64, 3, 8) not in small
    assert tuning.shared_memory_bytes(Config(128, 128, 32, 3, 8), torch.float16) == 3 * (128 * 32 * 2) * 2


def test_flat_loops_cap_warps():
    for c in tuning.candidates(torch.float16, shared_memory=1 << 30, flat=True):
        assert c.num_warps <= tuning.FLAT_MAX_WARPS
    assert tuning.default_config(torch.float16, 4096, 256, 4096, interpreting=False, flat=True).num_warps <= 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_default_n_tile_fits_few_output_channels(dtype):
    """LeNet-5's 6 and 16 output channels get a 16-wide N tile, not a mostly masked 64."""
    for n, block_n in ((6, 16), (16, 16), (20, 32), (64, 64)):
        config = tuning.default_config(dtype, 200704, n, 150, interpreting=False)
        assert config.block_n == block_n, (n, config)
    assert tuning.default_config(dtype, 200704, 1000, 150, interpreting=False).block_n >= 64
    assert tuning.default_config(torch.float16, 4096, 256, 4096, interpreting=False).block_n == 128


def test_small_m_candidates_come_first():
    configs = tuning.candidates(torch.float16, shared_memory=228 * 1024, small_m=True)
    assert configs[0].block_m == 16


def test_table_hit_needs_no_timing(tmp_path):
    table = {"configs": {"conv2d_forward": {"shape-a|float16": [64, 128, 32, 3, 4]}}}
    timer = FakeTimer({})
    tuner = make_tuner(tmp_path, timer, table)
    configs = tuning.candidates(torch.float16, shared_memory=228 * 1024)
    got = tuner.choose("conv2d_forward", "shape-a", torch.float16, configs, DEFAULT, timer.run)
    assert got == Config(64, 128, 32, 3, 4)
    assert timer.timed == []
    # Another dtype or kernel misses the table and is timed.
    tuner.choose("conv2d_forward", "shape-a", torch.bfloat16, configs, DEFAULT, timer.run)
    assert len(timer.timed) == len(configs)


def test_table_entry_too_big_for_this_gpu_is_ignored(tmp_path):
    table = {"configs": {"linear": {"k|float16": [256, 128, 64, 4, 8]}}}
    timer = FakeTimer({})
    tuner = make_tuner(tmp_path, timer, table, shared_memory=48 * 1024)
    configs = tuning.candidates(torch.float16, shared_memory=48 * 1024)
    got = tuner.choose("linear", "k", torch.float16, configs, DEFAULT, timer.run)
    assert got != Config(256, 128, 64, 4, 8)
    assert timer.timed


def test_timing_picks_fastest_and_disk_cache_round_trip(tmp_path):
    configs = [Config(64, 64, 32, 2, 4), Config(128, 64, 32, 3, 4), Config(64, 128, 32, 3, 4)]
    timer = FakeTimer({configs[0]: 3.0, configs[1]: 1.0, configs[2]: 2.0})
    tuner = make_tuner(tmp_path, timer)
    assert tuner.choose("conv2d_input_grad", "key", torch.float16, configs, DEFAULT, timer.run) == configs[1]
    assert timer.timed == configs
    # The same tuner remembers it; a new one (a new process) reads it from disk.
    assert tuner.choose("conv2d_input_grad", "key", torch.float16, configs, DEFAULT, timer.run) == configs[1]
    fresh_timer = FakeTimer({})
    fresh = make_tuner(tmp_path, fresh_timer)
    assert fresh.choose("conv2d_input_grad", "key", torch.float16, configs, DEFAULT, fresh_timer.run) == configs[1]
    assert fresh_timer.timed == [] and len(timer.timed) == 3
    data = json.loads((tmp_path / "cache" / "tuning.json").read_text())
    assert data["configs"]["conv2d_input_grad"]["key|float16"] == list(configs[1])
    assert data["gpu"] == "test-gpu"


def test_cache_merges_entries(tmp_path):
    configs = [Config(64, 64, 32, 2, 4), Config(128, 64, 32, 3, 4)]
    for key, best in (("a", 0), ("b", 1)):
        timer = FakeTimer({configs[best]: 1.0})
        make_tuner(tmp_path, timer).choose("linear", key, torch.float32, configs, DEFAULT, timer.run)
    entries = json.loads((tmp_path / "cache" / "tuning.json").read_text())["configs"]["linear"]
    assert entries == {"a|float32": list(configs[0]), "b|float32": list(configs[1])}


def test_corrupt_cache_is_ignored(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tuning.json").write_text("{not json")
    timer = FakeTimer({})
    configs = [Config(64, 64, 32, 2, 4)]
    assert make_tuner(tmp_path, timer).choose("linear", "k", torch.float16, configs, DEFAULT, timer.run) == configs[0]


def test_interpreter_uses_one_config_without_timing(tmp_path):
    timer = FakeTimer({})
    tuner = make_tuner(tmp_path, timer, interpreting=True)
    configs = tuning.candidates(torch.float16, shared_memory=228 * 1024)
    ran = []
    got = tuner.choose("conv2d_forward", "key", torch.float16, configs, DEFAULT, ran.append)
    assert got == DEFAULT and ran == [] and timer.timed == []
    assert not (tmp_path / "cache").exists()


def test_interpreter_on_cpu_tensors_never_times():
    tuner = tuning.tuner_for(torch.device("cpu"))
    assert tuner.interpreting
    ran = []
    got = tuning.choose("conv2d_forward", "cpu-key", torch.float32, torch.device("cpu"), ran.append, (),
                        m=100, n=5, k=27, flat=True)
    assert ran == []
    assert got == tuning.default_config(torch.float32, 100, 5, 27, interpreting=True, flat=True)
    # Interpreter tiles shrink to the problem.
    assert got == Config(128, 16, 32, 1, 4)


def test_fake_tensors_are_not_timed(tmp_path, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.delenv("FASTCNN_TRITON_TUNE", raising=False)
    with FakeTensorMode():
        fake = torch.empty(4, 4)
    assert not tuning.may_time(fake)
    assert tuning.may_time(torch.empty(4, 4))
    monkeypatch.setenv("FASTCNN_TRITON_TUNE", "0")
    assert not tuning.may_time(torch.empty(4, 4))
    timer = FakeTimer({})
    tuner = make_tuner(tmp_path, timer)
    configs = [Config(64, 64, 32, 2, 4), Config(128, 64, 32, 3, 4)]
    got = tuner.choose("linear", "k", torch.float16, configs, DEFAULT, timer.run, can_time=tuning.may_time(fake))
    assert got == DEFAULT and timer.timed == []


def test_failing_and_rejected_configs_are_skipped(tmp_path):
    configs = [Config(64, 64, 32, 2, 4), Config(128, 64, 32, 3, 4), Config(64, 128, 32, 3, 4)]
    timer = FakeTimer({configs[0]: 1.0, configs[1]: 2.0, configs[2]: 3.0})

    def run(config):
        if config == configs[0]:
            raise RuntimeError("out of resources")
        timer.run(config)

    def verify(kernel, config, launch):
        launch()
        return config != configs[1]

    tuner = make_tuner(tmp_path, timer, verify=verify)
    assert tuner.choose("linear", "k", torch.float16, configs, DEFAULT, run) == configs[2]
    assert (("linear", configs[0]) in tuner.failures)


def test_retune_ignores_table_and_reports_choices(tmp_path):
    table = {"configs": {"linear": {"k|float16": [64, 64, 32, 2, 4]}}}
    configs = [Config(64, 64, 32, 2, 4), Config(128, 64, 32, 3, 4)]
    timer = FakeTimer({configs[0]: 2.0, configs[1]: 1.0})
    tuner = make_tuner(tmp_path, timer, table, retune=True, limit=2)
    assert tuner.choose("linear", "k", torch.float16, configs, DEFAULT, timer.run) == configs[1]
    assert tuner.chosen() == {"linear": {"k|float16": configs[1]}}
    assert not (tmp_path / "cache").exists()  # retuning writes the table, not the user's cache


def test_cache_dir_is_outside_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTCNN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_dir() == tmp_path / "fastcnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.cache_dir() == Path.home() / ".cache" / "fastcnn"
    monkeypatch.setenv("FASTCNN_CACHE_DIR", str(tmp_path / "x"))
    assert tuning.cache_dir() == tmp_path / "x"
    assert ROOT / "fastcnn" not in tuning.cache_dir().parents


def test_no_cache_dir_without_a_home(monkeypatch):
    """HOME unset and no passwd entry (Path.home() raises): no cache, not an error."""
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("FASTCNN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert tuning.cache_dir() is None


def test_committed_tables_are_valid():
    tables = list(tuning.TABLE_DIR.glob("*.json"))
    assert tables
    for path in tables:
        data = json.loads(path.read_text())
        for kernel, entries in data["configs"].items():
            assert kernel in {"conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad", "linear"}
            for key, config in entries.items():
                dtype = getattr(torch, key.rsplit("|", 1)[1])
                c = Config(*config)
                assert tuning.shared_memory_bytes(c, dtype) <= 228 * 1024
                if kernel == "conv2d_weight_grad":
                    assert c.num_warps <= tuning.FLAT_MAX_WARPS


def run_tune_script(*args):
    spec = importlib.util.spec_from_file_location("tune_triton", ROOT / "benches" / "tune_triton.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    device = torch.device("cpu")
    previous = tuning.tuner_for(device)
    try:
        return script.main(["--dry-run", "--dtypes", "float32", *args])
    finally:
        tuning.set_tuner(device, previous)


def test_tune_script_dry_run(tmp_path, capsys):
    out = tmp_path / "table.json"
    chosen = run_tune_script("--out", str(out))
    assert set(chosen) == {"conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad", "linear"}
    assert len(chosen["linear"]) == 3  # forward and the two backward GEMMs
    written = json.loads(out.read_text())
    assert written["gpu"] == "dry-run"
    assert written["configs"]["conv2d_forward"] == {k: list(v) for k, v in chosen["conv2d_forward"].items()}
    assert "REJECTED" not in capsys.readouterr().out


def test_tune_script_kernels_and_deadline(capsys):
    """--kernels tunes only those kernels; past --deadline no new layer is started."""
    assert set(run_tune_script("--kernels", "conv2d_forward")) == {"conv2d_forward"}
    assert set(run_tune_script("--kernels", "linear", "conv2d_weight_grad")) == {"linear", "conv2d_weight_grad"}
    assert run_tune_script("--deadline", "-1") == {}
    assert "deadline of -1 s reached" in capsys.readouterr().out


def test_host_integer_helpers_match_triton():
    """fastcnn.triton.common's cdiv and next_power_of_2 (plain Python, for launch grids) give
    Triton's answers."""
    import triton
    from fastcnn.triton.common import cdiv, next_power_of_2
    for a in [0, 1, 2, 7, 16, 17, 255, 256, 257, 10**6 + 3, 2**31 + 5]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in [1, 2, 3, 16, 64, 127, 128]:
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_other_batch_of_a_tuned_shape_uses_the_nearest_batch(tmp_path):
    """The table is tuned at one batch: a key that differs only in its first field (the
    batch) takes the entry nearest on a log scale, the larger on a tie, without timing,
    up to 4x either way and never across 16 rows; another shape, dtype or kernel does not."""
    a, b, c, big = Config(64, 64, 32, 2, 4), Config(128, 64, 32, 3, 4), Config(64, 128, 32, 3, 4), \
        Config(128, 128, 64, 4, 8)
    rest = "x64x56x56x64x3x3x56x56x1x1x1x1x1x1x1-cl-wcl"
    table = {"configs": {"conv2d_forward": {f"32{rest}|float16": list(a), f"256{rest}|float16": list(b),
                                            f"128{rest}|float16": list(big), f"64{rest}|float32": list(c)}}}
    timer = FakeTimer({})
    configs = [Config(32, 32, 32, 2, 4)]
    # 100 KB of shared memory: `big` (4 stages of 128x64 + 64x128 halves, 128 KB) does not fit.
    tuner = make_tuner(tmp_path, timer, table, shared_memory=100 * 1024)

    def choose(batch, dtype=torch.float16, key_rest=rest, kernel="conv2d_forward"):
        return tuner.choose(kernel, f"{batch}{key_rest}", dtype, configs, DEFAULT, timer.run)

    assert choose(32) == a  # exact
    assert choose(40) == a and choose(17) == a
    assert choose(200) == b and choose(1024) == b
    assert choose(90) == a  # log2(90/32) = 1.49 < log2(256/90) = 1.51
    assert timer.timed == []
    assert choose(64, torch.float32) == c
    # Nothing near: timed (and cached) like any new key.
    assert choose(32, key_rest=rest.replace("x64x56", "x32x56")) == configs[0]
    assert choose(32, kernel="conv2d_input_grad") == configs[0]
    assert choose(32, torch.bfloat16) == configs[0]
    assert choose(2048) == configs[0]  # over 4x from 256
    assert choose(16) == configs[0]  # few rows: the small-M side of 16
    assert len(timer.timed) == 5
    # A tie (64 between 32 and 128) goes to the larger batch once 128 fits.
    roomy = make_tuner(tmp_path, FakeTimer({}), table)
    assert roomy.choose("conv2d_forward", f"64{rest}", torch.float16, configs, DEFAULT, timer.run) == big


def small_conv_inputs():
    """(x, w, b) of a small channels_last 3x3 conv, for the prepared-call tests."""
    x = torch.randn(2, 5, 9, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    return x, w, torch.randn(6)


def count_lookups(monkeypatch) -> list:
    """Every Tuner.lookup from here on, as its arguments, in a list."""
    lookups = []
    real_lookup = Tuner.lookup
    monkeypatch.setattr(Tuner, "lookup", lambda self, *a: lookups.append(a) or real_lookup(self, *a))
    return lookups


def test_prepared_triton_conv_keeps_the_table_config(tmp_path, monkeypatch):
    """A prepared Triton conv call takes the table's config on its first call and keeps it
    (no lookups after that), with the same result; a new tuner is consulted afresh."""
    import fastcnn
    from fastcnn import functional as F
    from fastcnn.ops.conv_geometry import conv_params, geometry
    from fastcnn.triton import conv2d as triton_conv
    device = torch.device("cpu")  # the interpreter
    x, w, b = small_conv_inputs()
    geom = geometry(conv_params(x, w, 1, 1, 1, 1), x.shape, w.shape)
    key = triton_conv._key(geom, x, w, triton_conv.dot_mode(x.dtype, False, device))
    table = {"configs": {"conv2d_forward": {f"{key}|float32": [16, 16, 16, 1, 4]}}}
    lookups = count_lookups(monkeypatch)
    previous = tuning.tuner_for(device)
    expected = torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1))
    try:
        tuning.set_tuner(device, make_tuner(tmp_path, table=table, interpreting=True))
        with fastcnn.use_backend("triton"), torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(F.conv2d(x, w, b, padding=1, act="relu"), expected)
            assert lookups == [("conv2d_forward", key, torch.float32)]
            (tmp_path / "other").mkdir()
            tuning.set_tuner(device, make_tuner(tmp_path / "other", table=table, interpreting=True))
            F.conv2d(x, w, b, padding=1, act="relu")
            assert len(lookups) == 2
    finally:
        tuning.set_tuner(device, previous)


def test_prepared_triton_conv_keeps_the_default_where_nothing_is_timed(tmp_path, monkeypatch):
    """With no table entry and nothing that may ever be timed (the interpreter here;
    FASTCNN_TRITON_TUNE=0 on a GPU), a prepared call settles on the default once: one
    lookup, then none."""
    import fastcnn
    from fastcnn import functional as F
    device = torch.device("cpu")  # the interpreter
    x, w, b = small_conv_inputs()
    lookups = count_lookups(monkeypatch)
    previous = tuning.tuner_for(device)
    expected = torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1))
    try:
        tuning.set_tuner(device, make_tuner(tmp_path, table={"configs": {}}, interpreting=True))
        with fastcnn.use_backend("triton"), torch.no_grad():
            torch.testing.assert_close(F.conv2d(x, w, b, padding=1, act="relu"), expected)
            settled = len(lookups)
            assert settled >= 1
            for _ in range(3):
                torch.testing.assert_close(F.conv2d(x, w, b, padding=1, act="relu"), expected)
            assert len(lookups) == settled
    finally:
        tuning.set_tuner(device, previous)


def test_never_times_follows_the_interpreter_and_the_environment(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTCNN_TRITON_TUNE", raising=False)
    assert not tuning.never_times(torch.device("cuda", 0))
    assert tuning.never_times(torch.device("cpu"))
    monkeypatch.setenv("FASTCNN_TRITON_TUNE", "0")
    assert tuning.never_times(torch.device("cuda", 0))
