"""The whole-network benchmark (`python -m fastcnn bench`, fastcnn.bench.networks)
on LeNet-5, the one network cheap enough to run here: every contender computes the
same thing, the rows and outputs say what was measured, and the command line."""

import json

import pytest
import torch

from fastcnn import __main__ as cli
from fastcnn.bench import networks

CPU = torch.device("cpu")


@pytest.mark.parametrize("mode", networks.MODES)
def test_contenders_agree(mode):
    """fastcnn (fused for inference), eager in both layouts and torch.compile give
    the same first result: the logits, or a training step's loss."""
    w = networks.workload("lenet5", mode, 4, torch.float32, CPU)
    expected = networks.first_result(networks.contender(w, "eager", channels_last=False))
    for name, channels_last in (("eager", True), ("fastcnn", True), ("compile", False)):
        got = networks.first_result(networks.contender(w, name, channels_last))
        assert networks.close(got, expected, torch.float32), name
    # a training step changes the weights of the contender's own copy only
    if mode == "train":
        step = networks.contender(w, "fastcnn")
        first, second = step(), step()
        assert not torch.equal(first, second)
        assert torch.equal(networks.first_result(networks.contender(w, "fastcnn")), first)


@pytest.mark.parametrize("mode", networks.MODES)
def test_autocast_contenders(mode):
    """--autocast: float32 weights and input, each call under torch.autocast; the
    contenders compute in bfloat16 (their logits come out bfloat16) and agree."""
    w = networks.workload("lenet5", mode, 4, torch.bfloat16, CPU, autocast=True)
    assert w.x.dtype == torch.float32 and w.autocast_dtype == torch.bfloat16
    expected = networks.first_result(networks.contender(w, "eager", channels_last=False))
    got = networks.first_result(networks.contender(w, "fastcnn"))
    if mode == "infer":
        assert expected.dtype == got.dtype == torch.bfloat16
    assert networks.close(got, expected, torch.bfloat16)
    row = networks.run_network("lenet5", mode, 2, torch.bfloat16, CPU, "cpu", with_compile=False, autocast=True)
    assert row.dtype == "bfloat16 autocast" and row.matches_eager


def test_close_detects_a_wrong_result():
    logits = torch.randn(4, 10)
    assert networks.close(logits + 1e-6, logits, torch.float32)
    assert not networks.close(logits + 0.1, logits, torch.float32)


def test_rows_markdown_json_and_plot(tmp_path):
    rows = [networks.run_network("lenet5", mode, 2, torch.float32, CPU, "cpu", with_compile=False)
            for mode in networks.MODES]
    for r in rows:
        assert r.matches_eager and r.ms > 0 and r.eager_ms > 0 and r.compile_ms is None
        assert r.eager_layout in ("nchw", "channels_last")
        assert r.images_per_s == pytest.approx(2 / r.ms * 1e3)
        assert r.speedup == pytest.approx(r.eager_ms / r.ms)
    text = networks.markdown(rows, "test machine")
    assert "| lenet5 | infer | 2 | cpu |" in text and "infer [cpu]: geometric mean" in text
    networks.save(rows, "test machine", str(tmp_path / "n.json"), str(tmp_path / "n.md"))
    saved = json.loads((tmp_path / "n.json").read_text())
    assert [r["mode"] for r in saved["rows"]] == ["infer", "train"]
    assert saved["rows"][0]["images_per_s"] == pytest.approx(rows[0].images_per_s)
    pytest.importorskip("matplotlib")
    networks.plot(rows, str(tmp_path / "n.png"), "test machine")
    assert (tmp_path / "n.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_against_compile():
    def row(eager, ours, compiled):
        return networks.NetRow("resnet50", "infer", 8, "float32", "cpu", ours, eager, "nchw", compiled, True)
    (line,) = networks.summary_lines([row(2.0, 1.0, 4.0), row(1.0, 1.0, 0.25)])
    assert line == "infer [cpu]: geometric mean 1.41x eager over 2 runs, worst 1.00x; 1.00x torch.compile"


def test_unknown_network_and_mode():
    with pytest.raises(ValueError, match="unknown network.*resnet19"):
        networks.run(CPU, torch.float32, nets=["resnet19"], backends=["cpu"])
    with pytest.raises(ValueError, match="mode"):
        networks.workload("lenet5", "eval", 1, torch.float32, CPU)


def test_input_shapes():
    assert networks.input_shape("lenet5") == (1, 32, 32)
    assert networks.input_shape("alexnet_original") == (3, 227, 227)
    assert networks.input_shape("resnet50") == (3, 224, 224)


def test_cli_network_arguments():
    args = cli.parse_args(["bench", "--nets", "resnet50", "--batch", "1", "8", "--mode", "infer",
                           "--backend", "cpu", "--dtype", "float32", "--plot", "s.png", "--no-compile"])
    assert args.nets == ["resnet50"] and args.batch == [1, 8] and args.mode == "infer"
    assert args.backends == ["cpu"] and args.plot == "s.png" and args.no_compile and not args.kernels
    assert not args.autocast and cli.parse_args(["bench", "--autocast"]).autocast


def test_cli_runs_lenet5(tmp_path, capsys):
    code = cli.main(["bench", "--device", "cpu", "--nets", "lenet5", "--batch", "2", "--backend", "cpu",
                     "--no-compile", "--json", str(tmp_path / "r.json")])
    assert code == 0
    assert "lenet5" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "r.json").read_text())["rows"]) == 2


def test_cuda_graphs_refused_where_they_cannot_run():
    """CUDA graphs time inference on a GPU only: the CPU and training are refused by name."""
    from fastcnn.bench import graphs
    with pytest.raises(ValueError, match="CUDA device"):
        networks.run(CPU, torch.float32, nets=["lenet5"], backends=["cpu"], cuda_graphs=True)
    with pytest.raises(ValueError, match="inference only"):
        networks.run_network("lenet5", "train", 1, torch.float32, CPU, "cpu", False, cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA device"):
        graphs.capture(lambda: None, CPU)
    with pytest.raises(SystemExit, match="--cuda-graphs"):
        cli.main(["bench", "--nets", "lenet5", "--cuda-graphs", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--cuda-graphs applies to the networks only"):
        cli.main(["bench", "--layers", "--nets", "lenet5", "--cuda-graphs", "--device", "cpu"])


def test_cuda_graphs_column_marks_the_mode():
    row = networks.NetRow("lenet5", "infer", 8, "float16", "triton", 1.0, 2.0, "channels_last", None, True,
                          cuda_graphs=True)
    assert "infer (CUDA graphs)" in networks.markdown([row], "test")


@pytest.mark.parametrize("argv, message", [
    (["--nets", "lenet6"], "unknown network 'lenet6'"),
    (["--layers", "--nets", "vgg11"], "unknown network 'vgg11' for --layers"),
    (["--nets", "lenet5", "--batch", "0"], "must be at least 1"),
    (["--nets", "lenet5", "--autocast", "--dtype", "float64"], "--autocast runs in float16 or bfloat16"),
    (["--nets", "lenet5", "--backends", "nosuch"], "backend 'nosuch' cannot run"),
    (["--nets", "lenet5", "--backends", "cuda", "--device", "cpu"], "backend 'cuda' cannot run on cpu"),
    (["--layers", "--nets", "lenet5", "--mode", "train"], "--mode applies to the networks only"),
    (["--kernels", "--nets", "lenet5"], "--nets picks the networks"),
    (["--ops", "nosuch"], "unknown op 'nosuch'"),
    (["--nets", "lenet5", "--plot", "no/such/dir/x.png"], "--plot no/such/dir/x.png: its directory does not exist"),
])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["bench", "--device", "cpu", *argv])
    assert message in str(raised.value) or message in capsys.readouterr().err
