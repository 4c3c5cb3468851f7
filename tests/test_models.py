"""fastcnn.models against independent plain-torch.nn references (fastcnn.models.reference)
with the same weights: outputs, gradients and BatchNorm statistics in eval and
train mode; parameter counts and state_dict keys against torchvision's; fuse();
loading weights; and LeNet-5 learning."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fastcnn
import fastcnn.models as models
from fastcnn.models import reference as reference_models
from conftest import (TOLERANCES, assert_close, assert_close_normwise, backend_devices, dispatched_ops,
                      randomize_batch_norm, reduction_scale, relative_error)

pytestmark = pytest.mark.usefixtures("exact_float32")

TORCHVISION_KEYS = json.loads((Path(__file__).parent / "data" / "torchvision_state_dict_keys.json").read_text())

# name -> (builder kwargs, input (C, H, W)): the smallest input each network allows.
MODEL_CASES = {
    "lenet5": ({"num_classes": 10}, (1, 32, 32)),
    "lenet5_relu": ({"num_classes": 10, "activation": "relu"}, (1, 32, 32)),
    "alexnet": ({"num_classes": 10}, (3, 64, 64)),
    "alexnet_original": ({"num_classes": 10}, (3, 227, 227)),  # no adaptive pool: the paper's size only
    "alexnet_original_groups2": ({"num_classes": 10, "groups": 2}, (3, 227, 227)),
    "vgg11": ({"num_classes": 10}, (3, 32, 32)),
    "vgg11_bn": ({"num_classes": 10}, (3, 32, 32)),
    # 64x64 leaves 2x2 pixels for layer4: a training-mode BatchNorm over 2 images of
    # 1 pixel each normalises 2 values, and that amplifies rounding ~100x per layer.
    "resnet18": ({"num_classes": 10}, (3, 64, 64)),
    "resnet50": ({"num_classes": 10}, (3, 64, 64)),
    "nin": ({"num_classes": 10}, (3, 96, 96)),
    "googlenet": ({"num_classes": 10}, (3, 64, 64)),
    "googlenet_no_aux": ({"num_classes": 10, "aux_logits": False}, (3, 64, 64)),
}
# The Triton interpreter runs each kernel program in numpy: only the small nets.
INTERPRETED_TRITON_CASES = {"lenet5", "lenet5_relu"}
PARAMETER_COUNTS = {  # the figures, torchvision's for the models it has
    "alexnet": 61_100_840, "vgg16": 138_357_544, "resnet18": 11_689_512, "resnet50": 25_557_032,
    "googlenet_no_aux": 6_624_904, "googlenet": 13_004_888,
}


def builder_name(case: str) -> str:
    return {"lenet5_relu": "lenet5", "alexnet_original_groups2": "alexnet_original",
            "googlenet_no_aux": "googlenet"}.get(case, case)


def reference_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k in ("num_classes", "activation", "groups", "aux_logits")}


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout draws differ between two models: switch it off to compare training runs."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def model_pair(case: str, dtype=torch.float64, device="cpu", seed=0):
    """(fastcnn model, plain torch.nn reference with the same weights, input shape)."""
    kwargs, shape = MODEL_CASES[case]
    torch.manual_seed(seed)
    model = models.get_model(builder_name(case), **kwargs)
    randomize_batch_norm(model, seed)
    with torch.device("meta"):  # no initialisation: every value comes from the model's state_dict
        reference = getattr(reference_models, builder_name(case))(**reference_kwargs(kwargs))
    reference = reference.to_empty(device="cpu")
    reference.load_state_dict(model.state_dict(), strict=True)
    return (no_dropout(model).to(device, dtype), no_dropout(reference).to(device, dtype), shape)


def as_tuple(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


def backend_cases():
    for backend, device in backend_devices():
        for case in MODEL_CASES:
            if backend == "triton" and device == "cpu" and case not in INTERPRETED_TRITON_CASES:
                continue
            yield pytest.param(backend, device, case, id=f"{backend}-{device}-{case}")


@pytest.mark.parametrize("backend, device, case", list(backend_cases()))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_matches_reference(backend, device, case, mode):
    """Outputs, the input's and every parameter's gradient, and (train) the BatchNorm
    statistics, against the reference run in float64. The model runs in float64
    too: in float32 a pre-activation within rounding of zero can take the other
    side of a ReLU than in the reference, and one such flip moves a gradient by a
    whole weight row. The Triton interpreter's tl.dot is float32 only: there LeNet
    runs in float32 (its seed gives no near-zero pre-activation)."""
    interpreted = backend == "triton" and device == "cpu"
    dtype = torch.float32 if interpreted else torch.float64
    model, reference, shape = model_pair(case, dtype, device)
    reference.double()
    model.train(mode == "train")
    reference.train(mode == "train")
    x = torch.randn(2, *shape, dtype=dtype, device=device, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    with fastcnn.use_backend(backend):
        out = as_tuple(model(x))
        expected = as_tuple(reference(x_ref))
        assert len(out) == len(expected)
        weights = [torch.randn_like(e) for e in expected]
        sum((o * w.to(dtype)).sum() for o, w in zip(out, weights)).backward()
    sum((e * w).sum() for e, w in zip(expected, weights)).backward()

    def check(actual, reference_value, what):
        assert reference_value is not None and actual is not None, what
        assert_close_normwise(actual, reference_value.to(actual.dtype), scale=network_scale(model))

    for o, e in zip(out, expected):
        check(o, e, "output")
    check(x.grad, x_ref.grad, "input gradient")
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if ref_params[name].grad is None:  # unused in this mode: GoogLeNet's aux classifiers in eval
            assert p.grad is None, name
        else:
            check(p.grad, ref_params[name].grad, name)
    ref_buffers = dict(reference.named_buffers())
    kept = model.state_dict().keys()  # non-persistent buffers are constants (GoogLeNet's input map)
    for name, b in ((n, b) for n, b in model.named_buffers() if n in kept):
        if b.is_floating_point():
            check(b, ref_buffers[name], name)
        else:  # num_batches_tracked
            assert torch.equal(b, ref_buffers[name]), name


def network_scale(model: nn.Module) -> float:
    """Tolerance scale for a whole network: the longest sum in it (the largest
    fan-in), times 4 for the rounding that compounds from layer to layer."""
    return reduction_scale(max(p[0].numel() for p in model.parameters() if p.dim() > 1)) * 4


@pytest.mark.parametrize("case", ["resnet18", "googlenet_no_aux", "vgg11_bn", "alexnet"])
def test_float32_channels_last_inference(case):
    """The path inference takes: float32, channels_last, eval, fused and not."""
    model, reference, shape = model_pair(case)
    model, reference = model.float().eval(), reference.eval()
    x = torch.randn(2, *shape).contiguous(memory_format=torch.channels_last)
    expected = reference(x.double())
    model.to(memory_format=torch.channels_last)
    scale = network_scale(model)
    with torch.no_grad():
        assert_close(model(x), expected.float(), scale=scale)
        assert_close(model.fuse()(x), expected.float(), scale=scale)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_fuse_same_outputs_fewer_kernels(case):
    model, _, shape = model_pair(case, torch.float32)
    model.eval()
    x = torch.randn(2, *shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = model.fuse()
    expected, plain_ops = dispatched_ops(model, x)
    out, fused_ops = dispatched_ops(fused, x)
    scale = network_scale(model)
    assert_close(out, expected, scale=scale)
    has_batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if has_batch_norm:
        assert len(fused_ops) < len(plain_ops)
        assert not any(m for m in fused.modules() if isinstance(m, nn.BatchNorm2d))
        assert not any("batch_norm" in op for op in fused_ops)
    else:  # already one kernel per layer: nothing left to fuse
        assert fused_ops == plain_ops
    assert not any(op in fused_ops for op in ("aten.relu", "aten.relu_", "aten.add", "aten.add_"))
    # the model it was given is unchanged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.fuse(inplace=True) is model


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # argument checks read shapes
@pytest.mark.parametrize("case", ["lenet5", "resnet18", "googlenet_no_aux"])
def test_jit_trace(case):
    """A traced model (plain and fused) computes what the model does on a new input; the
    fused GoogLeNet's channel offsets stay ints while shapes are traced."""
    model, _, shape = model_pair(case, torch.float32)
    model.eval()
    for m in (model, model.fuse()):
        with torch.no_grad():
            traced = torch.jit.trace(m, torch.randn(2, *shape))
            x = torch.randn(2, *shape)
            assert torch.equal(traced(x), m(x))


@pytest.mark.parametrize("case", ["lenet5", "resnet18", "vgg11_bn", "alexnet", "nin", "googlenet_no_aux"])
def test_fx_symbolic_trace(case):
    """torch.fx.symbolic_trace, plain and fused: fastcnn.functional's functions are leaf
    calls (their checks need real tensors), BatchNorm2dReLU skips its dimension check
    on traced values, GoogLeNet's Inception modules concatenate their branches. The
    GraphModule computes what the model does."""
    model, _, shape = model_pair(case, torch.float32)
    model.eval()
    x = torch.randn(2, *shape)
    for m in (model, model.fuse()):
        traced = torch.fx.symbolic_trace(m)
        assert any(n.op == "call_function" and n.target.__module__ == "fastcnn.functional" for n in traced.graph.nodes)
        with torch.no_grad():
            assert torch.equal(traced(x), m(x))


def test_torch_export_with_a_dynamic_batch():
    """torch.export of a fused model with the batch size left symbolic (the ops' fakes
    take symbolic shapes): the exported program matches the model at another batch."""
    model, _, shape = model_pair("googlenet_no_aux", torch.float32)
    fused = model.eval().fuse()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(fused, (torch.randn(2, *shape),), dynamic_shapes=({0: batch},))
    x = torch.randn(5, *shape)
    with torch.no_grad():
        assert torch.equal(program.module()(x), fused(x))


def test_fuse_needs_eval_mode():
    with pytest.raises(ValueError, match="eval"):
        models.resnet18(num_classes=10).fuse()
    model = models.resnet18(num_classes=10).eval()
    model.layer1[0].bn1.train()  # one BatchNorm still normalising with batch statistics
    with pytest.raises(ValueError, match="'layer1.0.bn1' is in training mode"):
        model.fuse()


def test_fuse_refuses_hooks_it_would_drop_and_fusing_twice_changes_nothing():
    model = models.resnet18(num_classes=10).eval()
    handle = model.layer4[1].conv2.register_forward_hook(lambda module, args, out: None)
    with pytest.raises(ValueError, match="'layer4.1.conv2'"):
        model.fuse()
    handle.remove()
    fused = model.fuse()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused.fuse()(x), fused(x))
        assert torch.equal(fused.fuse(inplace=True)(x), fused(x))


@pytest.mark.parametrize("case", ["resnet18", "googlenet"])
def test_empty_batch(case):
    model, _, shape = model_pair(case, torch.float32)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(0, *shape)).shape == (0, 10)
        assert model.fuse()(torch.randn(0, *shape)).shape == (0, 10)


def test_inception_writes_branches_into_one_output_without_cat():
    model, _, _ = model_pair("googlenet_no_aux", torch.float32)
    model.eval()
    x = torch.randn(2, 192, 8, 8).contiguous(memory_format=torch.channels_last)
    _, plain_ops = dispatched_ops(model.inception3a, x)
    out, fused_ops = dispatched_ops(model.fuse().inception3a, x)
    assert "aten.cat" not in plain_ops and "aten.cat" not in fused_ops
    assert fused_ops.count("fastcnn.conv2d_into") == 4  # each branch's last convolution
    assert out.shape == (2, 256, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", [n for n in TORCHVISION_KEYS if not n.startswith("_")])
def test_state_dict_keys_match_torchvision(name):
    """The committed key list (tests/data, written from torchvision) keeps this
    checked where torchvision is not installed."""
    kwargs = {"aux_logits": False} if name == "googlenet_no_aux" else {}
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = models.get_model(builder_name(name), **kwargs)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == TORCHVISION_KEYS[name]


@pytest.mark.parametrize("name", list(PARAMETER_COUNTS))
def test_parameter_counts(name):
    kwargs = {"aux_logits": False} if name == "googlenet_no_aux" else {}
    with torch.device("meta"):
        model = models.get_model(builder_name(name), **kwargs)
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", ["alexnet", "vgg11_bn", "resnet50", "googlenet"])
def test_against_torchvision(name):
    """torchvision's own model, its state_dict loaded into ours: same outputs."""
    tv_models = pytest.importorskip("torchvision.models")
    extra = {"init_weights": False} if name == "googlenet" else {}
    theirs = getattr(tv_models, name)(num_classes=10, **extra).eval()
    ours = models.get_model(name, num_classes=10).eval()
    randomize_batch_norm(theirs, 1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        scale = network_scale(ours)
        assert_close(ours(x), expected, scale=scale)
        assert_close(ours.fuse()(x), expected, scale=scale)


def test_registry():
    names = models.list_models()
    for name in ("lenet5", "alexnet", "alexnet_original", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn",
                 "vgg13_bn", "vgg16_bn", "vgg19_bn", "resnet18", "resnet34", "resnet50", "resnet101",
                 "resnet152", "nin", "googlenet"):
        assert name in names
        assert getattr(models, name) is not None
    assert isinstance(models.get_model("resnet18", num_classes=7), models.ResNet)
    assert models.get_model("resnet18", num_classes=7).fc.out_features == 7
    with pytest.raises(ValueError, match="no model named 'resnet19'"):
        models.get_model("resnet19")


def test_weights_from_state_dict_and_path(tmp_path):
    source = models.resnet18(num_classes=10)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    for weights in (source.state_dict(), path, str(path)):
        loaded = models.resnet18(num_classes=10, weights=weights)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    with pytest.raises(TypeError, match="weights must be"):
        models.resnet18(weights=3)
    with pytest.raises(RuntimeError, match="size mismatch"):
        models.resnet18(num_classes=5, weights=source.state_dict())


def test_googlenet_transform_input():
    """transform_input=True rescales ImageNet-normalised input to (v - 0.5) / 0.5 per
    channel before the network, as torchvision's GoogLeNet does for its checkpoint."""
    model = models.googlenet(num_classes=10, aux_logits=False).eval()
    x = torch.randn(2, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rescaled = ((x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) - 0.5) / 0.5
    with torch.no_grad():
        expected = model(rescaled)
        model.transform_input = True
        assert_close(model(x), expected, scale=network_scale(model))
    # Its constants follow the model and stay out of the state_dict (torchvision's keys).
    assert not any(key.startswith("input_") for key in model.state_dict())
    assert model.double().input_scale.dtype == torch.float64
    # Exact in float64 (a fresh model's constants were never rounded to float32).
    exact = models.googlenet(num_classes=10, aux_logits=False, transform_input=True).double()
    assert exact.input_scale.flatten().tolist() == [s / 0.5 for s in (0.229, 0.224, 0.225)]


def test_googlenet_transform_input_against_torchvision():
    tv_models = pytest.importorskip("torchvision.models")
    x = torch.randn(2, 3, 64, 64)
    theirs = tv_models.googlenet(num_classes=10, aux_logits=False, transform_input=True, init_weights=False).eval()
    ours = models.googlenet(num_classes=10, aux_logits=False, transform_input=True, weights=theirs.state_dict())
    with torch.no_grad():
        assert_close(ours.eval()(x), theirs(x), scale=network_scale(ours))


def test_googlenet_without_aux_loads_a_checkpoint_with_aux():
    with_aux = models.googlenet(num_classes=10)
    model = models.googlenet(num_classes=10, aux_logits=False, weights=with_aux.state_dict())
    assert model.aux1 is None and torch.equal(model.fc.weight, with_aux.fc.weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        models.lenet5(activation="gelu")
    with pytest.raises(ValueError, match="groups"):
        models.alexnet_original(groups=3)


def test_lenet5_learns():
    """LeNet-5 from fused layers learns: the loss on a small synthetic task (10
    noisy class templates) falls by a clear margin in a few hundred SGD steps."""
    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 1, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (2048,), generator=gen)
    images = templates[labels] + 1.5 * torch.randn(2048, 1, 32, 32, generator=gen)
    torch.manual_seed(0)
    model = models.lenet5(num_classes=10, activation="relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(300):
        batch = torch.randint(0, 2048, (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert first > 2.0  # chance level is ln(10) = 2.3
    assert last < 0.25 * first
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9



def test_googlenet_branches_into_slices_matches_cat_and_hands_back_views():
    """Inception's training path: the branches side by side as torch.cat would put them,
    and each branch's gradient is its slice of the output gradient, a view in the same
    layout (a copy into a view of a plain tensor made autograd hand back NCHW copies)."""
    from fastcnn.models.googlenet import BranchesIntoSlices
    branches = [torch.randn(2, c, 5, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
                for c in (3, 5, 2)]
    out = BranchesIntoSlices.apply(*branches)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, torch.cat(branches, 1))
    grad = torch.randn(out.shape).contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(out, branches, grad)
    offset = 0
    for g, b in zip(grads, branches):
        assert torch.equal(g, grad[:, offset:offset + b.shape[1]])
        assert g.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr() and g.stride() == grad.stride()
        offset += b.shape[1]


@pytest.mark.parametrize("case, mode", [("lenet5", "train"), ("resnet18", "eval"),
                                        ("googlenet", "eval"), ("alexnet_original", "eval")])
def test_autocast_as_accurate_as_torch(case, mode):
    """Under torch.autocast (bfloat16 on the CPU) each model computes in bfloat16 like
    its plain torch.nn reference, and lands as close to the float64 result: output
    and every parameter's gradient within twice the reference's own autocast error
    (or bfloat16's tolerance, where that error is smaller). ResNet-18 runs in eval
    mode: in training its BatchNorms over 2x2-pixel maps amplify rounding so far that
    the reference's own bfloat16 gradients are ~70% off in layer3."""
    model, reference, shape = model_pair(case, torch.float32)
    exact = model_pair(case)[1]
    for m in (model, reference, exact):
        m.train(mode == "train")
    x = torch.randn(2, *shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs, ref_outs = as_tuple(model(x)), as_tuple(reference(x))
    exact_outs = as_tuple(exact(x.double()))
    weights = [torch.randn_like(e) for e in exact_outs]
    for m, o in ((model, outs), (reference, ref_outs), (exact, exact_outs)):
        sum((out.to(w.dtype) * w).sum() for out, w in zip(o, weights)).backward()
    floor = TOLERANCES[torch.bfloat16][0]
    assert outs[0].dtype == ref_outs[0].dtype == torch.bfloat16
    for o, r, e in zip(outs, ref_outs, exact_outs):
        assert relative_error(o, e) <= max(2 * relative_error(r, e), floor)
    ref_params, exact_params = dict(reference.named_parameters()), dict(exact.named_parameters())
    for name, p in model.named_parameters():
        if exact_params[name].grad is None:
            continue
        assert p.grad.dtype == torch.float32, name
        bound = max(2 * relative_error(ref_params[name].grad, exact_params[name].grad), floor)
        assert relative_error(p.grad, exact_params[name].grad) <= bound, name
