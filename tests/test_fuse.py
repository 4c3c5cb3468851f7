"""fastcnn.fuse: the torch.fx rewrite of a plain torch.nn model into fused fastcnn layers.

Each fused model is compared with the original it came from, run by PyTorch. BN
folding rounds the weights once more, so conv outputs get the tolerance of a sum
of C_in·k·k terms (reduction_scale)."""

import operator

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, dispatched_ops, randomize_batch_norm, reduction_scale
from torch import nn

import fastcnn
from fastcnn import nn as fnn


def ops_of(model, *inputs):
    return dispatched_ops(model, *inputs)[1]


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, functional_relu):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.functional_relu = functional_relu

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return F.relu(out) if self.functional_relu else self.relu(out)


class SmallResNet(nn.Module):
    """ResNet's structure in miniature, torch.nn only."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = BasicBlock(8, 8, 1, functional_relu=False)
        self.layer2 = BasicBlock(8, 16, 2, functional_relu=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, num_classes))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Longest sum in SmallResNet: conv2 of layer2, 16 channels x 3 x 3.
RESNET_SCALE = reduction_scale(16 * 9)


def small_resnet(dtype=torch.float32):
    torch.manual_seed(0)
    return randomize_batch_norm(SmallResNet()).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_small_resnet_matches_and_launches_fewer_ops(dtype, layout):
    model = small_resnet(dtype)
    x = torch.randn(2, 3, 11, 13, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fused = fastcnn.fuse(model, x)
    with torch.no_grad():
        assert_close(fused(x), model(x), scale=RESNET_SCALE)
    original_ops, fused_ops = ops_of(model, x), ops_of(fused, x)
    assert len(fused_ops) < len(original_ops)
    assert not [op for op in fused_ops if "batch_norm" in op or "relu" in op], fused_ops
    assert fused_ops.count("fastcnn.conv2d") == 6  # stem, 2 x 2 block convs, downsample


def test_fused_modules_keep_the_original_names():
    fused = fastcnn.fuse(small_resnet(), torch.randn(1, 3, 8, 8))
    names = dict(fused.named_modules())
    assert isinstance(names["conv1"], fnn.Conv2d) and names["conv1"].activation == "relu"
    assert isinstance(names["layer1.conv2"], fnn.Conv2d) and names["layer1.conv2"].activation == "relu"
    assert names["layer2.downsample.0"].activation is None
    assert isinstance(names["maxpool"], fnn.MaxPool2d) and isinstance(names["avgpool"], fnn.AdaptiveAvgPool2d)
    assert names["fc.0"].activation == "relu" and isinstance(names["fc.2"], fnn.Linear)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert "bn1" not in names and "layer1.bn2" not in names


def test_verbose_names_each_fusion(capsys):
    fastcnn.fuse(small_resnet(), torch.randn(1, 3, 8, 8), verbose=True)
    out = capsys.readouterr().out
    assert "conv1+bn1+relu -> Conv2d(activation='relu', BN folded)" in out
    assert "layer1.conv2+layer1.bn2+add+layer1.relu -> Conv2d(activation='relu', BN folded, residual)" in out
    assert "layer2.downsample.0+layer2.downsample.1 -> Conv2d(activation=None, BN folded)" in out
    assert "fc.0+fc.1 -> Linear(activation='relu')" in out
    assert "fastcnn.fuse: 7 fusions, 3 modules swapped" in out


def test_original_model_is_unchanged():
    model = small_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(name, type(m)) for name, m in model.named_modules()]
    x = torch.randn(2, 3, 9, 9)
    fastcnn.fuse(model, x)
    assert [(name, type(m)) for name, m in model.named_modules()] == types
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    ops = ops_of(model, x)
    assert "aten.native_batch_norm" in ops and "fastcnn.conv2d" not in ops


def test_inplace_fuses_the_model_itself():
    model = small_resnet()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
    fused = fastcnn.fuse(model, x, inplace=True)
    assert isinstance(model.conv1, fnn.Conv2d) and model.conv1.activation == "relu"
    assert fused.get_submodule("conv1") is model.conv1
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.layer2.downsample[1], nn.Identity)
    with torch.no_grad():
        assert_close(fused(x), expected, scale=RESNET_SCALE)


def test_training_mode_raises():
    model = SmallResNet()
    with pytest.raises(ValueError, match=r"training mode.*eval\(\)"):
        fastcnn.fuse(model)
    model.eval()
    model.layer1.bn1.train()
    with pytest.raises(ValueError, match="layer1.bn1"):
        fastcnn.fuse(model)


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.gate = Gate()
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Sigmoid())

    def forward(self, x):
        return self.head(self.gate(self.relu(self.bn(self.conv(x)))))


def test_untraceable_module_is_named_in_the_error():
    model = GatedNet().eval()
    with pytest.raises(RuntimeError, match=r"cannot trace module 'gate' \(Gate\).*leaf_modules"):
        fastcnn.fuse(model)


class GatedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv()

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


def test_untraceable_forward_is_named_in_the_error():
    with pytest.raises(RuntimeError, match="cannot trace the forward of GatedForward"):
        fastcnn.fuse(GatedForward().eval())


@pytest.mark.parametrize("leaves", [["gate"], [Gate]], ids=["by-name", "by-class"])
def test_leaf_modules_fuse_around_untraceable_parts(leaves):
    torch.manual_seed(0)
    model = randomize_batch_norm(GatedNet()).eval()
    fused = fastcnn.fuse(model, leaf_modules=leaves)
    assert fused.gate is model.gate or isinstance(fused.gate, Gate)
    assert fused.conv.activation == "relu" and fused.get_submodule("head.0").activation == "sigmoid"
    for sign in (1, -1):  # both branches of the gate
        x = torch.randn(2, 3, 6, 5) + 3 * sign
        with torch.no_grad():
            assert_close(fused(x), model(x), scale=reduction_scale(27))


def test_bad_leaf_modules_raise():
    with pytest.raises(TypeError, match="leaf_modules"):
        fastcnn.fuse(GatedNet().eval(), leaf_modules=[3])


# --- each pattern on its own: (model, whether it needs an example input, the ops the fused forward runs)

class Chain(nn.Module):
    """Calls `layers` in turn, then `tail(self, y, x)` written as plain Python (functional ops)."""

    def __init__(self, *layers, tail=None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.tail = tail

    def forward(self, x):
        y = x
        for layer in self.layers:
            y = layer(y)
        return self.tail(self, y, x) if self.tail is not None else y


def conv(cin=3, cout=3, **kw):
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


PATTERNS = {
    "conv+bn": (lambda: Chain(conv(), nn.BatchNorm2d(3)), ["fastcnn.conv2d"]),
    "conv+bn+relu": (lambda: Chain(conv(bias=False), nn.BatchNorm2d(3), nn.ReLU()), ["fastcnn.conv2d"]),
    "conv+bn_relu": (lambda: Chain(conv(), fnn.BatchNorm2dReLU(3)), ["fastcnn.conv2d"]),
    "fastcnn_conv+bn": (lambda: Chain(fnn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(True)),
                        ["fastcnn.conv2d"]),
    "reflect_conv+bn": (lambda: Chain(conv(padding_mode="reflect"), nn.BatchNorm2d(3)),
                        ["aten.reflection_pad2d", "fastcnn.conv2d"]),
    "conv+F.relu": (lambda: Chain(conv(), tail=lambda m, y, x: F.relu(y)), ["fastcnn.conv2d"]),
    "conv+torch.relu": (lambda: Chain(conv(), tail=lambda m, y, x: torch.relu(y)), ["fastcnn.conv2d"]),
    "conv+relu_": (lambda: Chain(conv(), tail=lambda m, y, x: y.relu_()), ["fastcnn.conv2d"]),
    "conv+tanh": (lambda: Chain(conv(), nn.Tanh()), ["fastcnn.conv2d"]),
    "conv+sigmoid": (lambda: Chain(conv(), tail=lambda m, y, x: torch.sigmoid(y)), ["fastcnn.conv2d"]),
    "conv+add+relu": (lambda: Chain(conv(), tail=lambda m, y, x: F.relu(y + x)), ["fastcnn.conv2d"]),
    "conv+bn+iadd": (lambda: Chain(conv(), nn.BatchNorm2d(3), tail=lambda m, y, x: operator.iadd(y, x)),
                     ["fastcnn.conv2d"]),
    "conv+torch.add+tanh": (lambda: Chain(conv(), tail=lambda m, y, x: torch.add(x, y).tanh()), ["fastcnn.conv2d"]),
    "conv+add_": (lambda: Chain(conv(), tail=lambda m, y, x: y.add_(x)), ["fastcnn.conv2d"]),
    "conv+bn+AddReLU": (lambda: Chain(conv(), nn.BatchNorm2d(3), tail=lambda m, y, x: m.join(x, y)),
                        ["fastcnn.conv2d"]),
    "linear+relu": (lambda: Chain(nn.Flatten(), nn.Linear(12, 7), nn.ReLU()), ["aten.view", "fastcnn.linear"]),
    "linear+tanh": (lambda: Chain(nn.Flatten(), nn.Linear(12, 7), nn.Tanh()), ["aten.view", "fastcnn.linear"]),
    "linear": (lambda: Chain(nn.Flatten(), nn.Linear(12, 7)), ["aten.view", "fastcnn.linear"]),
    "max_pool": (lambda: Chain(nn.MaxPool2d(2, ceil_mode=True)), ["fastcnn.max_pool2d_no_indices"]),
    "avg_pool": (lambda: Chain(nn.AvgPool2d(3, 2, 1, count_include_pad=False)), ["fastcnn.avg_pool2d"]),
    "adaptive_avg_pool": (lambda: Chain(nn.AdaptiveAvgPool2d((1, 1))), ["fastcnn.global_avg_pool2d"]),
    "F.max_pool2d": (lambda: Chain(tail=lambda m, y, x: F.max_pool2d(x, 3, stride=(1, 2), padding=1)),
                     ["fastcnn.max_pool2d_no_indices"]),
    "F.avg_pool2d": (lambda: Chain(tail=lambda m, y, x: F.avg_pool2d(x, 2)), ["fastcnn.avg_pool2d"]),
    "F.adaptive_avg_pool2d": (lambda: Chain(tail=lambda m, y, x: F.adaptive_avg_pool2d(x, 1)),
                              ["fastcnn.global_avg_pool2d"]),
    "bn+relu": (lambda: Chain(nn.BatchNorm2d(3), nn.ReLU()),
                ["aten.native_batch_norm", "aten.relu_"]),
}


def build(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = PATTERNS[name][0]()
    model.join = fnn.AddReLU()
    return randomize_batch_norm(model).to(dtype).eval()


@pytest.mark.parametrize("name", PATTERNS)
def test_pattern_is_fused(name):
    model = build(name)
    x = torch.randn(2, 3, 2, 2) if name.startswith("linear") else torch.randn(2, 3, 7, 6)
    fused = fastcnn.fuse(model, x)
    assert ops_of(fused, x) == PATTERNS[name][1]
    with torch.no_grad():
        assert_close(fused(x), model(x), scale=reduction_scale(27))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_bn_relu_in_half_precision(dtype):
    """Against the float64 result: the folded weights are rounded to `dtype` once,
    the original rounds after the conv and again after the BatchNorm."""
    model = build("conv+bn+relu", dtype)
    x = torch.randn(2, 3, 7, 6).to(dtype)
    fused = fastcnn.fuse(model, x)
    with torch.no_grad():
        assert_close(fused(x), build("conv+bn+relu", torch.float64)(x.double()).to(dtype), scale=reduction_scale(27))


def test_add_without_example_input_is_left_alone():
    """No shapes known: `+` might broadcast, so only the conv is swapped."""
    model = build("conv+add+relu")
    x = torch.randn(2, 3, 7, 6)
    fused = fastcnn.fuse(model)
    assert ops_of(fused, x) == ["fastcnn.conv2d", "aten.add", "aten.relu"]
    # AddReLU checks the shapes itself: fused without an example input.
    assert ops_of(fastcnn.fuse(build("conv+bn+AddReLU")), x) == ["fastcnn.conv2d"]


class Unfusable(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case
        self.conv = conv()
        self.bn = nn.BatchNorm2d(3)
        self.bias = nn.Parameter(torch.randn(1, 3, 1, 1))

    def forward(self, x):
        if self.case == "two_users":  # the conv output is needed unnormalised too
            y = self.conv(x)
            return self.bn(y) + y
        if self.case == "shared_conv":  # one module, two calls: folding would change both
            return self.bn(self.conv(x)) + self.conv(x)
        if self.case == "broadcast":  # a residual must have the conv output's shape
            return F.relu(self.conv(x) + self.bias)
        if self.case == "mutated_input":  # x changes between the conv and the add
            y = self.bn(self.conv(x))
            x.mul_(2)
            return y + x
        raise AssertionError(self.case)


@pytest.mark.parametrize("case, op_left", [("two_users", "aten.native_batch_norm"),
                                            ("shared_conv", "aten.native_batch_norm"),
                                            ("broadcast", "aten.add"), ("mutated_input", "aten.add")])
def test_unsafe_patterns_are_not_fused(case, op_left):
    torch.manual_seed(0)
    model = randomize_batch_norm(Unfusable(case)).eval()
    x = torch.randn(2, 3, 5, 4)
    fused = fastcnn.fuse(model, x)
    with torch.no_grad():
        expected = model(x.clone())
        assert_close(fused(x.clone()), expected, scale=reduction_scale(27))
    assert op_left in ops_of(fused, x)


def test_gradients_flow_through_the_fused_model():
    model = small_resnet(torch.float64)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    fused = fastcnn.fuse(model, x.detach())
    (grad_expected,) = torch.autograd.grad(model(x).sum(), x)
    (grad_fused,) = torch.autograd.grad(fused(x).sum(), x)
    assert_close(grad_fused, grad_expected)
    fused.train()  # no BatchNorm left to switch: the fused model trains as it infers
    fused(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())


def test_half_of_a_model_already_fastcnn():
    """fastcnn modules are leaves: a model mixing both fuses its torch.nn part."""
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(fnn.Conv2dReLU(3, 4, 3), conv(4, 4), nn.BatchNorm2d(4),
                                                fnn.MaxPool2d(2), nn.ReLU())).eval()
    x = torch.randn(1, 3, 8, 8)
    fused = fastcnn.fuse(model, x)
    assert ops_of(fused, x) == ["fastcnn.conv2d", "fastcnn.conv2d", "fastcnn.max_pool2d_no_indices", "aten.relu"]
    with torch.no_grad():
        assert_close(fused(x), model(x), scale=reduction_scale(36))


def test_a_parameter_matching_the_output_at_the_example_batch_is_not_a_residual():
    """conv(x) + a learned (1, C, H, W) offset has the conv output's shape at batch 1
    only: fused as a residual, batch 2 would fail."""
    class LearnedOffset(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv()
            self.offset = nn.Parameter(torch.randn(1, 3, 5, 4))

        def forward(self, x):
            return F.relu(self.conv(x) + self.offset)

    torch.manual_seed(0)
    model = LearnedOffset().eval()
    fused = fastcnn.fuse(model, torch.randn(1, 3, 5, 4))
    x = torch.randn(2, 3, 5, 4)
    with torch.no_grad():
        assert_close(fused(x), model(x), scale=reduction_scale(27))


@pytest.mark.parametrize("frozen", [True, False])
def test_fused_parameters_require_grad_as_the_originals(frozen):
    """A frozen model fuses into a frozen one (no autograd graph at inference)."""
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(conv(), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU(),
                                               nn.Flatten(), nn.Linear(60, 4), nn.ReLU())).eval()
    model.requires_grad_(not frozen)
    x = torch.randn(2, 3, 5, 4)
    fused = fastcnn.fuse(model, x)
    assert {p.requires_grad for p in fused.parameters()} == {not frozen}
    assert fused(x).requires_grad is (not frozen)
    lenet = fastcnn.models.lenet5(num_classes=10).eval().requires_grad_(not frozen)
    assert {p.requires_grad for p in lenet.fuse().parameters()} == {not frozen}
    resnet = fastcnn.models.resnet18(num_classes=10).eval().requires_grad_(not frozen)
    assert {p.requires_grad for p in resnet.fuse().parameters()} == {not frozen}


def test_a_saved_fused_model_loads_and_computes_the_same(tmp_path):
    """F.* pools rewritten into fastcnn.functional calls stay leaf calls in the saved code."""
    class Pools(nn.Module):
        def forward(self, x):
            return F.adaptive_avg_pool2d(F.max_pool2d(F.avg_pool2d(x, 2), 2), 1)

    x = torch.randn(2, 3, 8, 8)
    fused = fastcnn.fuse(Pools().eval(), x)
    assert ops_of(fused, x) == ["fastcnn.avg_pool2d", "fastcnn.max_pool2d_no_indices", "fastcnn.global_avg_pool2d"]
    torch.save(fused, tmp_path / "fused.pt")
    loaded = torch.load(tmp_path / "fused.pt", weights_only=False)
    assert torch.equal(loaded(x), fused(x))


def test_hooks_keep_running_and_hooks_on_the_model_are_refused():
    torch.manual_seed(0)
    model = randomize_batch_norm(nn.Sequential(nn.Sequential(conv(), nn.BatchNorm2d(3)), nn.ReLU())).eval()
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 3, 5, 4)
    fused = fastcnn.fuse(model, x)
    seen.clear()
    with torch.no_grad():
        assert_close(fused(x), model(x), scale=reduction_scale(27))
    assert seen == [(2, 3, 5, 4)] * 2  # the hooked container ran whole, in the fused model and in the original
    model.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match="hooks of its own"):
        fastcnn.fuse(model, x)


def test_the_example_input_is_left_as_it_was():
    model = nn.Sequential(nn.ReLU(inplace=True), conv()).eval()
    x = torch.randn(2, 3, 5, 4)
    before = x.clone()
    fastcnn.fuse(model, x)
    assert torch.equal(x, before)


def test_pool_modules_with_sizes_fastcnn_does_not_take_stay_with_torch():
    """stride=[] means stride = kernel_size to torch."""
    model = nn.Sequential(nn.MaxPool2d(2, stride=[]), nn.AvgPool2d(2, stride=[])).eval()
    x = torch.randn(1, 2, 8, 8)
    fused = fastcnn.fuse(model, x)
    assert torch.equal(fused(x), model(x))

