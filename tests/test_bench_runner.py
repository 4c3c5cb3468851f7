"""The benchmark runner (`python -m fastcnn bench`): rows, rates against the
ceilings, summaries and the command line, on cheap cases."""

import json

import torch

from fastcnn import __main__ as cli
from fastcnn.bench import runner
from fastcnn.bench.ceilings import Ceilings
from fastcnn.bench.layer_cases import conv_case, linear_case
from fastcnn.bench.layers import ConvLayer, LinearLayer

LIMITS = Ceilings(copy_gbps=10.0, matmul_tflops=0.1, matmul_dtype="float32")
SMALL_CONV = ConvLayer("test", "conv", 2, 4, (9, 9), 6, 3, 1, 1)
SMALL_FC = LinearLayer("test", "fc", 3, 16, 5)


def test_conv_case_forward_and_backward_rows():
    for backward in (False, True):
        case = conv_case(SMALL_CONV, channels_last=True, backward=backward)
        row = runner.run_case(case, "torch", torch.float32, torch.device("cpu"), LIMITS, quick=True)
        assert row.matches_eager, row
        assert row.compute_bound and row.tflops > 0
        assert row.fraction_of_matmul == row.tflops / LIMITS.matmul_tflops
        assert case.flops == 2 * SMALL_CONV.macs * (3 if backward else 1)


def test_linear_case_row_and_markdown(tmp_path):
    rows = [runner.run_case(linear_case(SMALL_FC, backward=b), "torch", torch.float32, torch.device("cpu"), LIMITS,
                            quick=True) for b in (False, True)]
    assert all(r.matches_eager for r in rows)
    text = runner.markdown(rows, LIMITS, torch.device("cpu"))
    assert "TFLOP/s" in text and "% of matmul" in text
    assert "linear [torch]: geometric mean" in text
    runner.save(rows, LIMITS, torch.device("cpu"), str(tmp_path / "r.json"), None)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["rows"]) == 2 and saved["rows"][0]["tflops"] > 0


def test_geomean_speedups():
    def row(speedup):
        return runner.Row("conv2d", "c", "s", "float32", "cpu", 1.0, speedup, speedup, 0, 0, True)
    summary = runner.geomean_speedups([row(2.0), row(0.5), row(1.0)])
    mean, worst, n = summary[("conv2d", "cpu")]
    assert abs(mean - 1.0) < 1e-12 and worst == 0.5 and n == 3


def test_summary_against_compile():
    def row(eager, ours, compiled):
        return runner.Row("conv2d", "c", "s", "float32", "cpu", ours, eager, eager / ours, 0, 0, True,
                          compile_ms=compiled)
    (line,) = runner.summary_lines([row(2.0, 1.0, 4.0), row(1.0, 1.0, 0.25)])
    assert "geometric mean 1.41x eager over 2 cases, worst 1.00x; 1.00x torch.compile" in line


def test_cli_layers_arguments():
    args = cli.parse_args(["bench", "--layers", "--nets", "lenet5", "--backward", "--compile"])
    assert args.layers and args.nets == ["lenet5"] and args.backward and args.compile and not args.nchw


def test_floor_columns_for_compute_bound_rows():
    row = runner.run_case(conv_case(SMALL_CONV), "torch", torch.float32, torch.device("cpu"), LIMITS, quick=True)
    nbytes = row.gbps * row.ms * 1e6
    flops = row.tflops * row.ms * 1e9
    floor = max(flops / 1e8, nbytes / 1e7)  # LIMITS: 0.1 TFLOP/s, 10 GB/s
    assert abs(row.floor_ms - floor) <= 1e-9 * floor
    assert row.bound == ("compute" if flops / 1e8 >= nbytes / 1e7 else "memory")
    memory_row = runner.Row("add_act", "c", "s", "float32", "cpu", 1.0, 1.0, 1.0, 5.0, 0.5, True)
    assert memory_row.floor_ms is None and runner.floor_texts(memory_row) == ("", "")
    text = runner.markdown([row, memory_row], LIMITS, torch.device("cpu"))
    assert "| floor ms | of floor |" in text
    assert f"| {row.floor_ms:.3f} ({row.bound}) | {100 * row.floor_ms / row.ms:.0f}% |" in text
    assert runner.table([row], LIMITS).columns[-3].header == "floor ms"
