"""The cost model (fastcnn.summary, fastcnn.cost.roofline): the seed's numbers, the
networks' parameter and multiply-add totals, shared modules, branches, bad input
sizes, the command line and the roofline."""

import pytest
import torch
from torch import nn

import fastcnn
from fastcnn import __main__ as cli
from fastcnn import nn as fnn
from fastcnn.bench.ceilings import Ceilings
from fastcnn.cost import LayerCost, bound, place, plot, ridge_point, roofline, time_floor_ms
from fastcnn.models import get_model, list_models


def test_seed_direct_5x5_convolution():
    conv = nn.Conv2d(192, 32, 5, padding=2)
    (row,) = fastcnn.summary(conv, (1, 192, 28, 28), print_table=False).rows
    assert row.macs == 120_422_400
    assert row.output_shape == (1, 32, 28, 28)
    assert row.params == 192 * 32 * 25 + 32


def test_seed_bottleneck():
    model = nn.Sequential(fnn.Conv2dReLU(192, 16, 1), fnn.Conv2dReLU(16, 32, 5, padding=2))
    result = fastcnn.summary(model, (1, 192, 28, 28), print_table=False)
    assert [r.macs for r in result.rows] == [2_408_448, 10_035_200]
    assert result.total_macs == 12_443_648


def test_bytes_and_intensity_at_the_dtype():
    conv = nn.Conv2d(8, 4, 3, padding=1, bias=False)
    for dtype, size in ((torch.float32, 4), (torch.float16, 2)):
        (row,) = fastcnn.summary(conv, (2, 8, 5, 5), dtype, print_table=False).rows
        assert row.bytes_read == size * (2 * 8 * 5 * 5 + 4 * 8 * 9)
        assert row.bytes_written == size * 2 * 4 * 5 * 5
        assert row.intensity == pytest.approx(2 * row.macs / (row.bytes_read + row.bytes_written))
    # The model itself is untouched: still on the CPU in float32.
    assert conv.weight.device.type == "cpu" and conv.weight.dtype == torch.float32


def test_residual_is_read_not_multiplied():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = fnn.Conv2d(4, 4, 3, padding=1, activation="relu")

        def forward(self, x):
            return self.conv(x, residual=x)

    (row,) = fastcnn.summary(Block(), (1, 4, 6, 6), print_table=False).rows
    plain = fastcnn.summary(nn.Conv2d(4, 4, 3, padding=1), (1, 4, 6, 6), print_table=False).rows[0]
    assert row.macs == plain.macs
    assert row.bytes_read == plain.bytes_read + 4 * 4 * 6 * 6


def test_grouped_convolution_and_pools():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    rows = fastcnn.summary(model, (1, 8, 10, 10), print_table=False).rows
    assert rows[0].macs == 8 * 8 * 8 * 2 * 9
    assert [r.macs for r in rows[1:]] == [0, 0, 0, 0]
    assert rows[1].bytes_read == 4 * (8 * 8 * 8 + 4 * 8)  # input, weight, bias, running mean and var
    assert rows[3].bytes_written == 4 * 8 * 4 * 4
    assert rows[4].bytes == 0  # a flatten moves nothing


@pytest.mark.parametrize("module, size", [
    (nn.Conv2d(6, 4, (3, 2), stride=2, padding=1, groups=2), (2, 6, 7, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (1, 4, 5, 5)),
    (nn.Conv1d(3, 5, 3), (2, 3, 9)),
    (nn.Linear(7, 3), (2, 4, 7)),
])
def test_macs_agree_with_torch_flop_counter(module, size):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(size))
    assert fastcnn.summary(module, size, print_table=False).total_flops == counter.get_total_flops()


@pytest.mark.parametrize("name", list_models())
def test_parameter_totals(name):
    with torch.device("meta"):
        model = get_model(name)
    size = (1, 1, 32, 32) if name == "lenet5" else (1, 3, 227, 227) if name == "alexnet_original" else (1, 3, 224, 224)
    result = fastcnn.summary(model, size, print_table=False)
    expected = sum(p.numel() for p in model.parameters())
    assert result.total_params == expected
    if name != "googlenet":  # its auxiliary classifiers do not run in eval mode
        assert sum(r.params for r in result.rows) == expected


# torchvision's documented "GFLOPS" (multiply-adds) at 224x224.
TORCHVISION_GMACS = {"alexnet": 0.71, "vgg16": 15.47, "resnet18": 1.81, "resnet50": 4.09, "googlenet": 1.50}


@pytest.mark.parametrize("name", sorted(TORCHVISION_GMACS))
def test_macs_match_torchvision(name):
    kwargs = {"aux_logits": False} if name == "googlenet" else {}
    with torch.device("meta"):
        model = get_model(name, **kwargs).eval()
    result = fastcnn.summary(model, (1, 3, 224, 224), print_table=False)
    assert result.total_macs / 1e9 == pytest.approx(TORCHVISION_GMACS[name], rel=0.01)
    if name == "vgg16":
        assert result.total_params == 138_357_544


def test_shared_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    model = Twice()
    rows = fastcnn.summary(model, (1, 3, 8, 8), print_table=False).rows
    assert [(r.name, r.call) for r in rows] == [("conv", 1), ("conv", 2)]
    assert rows[0].macs == rows[1].macs == 3 * 8 * 8 * 3 * 9
    assert rows[0].params == sum(p.numel() for p in model.parameters()) and rows[1].params == 0
    assert rows[1].label == "conv (call 2)"
    assert rows[1].bytes_read == rows[0].bytes_read  # the weights are read again


def test_branches():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.left = nn.Conv2d(4, 2, 1)
            self.right = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.ReLU())

        def forward(self, x):
            return torch.cat([self.left(x), self.right(x)], 1)

    result = fastcnn.summary(TwoBranches(), (2, 4, 5, 5), print_table=False)
    assert [r.name for r in result.rows] == ["left", "right.0", "right.1"]
    assert result.total_macs == 2 * 25 * (2 * 4 + 3 * 4 * 9)


def test_inception_writes_into_channel_slices():
    with torch.device("meta"):
        model = get_model("googlenet", aux_logits=False).eval()
    rows = fastcnn.summary(model, (1, 3, 224, 224), print_table=False).rows
    by_name = {r.name: r for r in rows}
    assert by_name["inception3a.branch1.conv"].output_shape == (1, 64, 28, 28)
    assert by_name["inception3a.branch2.1.conv"].output_shape == (1, 128, 28, 28)


def test_input_the_model_cannot_take():
    with pytest.raises(ValueError, match=r"LeNet5 cannot take an input of size 1x1x3x3: it failed in layer "
                                         r"'features.0'"):
        fastcnn.summary(get_model("lenet5"), (1, 1, 3, 3), print_table=False)
    with pytest.raises(ValueError, match="input_size"):
        fastcnn.summary(get_model("lenet5"), (1, 1, -3, 3), print_table=False)
    with pytest.raises(TypeError, match="input_size"):
        fastcnn.summary(get_model("lenet5"), 32, print_table=False)


def test_table_and_dicts(capsys):
    result = fastcnn.summary(get_model("lenet5"), (1, 1, 32, 32))
    out = capsys.readouterr().out
    assert "features.0" in out and "total" in out and "61,706" in out
    dicts = result.to_dicts()
    assert dicts[0]["name"] == "features.0" and dicts[0]["macs"] == 6 * 28 * 28 * 25


def test_cli(capsys):
    assert cli.main(["summary", "lenet5", "--input", "1,1,32,32"]) == 0
    assert cli.main(["summary", "lenet5"]) == 0  # its own 32x32 single-channel input by default
    assert "LeNet5" in capsys.readouterr().out
    assert cli.main(["summary", "torch.nn:Identity", "--input", "2,3"]) == 0
    assert cli.main(["summary", "lenet5", "--input", "1,1,3,3"]) == 2
    assert "cannot take an input" in capsys.readouterr().err


def test_cli_roofline(capsys, tmp_path, monkeypatch):
    from fastcnn.bench import ceilings
    monkeypatch.setattr(ceilings, "measure", lambda device, quick, dtype: LIMITS)  # no timing in the tests
    path = tmp_path / "lenet.png"
    assert cli.main(["summary", "lenet5", "--input", "1,1,32,32", "--roofline", str(path), "--device", "cpu",
                     "--time"]) == 0
    out = capsys.readouterr().out
    assert "on the roofline" in out and "of floor" in out and path.exists()


LIMITS = Ceilings(copy_gbps=100.0, matmul_tflops=1.0, matmul_dtype="float32")  # ridge: 10 FLOP/B


def test_roofline_bound_and_floor():
    assert ridge_point(LIMITS) == 10.0
    # 2e9 FLOP over 1e8 B (20 FLOP/B): compute-bound, 2 ms at 1 TFLOP/s.
    assert bound(2e9, 1e8, LIMITS) == "compute"
    assert time_floor_ms(2e9, 1e8, LIMITS) == pytest.approx(2.0)
    # 2e8 FLOP over 1e8 B (2 FLOP/B): memory-bound, 1 ms at 100 GB/s.
    assert bound(2e8, 1e8, LIMITS) == "memory"
    assert time_floor_ms(2e8, 1e8, LIMITS) == pytest.approx(1.0)
    assert bound(0, 1e8, LIMITS) == "memory"
    layer = LayerCost("fc", "Linear", 1, (1, 10), 0, 10**8, 10**7, 0)
    p = place(layer, LIMITS)
    assert (p.bound, p.attainable_tflops) == ("compute", 1.0) and p.floor_ms == pytest.approx(0.2)


def test_roofline_plot_and_table(tmp_path):
    model = get_model("lenet5")
    result = fastcnn.summary(model, (2, 1, 32, 32), print_table=False)
    measured = roofline.measure_layer_ms(model, (2, 1, 32, 32), torch.float32, torch.device("cpu"), repeats=1)
    assert len(measured) == len(result.rows) and all(ms >= 0 for ms in measured)
    path = tmp_path / "roofline.png"
    plot(result, LIMITS, str(path), measured_ms=measured)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = roofline.table(result, LIMITS, measured)
    assert table.row_count == 5  # the conv and FC layers


@pytest.mark.parametrize("model", ["nosuch", "nosuch_module:thing", "torch.nn:Linear"])
def test_summary_of_a_model_it_cannot_build_says_so(model):
    with pytest.raises(SystemExit, match=f"fastcnn summary: cannot build '{model}'"):
        cli.main(["summary", model])
