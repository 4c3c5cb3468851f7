"""fastcnn.fuse: inference fusion of any torch.nn model, by a torch.fx graph rewrite.

The model is traced with torch.fx (fastcnn.nn modules are leaves, like torch.nn's),
then, walking the graph in order:

  conv [-> BatchNorm2d | BatchNorm2dReLU] [-> add(other) | AddReLU(other)] [-> relu | tanh | sigmoid]
      -> one fastcnn Conv2d, BatchNorm folded into its weights, called as conv(x, residual=other)
  linear [-> relu | tanh | sigmoid]      -> fastcnn Linear(activation=...)
  BatchNorm2d -> relu (no conv before)   -> fastcnn BatchNorm2dReLU
  MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (modules, and F.* calls with constant arguments)
                                         -> their fastcnn namesakes
  a torch.nn Conv2d or Linear with nothing to fuse -> its fastcnn namesake

A pattern is rewritten only when each intermediate value has no other user. A
plain add is fused only when its operands' shapes and dtypes are known to be equal
and the other operand is computed from the model's inputs (a residual must have the
conv output's shape; `+` would broadcast, and a parameter's fixed shape matches the
output's at one batch only): pass `example_input` to have them propagated; without
it, adds are left alone (AddReLU never broadcasts, so it is fused either way). Shapes
are compared at the example: give one with batch > 1 and the model's usual image
size, so that an operand that only broadcasts (size 1 where the output is larger)
cannot pass for a residual there. Everything else stays as it was. BatchNorm
folding uses the running statistics, so the model must be in eval mode: fuse
raises otherwise rather than change what the model computes.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections import Counter

import torch
import torch.fx as fx
import torch.nn.functional as torch_F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from fastcnn import functional as F
from fastcnn import nn as fnn
from fastcnn.fusion.fold import fold_batch_norm, has_hooks, requires_grad_like, to_fastcnn_conv
from fastcnn.fusion.packing import keep_weights_packed

FASTCNN_MODULES = (fnn.Conv2d, fnn.Linear, fnn.MaxPool2d, fnn.AvgPool2d, fnn.AdaptiveAvgPool2d, fnn.AddReLU,
                   fnn.BatchNorm2dReLU)

ACT_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
ACT_FUNCTIONS = {torch_F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", torch_F.relu_: "relu",
                 torch.tanh: "tanh", torch.tanh_: "tanh", torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid"}
ACT_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid",
               "sigmoid_": "sigmoid"}
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul, operator.setitem, operator.delitem)


# torch.nn.functional's pooling signatures (avg_pool2d is a builtin without one), to bind traced calls.
def _max_pool2d_signature(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                          return_indices=False): ...


def _avg_pool2d_signature(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                          divisor_override=None): ...


def _adaptive_avg_pool2d_signature(input, output_size): ...


POOL_FUNCTIONS = {torch_F.max_pool2d: inspect.signature(_max_pool2d_signature),
                  torch_F.avg_pool2d: inspect.signature(_avg_pool2d_signature),
                  torch_F.adaptive_avg_pool2d: inspect.signature(_adaptive_avg_pool2d_signature)}


class FuseTracer(fx.Tracer):
    """torch.fx's tracer with fastcnn.nn modules and `leaf_modules` (classes, or
    qualified names as in model.named_modules()) kept as leaves. Remembers the
    innermost module whose forward failed to trace, for the error message."""

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        unknown = [m for m in leaf_modules if not isinstance(m, (type, str))]
        if unknown:
            raise TypeError(f"leaf_modules must hold module classes or qualified names, got {unknown[0]!r}")
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A module with hooks stays one call, so that its hooks run on what it computes.
        return (isinstance(m, FASTCNN_MODULES + self.leaf_types) or module_qualified_name in self.leaf_names
                or has_hooks(m) or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module records itself first
                self.failed_module = self.path_of_module(m)
            raise


@torch.no_grad()
def fuse(model: nn.Module, example_input=None, *, inplace: bool = False, verbose: bool = False,
         leaf_modules=()) -> fx.GraphModule:
    """The eval-mode `model` as a torch.fx.GraphModule with its conv/BN/activation/
    residual chains, linear layers and pools replaced by fused fastcnn layers (see
    the module docstring). The fused modules keep the names of the convolutions
    and layers they replace.

    example_input: a tensor, or a tuple of the forward's arguments; the model runs
        once on it (torch.fx ShapeProp) so that shapes are known and residual adds
        can be fused.
    inplace: fuse `model` itself instead of a copy: its fused modules are replaced
        in its tree too and the absorbed ones (BatchNorm, activation) set to
        nn.Identity, saving the copy's memory. The model must not be called
        afterwards (its forward would skip the adds and activations fused away).
    verbose: print one line per rewrite and a summary.
    leaf_modules: module classes or qualified names that torch.fx should not
        trace into (data-dependent control flow); they stay as they are. If
        tracing fails, the error names the module to add here.

    A module with hooks stays as it is (its hooks run as before); hooks on the model
    itself are refused (the GraphModule would not run them). New parameters require
    grad as the ones they replace did. Under autocast a fused residual is added in the
    convolution's autocast dtype, where `+` would have promoted to float32.
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"fastcnn.fuse: model is in training mode ({training[0]!r} is): BatchNorm folding uses "
                         "the running statistics, which only eval mode uses; call model.eval() first")
    if has_hooks(model):
        raise ValueError("fastcnn.fuse: the model has hooks of its own, which the GraphModule it returns would not "
                         "run: remove them and register them on the result")
    root = model if inplace else copy.deepcopy(model)
    tracer = FuseTracer(leaf_modules)
    try:
        graph = tracer.trace(root)
    except Exception as err:
        where = f"module {tracer.failed_module!r} ({type(root.get_submodule(tracer.failed_module)).__name__})" \
            if tracer.failed_module else f"the forward of {type(root).__name__}"
        raise RuntimeError(f"fastcnn.fuse: torch.fx cannot trace {where}: {err}. Pass leaf_modules=[...] naming "
                           "it (or its class) to leave it untraced and fuse around it") from err
    gm = fx.GraphModule(tracer.root, graph, f"Fused{type(root).__name__}")

    shapes_known = example_input is not None
    if shapes_known:
        args = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
        # copies: a model whose first layer works in place must not write into the caller's input
        ShapeProp(gm).propagate(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))

    rewrite = _Rewrite(gm, shapes_known)
    nodes_before = len(gm.graph.nodes)
    rewrite.run()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    keep_weights_packed(gm)

    if inplace:
        for name, module in rewrite.replaced.items():
            _set_module(model, name, module)
        for name in rewrite.absorbed:
            if not _has_module(gm, name):
                _set_module(model, name, nn.Identity())
    if verbose:
        for line in rewrite.log:
            print(line)
        print(f"fastcnn.fuse: {rewrite.fusions} fusions, {rewrite.swaps} modules swapped for fastcnn's; "
              f"{nodes_before} -> {len(gm.graph.nodes)} graph nodes")
    return gm


class _Rewrite:
    """The pattern rewrites on one GraphModule's graph, in node order."""

    def __init__(self, gm: fx.GraphModule, shapes_known: bool):
        self.gm = gm
        self.graph = gm.graph
        self.modules = dict(gm.named_modules())
        self.shapes_known = shapes_known
        # A module called twice cannot be replaced for one of the calls only.
        self.calls = Counter(n.target for n in self.graph.nodes if n.op == "call_module")
        self.replaced: dict[str, nn.Module] = {}
        self.absorbed: list[str] = []
        self.log: list[str] = []
        self.fusions = 0
        self.swaps = 0
        self.erased: set[fx.Node] = set()

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node in self.erased:
                continue
            module = self.modules.get(node.target) if node.op == "call_module" else None
            if isinstance(module, nn.Conv2d):
                self.conv_chain(node, module)
            elif isinstance(module, nn.Linear):
                self.linear_chain(node, module)
            elif type(module) is nn.BatchNorm2d:
                self.batch_norm_relu(node, module)
            elif module is not None:
                self.pool_module(node, module)
            elif node.op == "call_function" and node.target in POOL_FUNCTIONS:
                self.pool_function(node)

    # --- the patterns

    def conv_chain(self, node: fx.Node, conv: nn.Conv2d) -> None:
        plain = type(conv) is nn.Conv2d or (isinstance(conv, fnn.Conv2d) and conv.activation is None)
        if not (plain and self.replaceable(node) and len(node.args) == 1 and not node.kwargs):
            return
        chain, value = [node], node
        bn, other, act = None, None, None

        user = self.sole_user(value)
        if self.foldable_batch_norm(user, conv):
            bn = self.modules[user.target]
            act = "relu" if isinstance(bn, fnn.BatchNorm2dReLU) else None
            chain.append(user)
            value = user
        if act is None:
            user = self.sole_user(value)
            other, act = self.residual_of(user, value)
            # The fused conv runs where the add was (`other` may be computed after the
            # conv): nothing in between may write to a tensor in place.
            if other is not None and self.mutation_between(node, user, chain):
                other, act = None, None
            if other is not None:
                chain.append(user)
                value = add = user
        if act is None:
            user = self.sole_user(value)
            act = self.activation_of(user)
            if act is not None:
                chain.append(user)
        if len(chain) == 1:
            if type(conv) is nn.Conv2d:
                self.swap(node, to_fastcnn_conv(conv, None))
            return
        fused = fold_batch_norm(conv, bn, act) if bn is not None else to_fastcnn_conv(conv, act)
        kwargs = {"residual": other} if other is not None else {}
        detail = f"activation={act!r}" + (", BN folded" if bn is not None else "") + \
            (", residual" if other is not None else "")
        self.replace_chain(chain, fused, node.args, kwargs, anchor=add if other is not None else node, detail=detail)

    def linear_chain(self, node: fx.Node, linear: nn.Linear) -> None:
        plain = type(linear) is nn.Linear or (isinstance(linear, fnn.Linear) and linear.activation is None)
        if not (plain and self.replaceable(node) and len(node.args) == 1 and not node.kwargs):
            return
        user = self.sole_user(node)
        act = self.activation_of(user)
        if act is not None:
            self.replace_chain([node, user], _to_fastcnn_linear(linear, act), node.args, {}, anchor=node,
                               detail=f"activation={act!r}")
        elif type(linear) is nn.Linear:
            self.swap(node, _to_fastcnn_linear(linear, None))

    def batch_norm_relu(self, node: fx.Node, bn: nn.BatchNorm2d) -> None:
        if not (self.replaceable(node) and len(node.args) == 1 and not node.kwargs):
            return
        user = self.sole_user(node)
        if self.activation_of(user) != "relu":
            return
        fused = fnn.BatchNorm2dReLU(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                    device=_device_of(bn), dtype=_dtype_of(bn))
        fused.load_state_dict(bn.state_dict())
        fused.train(bn.training)
        requires_grad_like(fused, bn)
        self.replace_chain([node, user], fused, node.args, {}, anchor=node, detail="")

    def pool_module(self, node: fx.Node, module: nn.Module) -> None:
        if has_hooks(module):
            return
        if type(module) is nn.MaxPool2d and not module.return_indices and _pool_sizes_ok(
                module.kernel_size, module.stride, module.padding, module.dilation):
            pool = fnn.MaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation, False,
                                 module.ceil_mode)
        elif type(module) is nn.AvgPool2d and module.divisor_override is None and _pool_sizes_ok(
                module.kernel_size, module.stride, module.padding):
            pool = fnn.AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                 module.count_include_pad)
        elif type(module) is nn.AdaptiveAvgPool2d:
            pool = fnn.AdaptiveAvgPool2d(module.output_size)
        else:
            return
        # Same computation for every call, so a module called several times is swapped too.
        self.set_module(node.target, pool)
        self.swaps += 1
        self.log.append(f"{node.target} -> {pool.__class__.__name__}({pool.extra_repr()})")

    def pool_function(self, node: fx.Node) -> None:
        try:
            bound = POOL_FUNCTIONS[node.target].bind(*node.args, **node.kwargs)
        except TypeError:
            return
        bound.apply_defaults()
        input, *params = bound.arguments.values()
        if not all(_constant(p) for p in params):
            return
        name = node.target.__name__
        if node.target is torch_F.max_pool2d:
            kernel, stride, padding, dilation, ceil_mode, return_indices = params
            if return_indices or not _pool_sizes_ok(kernel, stride, padding, dilation):
                return
            target, args = F.max_pool2d, (input, kernel, stride, padding, dilation, ceil_mode)
        elif node.target is torch_F.avg_pool2d:
            kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = params
            if divisor_override is not None or not _pool_sizes_ok(kernel, stride, padding):
                return
            target, args = F.avg_pool2d, (input, kernel, stride, padding, ceil_mode, count_include_pad)
        else:
            (output_size,) = params
            if output_size not in (1, (1, 1), [1, 1], (1,), [1]):
                return
            target, args = F.global_avg_pool2d, (input,)
        node.target, node.args, node.kwargs = target, args, {}
        # as torch.fx.wrap marks a call: the saved code then wraps the function again, so that
        # a reloaded GraphModule does not trace into it
        node.meta["is_wrapped"] = True
        self.swaps += 1
        self.log.append(f"{node.name} (F.{name}) -> fastcnn.functional.{target.__name__}")

    # --- matching helpers

    def replaceable(self, node: fx.Node) -> bool:
        return self.calls[node.target] == 1 and not has_hooks(self.modules[node.target])

    @staticmethod
    def sole_user(node: fx.Node) -> fx.Node | None:
        return next(iter(node.users)) if len(node.users) == 1 else None

    def foldable_batch_norm(self, node: fx.Node | None, conv: nn.Conv2d) -> bool:
        if node is None or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return False
        bn = self.modules[node.target]
        return (type(bn) in (nn.BatchNorm2d, fnn.BatchNorm2dReLU) and bn.track_running_stats
                and bn.running_mean is not None and bn.num_features == conv.out_channels and not has_hooks(bn))

    def activation_of(self, node: fx.Node | None) -> str | None:
        """The activation `node` applies to its one tensor argument, or None."""
        if node is None or not node.args or any(isinstance(a, fx.Node) for a in node.args[1:]):
            return None
        if set(node.kwargs) - {"inplace"}:
            return None
        if node.op == "call_module":
            module = self.modules[node.target]
            return None if has_hooks(module) else ACT_MODULES.get(type(module))
        if node.op == "call_function":
            return ACT_FUNCTIONS.get(node.target) if _hashable(node.target) else None
        if node.op == "call_method":
            return ACT_METHODS.get(node.target)
        return None

    def residual_of(self, node: fx.Node | None, value: fx.Node) -> tuple[fx.Node | None, str | None]:
        """(other, activation) when `node` adds `other` to `value` (AddReLU: with relu)."""
        if node is None or len(node.args) != 2 or node.args.count(value) != 1:
            return None, None
        other = node.args[1] if node.args[0] is value else node.args[0]
        if not isinstance(other, fx.Node):
            return None, None
        if node.op == "call_module" and type(self.modules[node.target]) is fnn.AddReLU and not node.kwargs:
            return (other, "relu") if not has_hooks(self.modules[node.target]) else (None, None)
        is_add = ((node.op == "call_function" and _hashable(node.target) and node.target in ADD_FUNCTIONS)
                  or (node.op == "call_method" and node.target in ADD_METHODS))
        if not is_add or node.kwargs not in ({}, {"alpha": 1}):
            return None, None
        # An in-place add writes into its first operand: fusable only when that is the conv's value.
        in_place = node.target in (operator.iadd, "add_")
        if in_place and node.args[0] is not value:
            return None, None
        return (other, None) if self.same_shape(value, other, node) and self.follows_input(other) else (None, None)

    def follows_input(self, node: fx.Node) -> bool:
        """Whether `node` is computed from the model's inputs. A value made of parameters,
        buffers and constants alone (a learned (1, C, H, W) offset) has a fixed shape that
        the conv output's matched only at the example's batch: `+` broadcasts it at any
        other, a residual must not."""
        seen, todo = set(), [node]
        while todo:
            current = todo.pop()
            if current.op == "placeholder":
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(current.all_input_nodes)
        return False

    def same_shape(self, *nodes: fx.Node) -> bool:
        """Whether ShapeProp saw the same shape and dtype at all `nodes` (4-D tensors)."""
        if not self.shapes_known:
            return False
        metas = [n.meta.get("tensor_meta") for n in nodes]
        if not all(isinstance(m, TensorMetadata) for m in metas):
            return False
        first = metas[0]
        return len(first.shape) == 4 and all(m.shape == first.shape and m.dtype == first.dtype for m in metas)

    def mutation_between(self, first: fx.Node, last: fx.Node, chain: list[fx.Node]) -> bool:
        node = first.next
        while node is not last:
            if node not in chain and self.mutates(node):
                return True
            node = node.next
        return False

    def mutates(self, node: fx.Node) -> bool:
        """Whether `node` may write into a tensor it is given (conservative)."""
        if node.op == "call_method":
            return node.target.endswith("_")
        if node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            return ((_hashable(node.target) and node.target in IN_PLACE_OPERATORS)
                    or name.endswith("_") or node.kwargs.get("inplace") is True
                    or any(a is True for a in node.args[1:]))
        if node.op == "call_module":
            module = self.modules[node.target]
            if isinstance(module, FASTCNN_MODULES):
                return False
            return getattr(module, "inplace", False) is True or not type(module).__module__.startswith("torch.nn")
        return False

    # --- graph surgery

    def replace_chain(self, chain: list[fx.Node], fused: nn.Module, args, kwargs, *, anchor: fx.Node,
                      detail: str) -> None:
        """Replaces the nodes of `chain` (each feeding the next) by one call of `fused`,
        inserted before `anchor` under the name of chain[0]'s module."""
        head = chain[0]
        with self.graph.inserting_before(anchor):
            new = self.graph.call_module(head.target, args, kwargs)
        new.meta = dict(chain[-1].meta)
        chain[-1].replace_all_uses_with(new)
        for node in reversed(chain):
            self.graph.erase_node(node)
            self.erased.add(node)
        self.set_module(head.target, fused)
        self.absorbed += [n.target for n in chain[1:] if n.op == "call_module"]
        self.fusions += 1
        names = "+".join(n.target if n.op == "call_module" else n.name for n in chain)
        self.log.append(f"{names} -> {type(fused).__name__}({detail})")

    def swap(self, node: fx.Node, module: nn.Module) -> None:
        self.set_module(node.target, module)
        self.swaps += 1
        self.log.append(f"{node.target} -> {type(module).__name__}")

    def set_module(self, name: str, module: nn.Module) -> None:
        _set_module(self.gm, name, module)
        self.modules[name] = module
        self.replaced[name] = module


@torch.no_grad()
def _to_fastcnn_linear(linear: nn.Linear, activation: str | None) -> fnn.Linear:
    fused = fnn.Linear(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                       linear.weight.dtype, activation=activation)
    fused.weight.copy_(linear.weight)
    if linear.bias is not None:
        fused.bias.copy_(linear.bias)
    fused.train(linear.training)
    return requires_grad_like(fused, linear)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _has_module(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _hashable(target) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _constant(value) -> bool:
    """No graph value inside: a plain argument fixed at trace time."""
    if isinstance(value, (tuple, list)):
        return all(_constant(v) for v in value)
    return not isinstance(value, fx.Node)


def _pool_sizes_ok(*sizes) -> bool:
    """Ints or pairs of ints (or a None stride): what fastcnn's pools take; anything
    else torch accepts (an empty stride list) stays with torch."""
    def ok(v):
        if v is None:
            return True
        if isinstance(v, (tuple, list)):
            return len(v) in (1, 2) and all(type(x) is int for x in v)
        return type(v) is int
    return all(ok(v) for v in sizes)


def _device_of(module: nn.Module):
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return None if tensor is None else tensor.device


def _dtype_of(module: nn.Module):
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next((b for b in module.buffers() if b.is_floating_point()), None)
    return None if tensor is None else tensor.dtype


__all__ = ["FuseTracer", "fuse"]
