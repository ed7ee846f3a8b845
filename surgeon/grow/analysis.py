"""Graph analysis: where can units be added, and what reads them.

Kept apart from the edits (``surgeon.grow.ops``) that use it. A *site* is a named Linear/Conv2d
layer, the chain of elementwise ops that follows it (BatchNorm, activations, dropout), and the
linear ops that finally consume its channels, possibly through pooling and flattening. Growth is
well defined only when every path from the layer ends in such a consumer; anything else (a residual
add, a concat, a product with another tensor, a model output) is refused with the reason.

A grouped conv (ResNeXt, RegNet: ``groups`` = g, ``w`` input channels per group) is no growth site
itself; it grows with the layer that feeds it. Widening that layer by ``k = m·w`` units gives the
grouped conv ``m`` whole new groups that read exactly the new channels, and its output grows by
``m·(out/g)`` channels, which travel on to its own consumers (``Site.grouped``, the grouped conv's
site). A depthwise conv (MobileNet, EfficientNet, MNASNet, ShuffleNetV2, MaxViT's MBConv) is the
case ``w = 1``: the expansion conv that feeds it grows by any k, and the depthwise conv gets k new
filters. Old and new channels first meet in the grouped conv's consumers, so the one GrowNorm goes
after the grouped conv's chain (BatchNorm, activation), not after the widened layer's.

A concat on the way (Inception/GoogLeNet branches, DenseNet's dense blocks, SqueezeNet's Fire
modules) is followed through too: the layer's old channels keep their offset in the concat and its
new channels are appended at the concat's end (``Site.concats``), so every consumer of the concat
(every later layer of a dense block, the transition conv) gains new input columns at its end, as for
a direct consumer, and a BatchNorm over the concat (DenseNet's ``norm1``) gains new channels at its
end (``Site.region_batchnorms``). Appending keeps each pretrained weight one contiguous tensor and
lets growth repeat (a second grown branch appends after the first) at the cost of a slice of the
grown tensor; the other branches' channels do not move.

A squeeze-excitation block on the way (``x * gate(x)``, the gate being pool → squeeze → act →
excite → sigmoid) is followed through: the squeeze is a consumer (new input columns) and the excite
gains one output per new channel (``Site.excites``), so each new channel gets its own gate.

The channels are on dim 1 (``[N, C]`` features, ``[N, C, H, W]`` maps) except for a Linear applied
to a rank >= 3 tensor (transformer tokens ``[N, T, C]``, ConvNeXt's channels-last ``[N, H, W, C]``),
whose units are the last dim: such a site has ``axis=-1`` and may reach only Linear consumers (they
read the last dim), through elementwise ops and means over non-channel dims.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from surgeon.errors import GrowthError, first_line
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.modules import SURGEON_LEAF_MODULES, GroupWidened, SplitBatchNorm, Widened

# Elementwise modules: act on each channel independently and keep the shape, so new channels can
# pass through them unchanged. Dropout/Identity additionally commute with a per-channel scale.
_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh,
)
_PASS_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
try:  # per-sample (or per-batch) scaling: commutes with a per-channel scale too
    from torchvision.ops import StochasticDepth

    _PASS_MODULES += (StochasticDepth,)
except ImportError:  # torchvision is optional for user models
    pass
PASS_MODULES = _PASS_MODULES
_BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, SplitBatchNorm)
# Normalizations whose statistics span the channels: new units would change the old ones' outputs.
_CROSS_CHANNEL_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_ACT_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.selu, F.mish, torch.sigmoid, torch.tanh, F.softplus, F.hardtanh, torch.nn.functional.relu_,
}
_PASS_FUNCTIONS = {F.dropout, F.dropout2d, F.alpha_dropout}
PASS_FUNCTIONS = frozenset(_PASS_FUNCTIONS)
_ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp_min", "contiguous"}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_MIXING_FUNCTIONS = {
    operator.add: "a residual add", torch.add: "a residual add", operator.iadd: "a residual add",
    torch.cat: "a concat", torch.concat: "a concat", operator.mul: "a product with another tensor",
    torch.mul: "a product with another tensor", operator.sub: "a subtraction", torch.stack: "a stack",
}


@functools.cache
def _forward_reads_training(cls: type) -> bool:
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source (built in, generated): assume not
        return False


def reads_training(m: nn.Module) -> bool:
    """A module without children whose forward reads ``self.training`` (torchvision's
    StochasticDepth, a user's dropout-like module): fx, tracing through it, would freeze the flag at
    its value during tracing, so it is kept as one node that follows ``.train()``/``.eval()``."""
    return next(m.children(), None) is None and _forward_reads_training(type(m))


def is_batchnorm_act(m: nn.Module) -> bool:
    """A BatchNorm that also applies dropout and an activation, timm's ``BatchNormAct2d``
    (``bn → drop → act``, children named so): growth moves the two out into a node of their own."""
    names = {name for name, _ in m.named_children()}
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and bool(names) and names <= {"drop", "act"}


class SurgeonTracer(fx.Tracer):
    """torch.fx tracer that keeps torch.nn modules, surgeon's own modules, BatchNorms of other
    libraries (timm's BatchNormAct2d) and modules whose forward depends on ``self.training`` as
    single nodes: traced through, their batch statistics would be frozen at eval behaviour."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (GrowNorm, *SURGEON_LEAF_MODULES, nn.modules.batchnorm._BatchNorm)) or reads_training(m):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (a GraphModule is returned as is).

    Traced in eval mode: whatever fx still freezes of ``self.training`` (a model's own
    ``if self.training`` or ``F.dropout(x, p, self.training)``) is the inference behaviour, never
    training-time randomness baked into the deployed model."""
    if isinstance(model, fx.GraphModule):
        return model
    was_training = model.training
    model.eval()
    try:
        graph = SurgeonTracer().trace(model)
    except Exception as exc:  # fx raises many types; the user needs the first line only
        first = first_line(exc)
        raise GrowthError(
            f"{type(model).__name__} cannot be traced by torch.fx ({first}); growth needs a model whose "
            "forward has no data-dependent control flow"
        ) from exc
    finally:
        model.train(was_training)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(was_training)
    # The GraphModule keeps only modules the forward calls; remember the rest for error messages.
    gm.meta["surgeon_all_modules"] = {name: type(m).__name__ for name, m in model.named_modules() if name}
    return gm


def propagate_shapes(gm: fx.GraphModule, input_size: int) -> None:
    """Record every node's output shape in ``node.meta['tensor_meta']`` from one dummy image."""
    was_training = gm.training
    gm.eval()
    try:
        param = next(gm.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        # ShapeProp prints the failing node's traceback itself, then wraps the error in one that dumps
        # the whole fx node: keep stderr for the one-line error and report the original cause.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype))
    except Exception as exc:
        for node in gm.graph.nodes:  # no stale half-propagated shapes: the next analysis re-runs this one
            node.meta.pop("tensor_meta", None)
        first = first_line(exc.__cause__ or exc)[:300]
        raise GrowthError(f"the model does not run on a 3x{input_size}x{input_size} image ({first}); check --input-size") from exc
    finally:
        gm.train(was_training)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def is_growable_layer(module: nn.Module) -> bool:
    """Linear or ungrouped Conv2d (possibly already grown)."""
    if isinstance(module, Widened):
        return is_growable_layer(module.old)
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def is_grouped_conv(module: nn.Module) -> bool:
    """A Conv2d of g > 1 groups, grouped (ResNeXt) or depthwise (one input channel per group)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1


def is_linear_op(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, Widened))


@dataclass
class Consumer:
    """A linear op that reads the layer's channels; each channel spans ``positions`` of its inputs
    (1 unless a flatten sits in between, then H·W, channel-major). Through a concat it reads more
    than the layer's channels: ``width`` input channels, the layer's at ``offset``."""

    name: str
    node: fx.Node
    positions: int
    offset: int = 0
    width: int = 0


@dataclass
class ConcatArg:
    """The grown tensor is argument ``index`` of the concat ``node``, ``width`` channels wide before
    growth: growth slices it there and appends its new channels at the concat's end."""

    node: fx.Node
    index: int
    width: int


@dataclass
class Site:
    layer: str
    node: fx.Node
    channels: int
    rank: int                                    # rank of the layer's output (2: features, 4: maps)
    axis: int = 1                                # channel axis: 1, or -1 for a Linear on [N, ..., C]
    chain: list[fx.Node] = field(default_factory=list)   # elementwise nodes right after the layer
    batchnorms: list[str] = field(default_factory=list)
    norm_after: fx.Node | None = None            # GrowNorm goes right after this node
    tail: fx.Node | None = None                  # last node of the chain; consumers read from here
    consumers: list[Consumer] = field(default_factory=list)
    grown_norm: str | None = None                # a GrowNorm already in the chain (layer was grown)
    grouped: Site | None = None                  # the grouped conv this layer feeds, which grows with it
    group_width: int = 0                         # its input channels per group: units come in multiples
    excites: list[str] = field(default_factory=list)  # squeeze-excitation layers gaining a gate per new channel
    concats: list[ConcatArg] = field(default_factory=list)  # concats the channels go through
    region_batchnorms: list[tuple[str, int]] = field(default_factory=list)  # past the chain: (name, offset)
    calls: dict[str, int] = field(default_factory=dict, repr=False)  # how often each module is called (the walk's)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


_METADATA_METHODS = {"size", "dim", "numel"}
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device"}


def _reads_metadata_only(node: fx.Node) -> bool:
    """``x.size(0)``, ``x.shape``, ...: reads no values, so it is no consumer of the channels."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRS


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


def _only_tensor_arg(node: fx.Node, src: fx.Node) -> bool:
    """``node`` reads ``src`` as its first argument and no other tensor (sizes are fine)."""
    others = [a for a in node.all_input_nodes if a is not src and _is_tensor(a)]
    return bool(node.args) and node.args[0] is src and not others


def _is_batch_flatten(node: fx.Node, src: fx.Node) -> bool:
    """``x.view(x.size(0), -1)`` / ``x.reshape(N, -1)`` / ``x.flatten(1)``: keeps the batch, flattens
    the rest. A hard-coded ``x.view(-1, 256)`` is not accepted (it only looks right at batch 1)."""
    if node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1 and len(node.args) <= 2 and "end_dim" not in node.kwargs
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    if len(args) != 2 or args[1] != -1:
        return False
    return _is_batch_size_of(args[0], src)


def _is_batch_size_of(value: object, src: fx.Node) -> bool:
    """``value`` is ``src.size(0)``, ``src.shape[0]`` or ``src.size()[0]``."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size":
        return value.args[0] is src and tuple(value.args[1:]) == (0,)
    if value.op == "call_function" and value.target is operator.getitem and value.args[1] == 0:
        base = value.args[0]
        return isinstance(base, fx.Node) and _reads_metadata_only(base) and base.args[0] is src and (
            base.op == "call_function" or tuple(base.args[1:]) == ())
    return False


def _classify(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> str:
    """What ``node`` does to the channels of its input ``src``:
    'bn', 'act', 'pass', 'norm', 'pool', 'flatten', 'linear', 'grouped', or 'stop:<reason>'."""
    if node.op == "output":
        return "stop:is a model output"
    if node.op == "call_module":
        m = _module(gm, node)
        if isinstance(m, GrowNorm):
            return "norm"
        if isinstance(m, _BATCHNORMS):
            if not isinstance(m, SplitBatchNorm) and next(m.children(), None) is not None and not (
                    is_batchnorm_act(m) and all(isinstance(c, (*_ACTIVATIONS, *_PASS_MODULES)) for c in m.children())):
                return (f"stop:feeds {node.target} ({type(m).__name__}), a BatchNorm with layers inside it that "
                        "surgeon cannot widen through")
            return "bn"
        if isinstance(m, _ACTIVATIONS) or (isinstance(m, nn.PReLU) and m.num_parameters == 1):
            return "act"
        if isinstance(m, _PASS_MODULES):
            return "pass"
        if isinstance(m, _POOL_MODULES):
            return "pool"
        if isinstance(m, nn.Flatten):
            return "flatten" if m.start_dim == 1 and m.end_dim == -1 else f"stop:feeds {node.target} (a Flatten not from dim 1)"
        if isinstance(m, GroupWidened):
            return f"stop:feeds the grouped conv {node.target}, which was already grown"
        if is_grouped_conv(m):
            return "grouped"
        if isinstance(m, _CROSS_CHANNEL_NORMS):
            return (f"stop:feeds {node.target} ({type(m).__name__}), which normalizes across the channels "
                    "(old and new units would be mixed)")
        if isinstance(m, nn.MultiheadAttention):
            return f"stop:feeds the attention {node.target} (MultiheadAttention), which surgeon cannot widen through"
        if isinstance(m, nn.Sequential) and len(m) and is_linear_op(m[0]):
            return "linear"  # a block inserted by deep growth
        if is_linear_op(m):
            return "linear"
        return f"stop:feeds {node.target} ({type(m).__name__}), which surgeon cannot widen through"
    if not _only_tensor_arg(node, src):
        target = node.target
        what = _MIXING_FUNCTIONS.get(target) if node.op == "call_function" else None
        if what is None and node.op == "call_method" and target in ("add", "add_", "mul", "mul_", "sub"):
            what = "a residual add" if str(target).startswith("add") else "an elementwise op with another tensor"
        return f"stop:feeds {what or repr(node.name)} ({node.name})"
    if node.op == "call_function":
        if node.target in _ACT_FUNCTIONS:
            return "act"
        if node.target in _PASS_FUNCTIONS:
            return "pass"
        if node.target in _POOL_FUNCTIONS:
            return "pool"
        if node.target in _FLATTEN_FUNCTIONS:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start == 1 and len(node.args) <= 2 and "end_dim" not in node.kwargs:
                return "flatten"
            return f"stop:feeds {node.name}, a flatten not from dim 1"
    if node.op == "call_method":
        if node.target in _ACT_METHODS:
            return "act"
        if node.target in _FLATTEN_METHODS:
            if _is_batch_flatten(node, src):
                return "flatten"
            return f"stop:feeds {node.name}, a {node.target} surgeon cannot follow (write x.flatten(1) or x.view(x.size(0), -1))"
        if node.target == "mean":
            return "pool"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"stop:feeds {node.name} ({target}), which surgeon cannot widen through"


def _check_pool_or_flatten(kind: str, node: fx.Node, in_shape: tuple[int, ...]) -> str | None:
    """Shape check for ops between the chain and the consumer: pooling keeps dim 1 = C, flattening
    must be channel-major from dim 1. Returns a refusal reason or None."""
    out = shape_of(node)
    if out is None:
        return f"the shape after {node.name} is unknown"
    if kind == "pool":
        if len(out) < 2 or out[1] != in_shape[1]:
            return f"{node.name} does not keep channels on dim 1"
        return None
    spatial = 1
    for s in in_shape[2:]:
        spatial *= s
    if len(out) != 2 or out[0] != in_shape[0] or out[1] != in_shape[1] * spatial:
        return f"{node.name} reshapes the channels in a way surgeon cannot follow ({list(in_shape)} -> {list(out)})"
    return None


def find_site(gm: fx.GraphModule, layer: str) -> Site:
    """Analyse ``layer`` (a qualified module name). Shapes must have been propagated.

    Returns the site with ``consumers`` filled, or raises GrowthError saying why growth is
    ill-defined there (unknown name, not a Linear/Conv2d, a residual add downstream, ...) and which
    layers nearby can be grown instead.
    """
    try:
        return _analyse(gm, layer)
    except GrowthError as exc:
        raise GrowthError(f"{exc}; {suggest(gm, layer)}") from None


def uncalled_reason(gm: fx.GraphModule, name: str) -> str:
    """Why ``name`` names no module the forward calls: no such module, a block of layers (traced
    through), or a module the forward never uses."""
    # The model's own class names (the GraphModule turns traced-through blocks into plain Modules).
    known = {**{n: type(m).__name__ for n, m in gm.named_modules()}, **gm.meta.get("surgeon_all_modules", {})}
    if name not in known:
        return f"the model has no layer named '{name}'"
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    if any(c.startswith(name + ".") for c in called) or (name == "" and called):
        return f"'{name}' ({known[name]}) is a block of layers, not a Linear or Conv2d layer"
    owner = next((c for c in called if name.startswith(c + ".")), None)
    if owner is not None:  # e.g. nn.MultiheadAttention's out_proj: the attention is one op
        return (f"'{name}' ({known[name]}) is inside {owner} ({known.get(owner, '?')}), which the forward calls as "
                "one op; surgeon cannot grow layers inside it")
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    if any(t.startswith(name + ".") for t in read):  # e.g. Swin's attention passes qkv.weight to a function
        return (f"'{name}' ({known[name]}) is not called as a layer: the forward passes its weights to other "
                "code (attention), which surgeon cannot widen through")
    return f"'{name}' ({known[name]}) is not used by the model's forward"


def _grouped_refusal(gm: fx.GraphModule, layer: str, node: fx.Node, conv: nn.Conv2d) -> str:
    """Why a grouped conv is no growth site, and what to grow instead: the layer that feeds it."""
    w, g = conv.in_channels // conv.groups, conv.groups
    if w == 1:
        head = (f"'{layer}' is a depthwise conv (groups={g}), which grows with the layer that feeds it (one new "
                "filter per new channel)")
    else:
        head = (f"'{layer}' is a grouped conv (groups={g}, {w} input channels per group), which grows only by whole "
                "groups, with the layer that feeds it")
    cur = node.args[0] if node.args else None
    while isinstance(cur, fx.Node) and cur.op in ("call_module", "call_function", "call_method"):
        m = _module(gm, cur)
        if m is not None and is_growable_layer(m):
            producer = str(cur.target)
            try:
                _analyse(gm, producer)
            except GrowthError as exc:
                return f"{head}, and '{producer}', which feeds it, cannot grow either ({_reason(str(exc))})"
            if w == 1:
                return f"{head}: widen '{producer}' instead"
            return (f"{head}: widen '{producer}' by {w}, {2 * w}, {3 * w} or another multiple of {w} units and "
                    f"'{layer}' gains one group of {conv.out_channels // g} output channels per {w} units")
        if len(cur.all_input_nodes) != 1 or not cur.args or cur.args[0] is not cur.all_input_nodes[0]:
            break
        cur = cur.all_input_nodes[0]
    return f"{head}, and no growable layer feeds it"


def _analyse(gm: fx.GraphModule, layer: str, *, grouped: bool = False) -> Site:
    """The site of ``layer``; ``grouped``: the grouped conv fed by a layer being analysed."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == layer]
    if not nodes:
        raise GrowthError(uncalled_reason(gm, layer))
    module = gm.get_submodule(layer)
    if isinstance(module, GroupWidened):
        module = module.old
    if not grouped and is_grouped_conv(module) and len(nodes) == 1:
        raise GrowthError(_grouped_refusal(gm, layer, nodes[0], module))
    if not grouped and isinstance(module, nn.Conv2d) and module.groups != 1:
        raise GrowthError(f"'{layer}' is a grouped/depthwise conv (groups={module.groups}), whose channels cannot be grown independently")
    if not grouped and not is_growable_layer(module):
        raise GrowthError(f"'{layer}' is a {type(module).__name__}, not a Linear or Conv2d layer")
    if len(nodes) > 1:
        raise GrowthError(f"'{layer}' is called {len(nodes)} times in the forward (shared weights); growth needs a layer used once")
    shared = _calls(gm)
    node = nodes[0]
    if not _depends_on_input(node):
        raise GrowthError(f"'{layer}' reads no image-dependent input (a constant table, such as Swin-V2's "
                          "position-bias MLP): its units would add no capacity for the new task")
    shape = shape_of(node)
    axis = _channel_axis(module, shape)
    if shape is None or axis is None:
        raise GrowthError(f"'{layer}' produces a tensor of shape {shape}; surgeon grows layers whose output is "
                          "[N, C], [N, C, H, W] or, for a Linear, [N, ..., C]")
    site = Site(layer=layer, node=node, channels=shape[axis], rank=len(shape), axis=axis, calls=shared)

    # 1. The chain: single-user elementwise ops right after the layer.
    cur = node
    site.norm_after = node
    while len(value_users := [u for u in cur.users if not _reads_metadata_only(u)]) == 1:
        nxt = value_users[0]
        kind = _classify(gm, nxt, cur)
        if kind not in ("bn", "act", "pass", "norm"):
            break
        if kind == "bn" and axis == -1:
            raise GrowthError(f"cannot grow '{layer}': its output feeds {nxt.target}, a BatchNorm over dim 1, but "
                              f"the units of '{layer}' are on the last dim")
        site.chain.append(nxt)
        if kind == "bn":
            if shared.get(str(nxt.target), 1) > 1:
                raise GrowthError(f"cannot grow '{layer}': its output feeds {nxt.target}, a BatchNorm called "
                                  f"{shared[str(nxt.target)]} times in the forward (shared statistics)")
            site.batchnorms.append(str(nxt.target))
        if kind == "norm":
            site.grown_norm = str(nxt.target)
        if kind != "pass":
            site.norm_after = nxt
        cur = nxt
    site.tail = cur

    # 2. The region from the tail to the linear consumers.
    _walk_region(gm, site, cur, shape_of(cur) or shape, positions=1, offset=0, seen=set())
    if not site.consumers:
        raise GrowthError(f"'{layer}' feeds no linear layer")
    grouped_consumers = [c for c in site.consumers if is_grouped_conv(gm.get_submodule(c.name))]
    if grouped_consumers:
        conv = grouped_consumers[0].name
        if grouped:
            raise GrowthError(f"cannot grow '{layer}': its output feeds another grouped conv, {conv} (surgeon grows "
                              "through one grouped conv)")
        if len(site.consumers) > 1:
            others = ", ".join(c.name for c in site.consumers if c.name != conv)
            raise GrowthError(f"cannot grow '{layer}': its output feeds the grouped conv {conv} and also {others}; "
                              "growth through a grouped conv needs it to be the only consumer")
        try:
            site.grouped = _analyse(gm, conv, grouped=True)
            m = gm.get_submodule(conv)
            site.group_width = m.in_channels // m.groups
        except GrowthError as exc:
            why = _reason(str(exc))
            raise GrowthError(f"cannot grow '{layer}': it feeds the grouped conv {conv}, which grows with it, but "
                              f"{conv}'s output {why.removeprefix('its output ')}") from None
    for consumer in site.consumers:  # its input grows for every call, not only the one reading the layer
        if shared.get(consumer.name, 1) > 1:
            raise GrowthError(f"cannot grow '{layer}': its output feeds {consumer.name}, which is called "
                              f"{shared[consumer.name]} times in the forward (shared weights)")
    return site


def _depends_on_input(node: fx.Node) -> bool:
    """Some placeholder (the model input) is an ancestor of ``node``."""
    seen, stack = set(), [node]
    while stack:
        cur = stack.pop()
        if cur.op == "placeholder":
            return True
        for a in cur.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def _channel_axis(module: nn.Module, shape: tuple[int, ...] | None) -> int | None:
    """Where the layer's units are in its output: dim 1 for a Conv2d ``[N, C, H, W]`` or a Linear
    ``[N, C]``; the last dim for a Linear on tokens or channels-last maps (rank >= 3); None when the
    output has another form."""
    if shape is None:
        return None
    base = module.old if isinstance(module, Widened) else module
    if isinstance(base, nn.Linear):
        return 1 if len(shape) == 2 else -1 if len(shape) >= 3 else None
    return 1 if len(shape) == 4 else None


def _reads_last_dim(m: nn.Module | None) -> bool:
    """A consumer that reads the last dim: a Linear (grown or not) or a deep block starting with one."""
    if isinstance(m, nn.Sequential) and len(m):
        m = m[0]
    if isinstance(m, Widened):
        m = m.old
    return isinstance(m, nn.Linear)


def _mean_dims(node: fx.Node, rank: int) -> set[int] | None:
    """The dims ``x.mean(dims)`` reduces (non-negative), or None when they are not given as constants."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    return {d % rank for d in dims}


def _channels_last_problem(gm: fx.GraphModule, kind: str, node: fx.Node, src_shape: tuple[int, ...]) -> str | None:
    """Why ``node`` cannot pass or consume units that sit on the last dim of ``src_shape`` (rank >= 3),
    or None. Elementwise ops pass them, a Linear reads them, a mean over other dims keeps them last."""
    if kind in ("act", "pass", "norm"):
        return None
    if kind == "bn":
        return f"its output feeds {node.target}, a BatchNorm over dim 1, but the units are on the last dim"
    if kind == "linear":
        if _reads_last_dim(_module(gm, node)):
            return None
        return f"its output feeds {node.target}, which reads dim 1, but the units are on the last dim"
    if kind == "pool" and node.op == "call_method" and node.target == "mean":
        dims = _mean_dims(node, len(src_shape))
        if dims is not None and len(src_shape) - 1 not in dims and 0 not in dims:
            return None
        return f"{node.name} averages over the last dim (the units) or the batch; average over positions only"
    if kind == "pool":
        return f"{node.name} pools the last two dims, but the units are on the last dim"
    return f"{node.name} reshapes a tensor whose units are on the last dim (they would mix with positions)"


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _FLATTEN_METHODS) or (
        node.op == "call_function" and node.target in (*_FLATTEN_FUNCTIONS, torch.reshape))


def _calls(gm: fx.GraphModule) -> dict[str, int]:
    """How many nodes call each module."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    return counts


_CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


def concat_args(node: fx.Node) -> tuple[list, object] | None:
    """``(tensors, dim)`` of a ``torch.cat`` call, or None for any other node."""
    if node.op != "call_function" or node.target not in _CONCAT_FUNCTIONS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    return (list(tensors), dim) if isinstance(tensors, (list, tuple)) else None


def _follow_concat(gm: fx.GraphModule, site: Site, cat: fx.Node, src: fx.Node, src_shape: tuple[int, ...],
                   positions: int, offset: int, seen: set[fx.Node]) -> None:
    """``src`` (the layer's channels at ``offset``) is one of the tensors ``cat`` concatenates: its old
    channels keep their place, the new ones go to the end, and the walk goes on from the concat."""
    tensors, dim = concat_args(cat)  # type: ignore[misc]
    where = f"its output feeds the concat {cat.name}"
    if site.axis != 1 or positions != 1:
        raise GrowthError(f"cannot grow '{site.layer}': {where} in a form surgeon cannot follow "
                          "(the units are not on dim 1 there)")
    if not isinstance(dim, int) or dim % len(src_shape) != 1:
        raise GrowthError(f"cannot grow '{site.layer}': {where} on dim {dim}, not on the channels (dim 1)")
    if tensors.count(src) != 1 or cat in seen:
        raise GrowthError(f"cannot grow '{site.layer}': {where} more than once (surgeon grows channels that "
                          "enter a concat once)")
    widths = [shape_of(t)[1] if isinstance(t, fx.Node) and shape_of(t) else None for t in tensors]
    out = shape_of(cat)
    if None in widths or out is None:
        raise GrowthError(f"cannot grow '{site.layer}': the shapes around the concat {cat.name} are unknown")
    index = tensors.index(src)
    seen.add(cat)
    site.concats.append(ConcatArg(cat, index, src_shape[1]))
    _walk_region(gm, site, cat, out, 1, offset + sum(widths[:index]), seen)  # type: ignore[arg-type]


def _walk_region(gm: fx.GraphModule, site: Site, src: fx.Node, src_shape: tuple[int, ...], positions: int,
                 offset: int, seen: set[fx.Node]) -> None:
    """Follow the layer's channels from ``src`` (shape ``src_shape``, the channels at ``offset`` of
    dim 1, each spanning ``positions`` values after a flatten) to the linear ops that read them."""
    for user in list(src.users):
        if _reads_metadata_only(user):
            continue
        if concat_args(user) is not None:
            _follow_concat(gm, site, user, src, src_shape, positions, offset, seen)
            continue
        excite = _excitation(gm, user, src, src_shape) if site.axis == 1 else None
        if excite is not None:  # x * gate(x): the excite grows a gate per new channel, the product passes them
            site.excites.append(excite)
            _walk_region(gm, site, user, src_shape, positions, offset, seen)
            continue
        kind = _classify(gm, user, src)
        channels_last = site.axis == -1 and len(src_shape) >= 3  # units on the last dim ([N, C] again at rank 2)
        if channels_last and _is_reshape(user):
            kind = "flatten"  # any reshape of a channels-last tensor: refused below, saying why
        if kind.startswith("stop:"):
            raise GrowthError(f"cannot grow '{site.layer}': its output {kind[5:]}")
        if channels_last:
            problem = _channels_last_problem(gm, kind, user, src_shape)
            if problem:
                raise GrowthError(f"cannot grow '{site.layer}': {problem}")
            if kind == "linear":
                site.consumers.append(Consumer(str(user.target), user, positions, offset, src_shape[-1]))
            else:
                _walk_region(gm, site, user, shape_of(user) or src_shape, positions, offset, seen)
            continue
        if kind == "grouped":
            if channels_last or len(src_shape) != 4 or positions != 1 or src_shape[1] != site.channels:
                raise GrowthError(f"cannot grow '{site.layer}': its output reaches the grouped conv {user.target} "
                                  "in a form surgeon cannot follow")
            site.consumers.append(Consumer(str(user.target), user, positions, offset, src_shape[1]))
            continue
        if kind == "linear":
            m = _module(gm, user)
            if isinstance(m, nn.Linear) and len(src_shape) != 2:
                raise GrowthError(f"cannot grow '{site.layer}': {user.target} applies a Linear to a rank-{len(src_shape)} tensor")
            # After a flatten, dim 1 holds channels × positions.
            site.consumers.append(Consumer(str(user.target), user, positions, offset, src_shape[1] // positions))
            continue
        if kind == "bn":  # past the chain (after a pool, a concat): the BatchNorm gains the new channels too
            name = str(user.target)
            if positions != 1:
                raise GrowthError(f"cannot grow '{site.layer}': its output reaches the BatchNorm {name} after a "
                                  "flatten, where each unit spans several features")
            if site.calls.get(name, 1) > 1:
                raise GrowthError(f"cannot grow '{site.layer}': its output reaches {name}, a BatchNorm called "
                                  f"{site.calls[name]} times in the forward (shared statistics)")
            if user in seen:
                raise GrowthError(f"cannot grow '{site.layer}': its output reaches {name} along two paths")
            seen.add(user)
            site.region_batchnorms.append((name, offset))
            _walk_region(gm, site, user, shape_of(user) or src_shape, positions, offset, seen)
            continue
        if kind in ("pool", "flatten"):
            reason = _check_pool_or_flatten(kind, user, src_shape)
            if reason:
                raise GrowthError(f"cannot grow '{site.layer}': {reason}")
            out = shape_of(user)
            assert out is not None
            if kind == "flatten":
                positions *= out[1] // src_shape[1]
            _walk_region(gm, site, user, out, positions, offset, seen)
            continue
        _walk_region(gm, site, user, shape_of(user) or src_shape, positions, offset, seen)


_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_PRODUCTS = {operator.mul, torch.mul}


def _is_gate_act(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An elementwise activation on one tensor (the gate's sigmoid, the squeeze's ReLU/SiLU)."""
    if node.op == "call_module":
        return isinstance(_module(gm, node), _ACTIVATIONS)
    if len(node.all_input_nodes) != 1:
        return False
    return (node.op == "call_function" and node.target in (*_ACT_FUNCTIONS, *_GATE_FUNCTIONS)) or (
        node.op == "call_method" and node.target in ("sigmoid", "relu", "relu_"))


def _excitation(gm: fx.GraphModule, mul: fx.Node, src: fx.Node, src_shape: tuple[int, ...]) -> str | None:
    """The excite layer of a squeeze-excitation ``src * gate`` (either order), or None when ``mul``
    is no such product. The gate must be act(excite(act(squeeze(pool(src))))) with every
    intermediate read only on that path, the excite a Conv2d/Linear whose outputs are per channel
    of ``src``, and the product of ``src``'s shape (the gate broadcast over positions)."""
    is_mul = (mul.op == "call_function" and mul.target in _PRODUCTS) or (mul.op == "call_method" and mul.target == "mul")
    if not is_mul or len(mul.args) != 2 or mul.kwargs or shape_of(mul) != src_shape:
        return None
    a, b = mul.args
    gate = b if a is src else a if b is src else None
    if not isinstance(gate, fx.Node) or gate is src:
        return None
    cur, excite = gate, None
    while isinstance(cur, fx.Node) and len(cur.users) == 1:  # back from the gate to the excite
        if cur.op == "call_module" and is_linear_op(_module(gm, cur)) and not isinstance(_module(gm, cur), Widened):
            excite = cur
            break
        if not _is_gate_act(gm, cur):
            return None
        cur = cur.all_input_nodes[0]
    if excite is None or not excite.args:
        return None
    m = _module(gm, excite)
    out = shape_of(excite)
    if out is None or len(out) != len(src_shape) or out[1] != src_shape[1] or not is_growable_layer(m):
        return None
    cur = excite.args[0]
    squeezed = False
    while isinstance(cur, fx.Node) and cur is not src:  # back to src through act, squeeze, pooling
        if len(cur.users) != 1 or len(cur.all_input_nodes) != 1 or cur.args[0] is not cur.all_input_nodes[0]:
            return None
        mod = _module(gm, cur)
        if not squeezed and mod is not None and is_linear_op(mod) and not isinstance(mod, Widened):
            squeezed = True
        elif not (_is_gate_act(gm, cur) or _classify(gm, cur, cur.all_input_nodes[0]) in ("pool", "flatten", "bn")):
            return None
        cur = cur.all_input_nodes[0]
    return str(excite.target) if squeezed and cur is src else None


def head_name(gm: fx.GraphModule) -> str:
    """The classifier head: the linear op whose output is the model output (through pass-through
    ops, activations, pooling and flattening: SqueezeNet's head is conv → ReLU → pool → flatten)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    cur = out.args[0]
    while isinstance(cur, fx.Node):
        if cur.op == "call_module":
            m = _module(gm, cur)
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, Widened):
                return str(cur.target)
            if not isinstance(m, (*_PASS_MODULES, *_ACTIVATIONS, nn.Flatten, *_POOL_MODULES)):
                break
        elif not (cur.op in ("call_function", "call_method") and len(cur.all_input_nodes) == 1):
            break
        cur = cur.all_input_nodes[0] if cur.all_input_nodes else None
    raise GrowthError("cannot find the classifier head (a Linear/Conv2d whose output is the model output); pass --head NAME")


def head_problem(gm: fx.GraphModule, name: str) -> str | None:
    """Why ``name`` cannot be replaced by a head of another width, or None. Its output must reach
    only the model output: through activations, dropout, pooling, batch flattening and functions of
    that one tensor (softmax, log_softmax, squeeze)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == name]
    if len(nodes) != 1:
        return f"is called {len(nodes)} times in the forward" if nodes else "is not used by the model's forward"
    stack = [nodes[0]]
    while stack:
        src = stack.pop()
        for user in src.users:
            if user.op == "output" or _reads_metadata_only(user):
                continue
            kind = _classify(gm, user, src)
            reshapes = (user.op == "call_method" and user.target in _FLATTEN_METHODS) or (
                user.op == "call_function" and user.target in _FLATTEN_FUNCTIONS)
            plain = user.op in ("call_function", "call_method") and _only_tensor_arg(user, src) and not reshapes
            if kind in ("act", "pass", "pool", "flatten") or (kind.startswith("stop:") and plain):
                stack.append(user)
                continue
            return kind[5:] if kind.startswith("stop:") else f"feeds {user.target} ({kind})"
    return None


@dataclass
class LayerInfo:
    name: str
    kind: str                   # "Linear" / "Conv2d"
    in_channels: int
    out_channels: int
    kernel: str
    out_shape: tuple[int, ...] | None
    is_head: bool
    wide: str                   # "ok" or the reason it cannot be widened
    deep: str                   # "ok" or the reason nothing can be inserted after it


def layer_table(gm: fx.GraphModule) -> list[LayerInfo]:
    """Every Linear/Conv2d the forward calls, with whether it can be widened or deepened after."""
    from surgeon.grow.modules import in_channels, out_channels

    try:
        head = head_name(gm)
    except GrowthError:
        head = None
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(str(node.target))
        if not isinstance(m, (nn.Linear, nn.Conv2d, Widened)):
            continue
        name = str(node.target)
        base = m.old if isinstance(m, Widened) else m
        kernel = "x".join(str(k) for k in base.kernel_size) if isinstance(base, nn.Conv2d) else "-"
        wide = deep = "ok"
        if name == head:
            wide = deep = "classifier head (replaced for the new task)"
        else:
            try:
                site = _analyse(gm, name)
                if site.grown_norm or isinstance(m, Widened):
                    wide = "already widened"
            except GrowthError as exc:
                wide = deep = _reason(str(exc))
        kind = "Conv2d" if isinstance(base, nn.Conv2d) else "Linear"
        rows.append(LayerInfo(name, kind, in_channels(m), out_channels(m), kernel,
                              shape_of(node), name == head, wide, deep))
    return rows


def _reason(msg: str) -> str:
    return msg.split(": ", 1)[1] if msg.startswith("cannot grow") else msg


def suggest(gm: fx.GraphModule, near: str | None = None, limit: int = 6) -> str:
    """'growable layers: a, b, c' — the growable layers closest to ``near`` in graph order."""
    try:
        head = head_name(gm)
    except GrowthError:
        head = None
    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
             and is_growable_layer(gm.get_submodule(str(n.target))) and str(n.target) != head]
    ok = []
    for name in names:
        try:
            _analyse(gm, name)
            ok.append(name)
        except GrowthError:
            pass
    if not ok:
        return "no layer of this model can be grown"
    if near in names:
        idx = names.index(near)
        ok.sort(key=lambda n: abs(names.index(n) - idx))
        shown = sorted(ok[:limit], key=names.index)
    else:
        shown = ok[-limit:]
    more = "" if len(ok) <= len(shown) else f" (and {len(ok) - len(shown)} more: see `surgeon layers`)"
    return "growable layers: " + ", ".join(shown) + more
