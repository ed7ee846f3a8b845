"""The edits: replace the head, widen a layer, insert a block after it.

Each edit works on a traced GraphModule using the analysis in :mod:`surgeon.grow.analysis`, keeps
every pretrained tensor, and leaves the graph runnable (shapes are propagated again after it).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.errors import GrowthError, first_line
from surgeon.grow import analysis
from surgeon.grow import init as winit
from surgeon.grow.analysis import (Site, find_site, head_name, head_problem, propagate_shapes, shape_of, suggest,
                                   uncalled_reason)
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.modules import ExtendedConv2d, ExtendedLinear, GroupWidened, SplitBatchNorm, Widened, in_channels
from surgeon.grow.recipe import GrowStep, HeadStep, Step


@dataclass
class GrowthState:
    """What the recipe replayed so far has made: the head and the modules that are new as a whole."""

    input_size: int
    head: str | None = None
    fresh: set[str] = field(default_factory=set)   # modules created from scratch (head, deep blocks)
    norms: list[str] = field(default_factory=list)  # GrowNorm modules, in recipe order
    grown: list[str] = field(default_factory=list)  # layers widened or deepened after, in order


def apply_steps(gm: fx.GraphModule, steps: list[Step], state: GrowthState) -> GrowthState:
    """Replay ``steps`` on ``gm`` in place."""
    if not any(n.meta.get("tensor_meta") for n in gm.graph.nodes):
        propagate_shapes(gm, state.input_size)
    ref = next((p for p in gm.parameters() if p.is_floating_point()), None)
    for step in steps:
        undo = _Snapshot(gm, state)
        try:
            if isinstance(step, HeadStep):
                replace_head(gm, step, state)
            elif step.kind == "wide":
                widen(gm, step, state)
            else:
                deepen(gm, step, state)
            if ref is not None:  # new modules are created on the CPU in fp32: match the model
                gm.to(device=ref.device, dtype=ref.dtype)
            gm.graph.lint()
            gm.recompile()
            try:
                propagate_shapes(gm, state.input_size)
            except GrowthError as exc:  # the analysis let through an edit that breaks the model
                inner = exc.__cause__ or exc
                why = first_line(inner.__cause__ or inner)[:300]
                raise GrowthError(f"{_describe(step)} gave a model that does not run ({why}); the model is left "
                                  "as it was; this is a surgeon bug, please report it") from exc
        except BaseException:
            undo.restore()  # a refused (or failed) step leaves the model as it was
            raise
    return state


def _describe(step: Step) -> str:
    if isinstance(step, HeadStep):
        return f"replacing the head {step.layer or ''}".rstrip()
    return f"{'widening' if step.kind == 'wide' else 'deepening after'} '{step.layer}' by {step.units} units"


class _Snapshot:
    """What a step can change, kept by reference (no tensor is copied): the graph, every module's
    children and the growth state. The edits replace modules and create new ones, never write into a
    pretrained tensor, so restoring the references restores the model."""

    def __init__(self, gm: fx.GraphModule, state: GrowthState) -> None:
        self.gm, self.state = gm, state
        self.graph = copy.deepcopy(gm.graph)  # nodes with their meta (shapes), the code generator
        self.children = [(m, dict(m._modules)) for m in gm.modules()]
        self.fields = {k: (set(v) if isinstance(v, set) else list(v) if isinstance(v, list) else v)
                       for k, v in vars(state).items()}

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        self.gm.graph = self.graph
        self.gm.recompile()
        for k, v in self.fields.items():
            setattr(self.state, k, v)


def _unique_name(gm: fx.GraphModule, base: str) -> str:
    existing = dict(gm.named_modules())
    name, i = base, 1
    while name in existing:
        i += 1
        name = f"{base}{i}"
    return name


def _default_head(old: nn.Module, in_ch: int, classes: int) -> nn.Module:
    """A freshly initialised layer like ``old`` with new input/output widths."""
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(in_ch, classes, old.kernel_size, stride=old.stride, padding=old.padding,
                         dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode)
    return nn.Linear(in_ch, classes, bias=getattr(old, "bias", None) is not None)


def replace_head(gm: fx.GraphModule, step: HeadStep, state: GrowthState) -> None:
    name = step.layer or head_name(gm)
    if not any(n.op == "call_module" and str(n.target) == name for n in gm.graph.nodes):
        raise GrowthError(f"cannot use '{name}' as the head: {uncalled_reason(gm, name)}")
    old = gm.get_submodule(name)
    if not isinstance(old, (nn.Linear, nn.Conv2d)) or isinstance(old, Widened):
        raise GrowthError(f"the head '{name}' is a {type(old).__name__}; surgeon replaces a Linear or Conv2d head")
    problem = head_problem(gm, name)
    if problem:
        raise GrowthError(f"'{name}' cannot be the classifier head: its output {problem}, but a new head's output "
                          "(one per class) must be the model's output; pass --head with the last Linear/Conv2d")
    gm.set_submodule(name, _default_head(old, in_channels(old), step.classes))
    state.head = name
    state.fresh.add(name)


def _check_not_head(gm: fx.GraphModule, layer: str, state: GrowthState) -> None:
    if layer == state.head:
        raise GrowthError(f"'{layer}' is the classifier head, which is replaced for the new task; "
                          f"grow a layer that feeds it; {suggest(gm, layer)}")


def _full_weight(m: nn.Module) -> torch.Tensor:
    return (m.full_weight() if isinstance(m, (ExtendedLinear, ExtendedConv2d)) else m.weight).detach()


def _extend_input(m: nn.Module, units: int, positions: int, init: str,
                  mapping: torch.Tensor | None, shares: tuple[torch.Tensor, torch.Tensor] | None,
                  fresh: bool) -> nn.Module:
    """``m`` reads ``units`` × ``positions`` more inputs at the end. Fresh modules stay plain."""
    if isinstance(m, Widened):
        m.old = _extend_input(m.old, units, positions, init, mapping, shares, fresh)
        m.new = _extend_input(m.new, units, positions, init, mapping, shares, True)
        return m
    if isinstance(m, nn.Sequential):  # a deep block: only its first layer reads the input
        m[0] = _extend_input(m[0], units, positions, init, mapping, shares, True)
        return m
    full, extra = winit.extra_columns(_full_weight(m), units, positions, init, mapping, shares)
    if fresh:  # one plain tensor: nothing pretrained to keep apart
        plain = _default_head(m, full.shape[1] + extra.shape[1], m.weight.shape[0])
        with torch.no_grad():
            plain.weight.copy_(torch.cat([full, extra], dim=1))
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        return plain
    grown = ExtendedLinear(m, extra.shape[1]) if isinstance(m, nn.Linear) else ExtendedConv2d(m, extra.shape[1])
    with torch.no_grad():
        n_old = grown.weight.shape[1]
        grown.weight.copy_(full[:, :n_old])
        grown.weight_extra.copy_(torch.cat([full[:, n_old:], extra], dim=1))
    return grown


def _new_branch(m: nn.Module, units: int, init: str, mapping: torch.Tensor | None) -> nn.Module:
    """The new units of a widened layer: same input and hyper-parameters as ``m``."""
    if isinstance(m, nn.Linear):
        new: nn.Module = nn.Linear(m.in_features, units, bias=m.bias is not None)
    else:
        new = nn.Conv2d(m.in_channels, units, m.kernel_size, stride=m.stride, padding=m.padding,
                        dilation=m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode)
    new = new.to(dtype=m.weight.dtype)
    if init == "net2net":
        assert mapping is not None
        with torch.no_grad():
            new.weight.copy_(_full_weight(m)[mapping])
            if m.bias is not None:
                new.bias.copy_(m.bias.detach()[mapping])
    return new


def _bn_tensor(bn: nn.Module, name: str) -> torch.Tensor | None:
    """``weight``/``bias``/``running_mean``/``running_var`` over all channels of a BatchNorm, also of
    one split by earlier growth (a BatchNorm past a concat that two grown branches enter)."""
    if isinstance(bn, SplitBatchNorm):
        old, new = _bn_tensor(bn.old, name), _bn_tensor(bn.new, name)
        return None if old is None or new is None else torch.cat([old, new])
    value = getattr(bn, name)
    return None if value is None else value.detach()


def _new_batchnorm(old: nn.Module, units: int, mapping: torch.Tensor | None) -> nn.Module:
    template = old
    while isinstance(template, SplitBatchNorm):
        template = template.old
    cls = type(template)
    if analysis.is_batchnorm_act(template):  # its activation runs after the split (_move_activation_out)
        cls = nn.BatchNorm2d if isinstance(template, nn.BatchNorm2d) else nn.BatchNorm1d
    new = cls(units, eps=template.eps, momentum=template.momentum, affine=template.affine,
              track_running_stats=template.track_running_stats)
    if mapping is not None:  # net2net copies the statistics and affine params of the source channels
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                src, dst = _bn_tensor(old, name), getattr(new, name)
                if src is not None and dst is not None:
                    dst.copy_(src[mapping])
    return new


def _insert_after(gm: fx.GraphModule, anchor: fx.Node, name: str) -> fx.Node:
    with gm.graph.inserting_after(anchor):
        node = gm.graph.call_module(name, (anchor,))
    anchor.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return node


def widen(gm: fx.GraphModule, step: GrowStep, state: GrowthState) -> Site:
    _check_not_head(gm, step.layer, state)
    site = find_site(gm, step.layer)
    layer = gm.get_submodule(site.layer)
    if isinstance(layer, Widened) or site.grown_norm:
        raise GrowthError(f"'{site.layer}' is already widened; widen it once with the total number of units")
    k, c = step.units, site.channels
    if site.grouped is not None:
        return _widen_into_grouped(gm, site, layer, step, state)
    mapping = winit.copy_mapping(c, k) if step.init == "net2net" else None
    shares = winit.split_shares(c, mapping) if mapping is not None else None

    gm.set_submodule(site.layer, Widened(layer, _new_branch(layer, k, step.init, mapping), dim=site.axis))
    _grow_region(gm, site, k, step, state, mapping, shares)
    _add_norm(gm, site, c, k, step, state)
    _append_to_concats(gm, site)
    state.grown.append(site.layer)
    return site


def _grow_region(gm: fx.GraphModule, site: Site, k: int, step: GrowStep, state: GrowthState,
                 mapping: torch.Tensor | None, shares: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Everything past the widened layer that gains the ``k`` new channels: the chain's and the
    region's BatchNorms, squeeze-excitation gates, and the consumers' input columns."""
    _split_batchnorms(gm, site, k, mapping)
    _widen_excites(gm, site, k, step.init, mapping)
    _extend_consumers(gm, site, k, step, state, mapping, shares)


def _split_batchnorms(gm: fx.GraphModule, site: Site, k: int, mapping: torch.Tensor | None) -> None:
    """The chain's BatchNorms read exactly the layer's channels; a BatchNorm past a concat reads them
    at an offset (net2net copies the statistics of the channels the new ones copy, at that offset)."""
    for bn_name, offset in [(b, 0) for b in site.batchnorms] + site.region_batchnorms:
        bn = gm.get_submodule(bn_name)
        src = None if mapping is None else mapping + offset
        with_act = analysis.is_batchnorm_act(bn)
        gm.set_submodule(bn_name, SplitBatchNorm(bn, _new_batchnorm(bn, k, src), bn_only=with_act))
        if with_act:
            _move_activation_out(gm, site, bn_name, bn)


def _move_activation_out(gm: fx.GraphModule, site: Site, bn_name: str, bn: nn.Module) -> None:
    """A BatchNorm with its own dropout and activation (timm's BatchNormAct2d), now split: the two
    run after the split BatchNorm as a module of their own (copies: they hold no weights), and a
    GrowNorm that was to follow the BatchNorm follows them."""
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == bn_name)
    name = _unique_name(gm, bn_name.replace(".", "_") + "_act")
    gm.add_submodule(name, nn.Sequential(copy.deepcopy(bn.drop), copy.deepcopy(bn.act)))
    act = _insert_after(gm, node, name)
    if site.norm_after is node:
        site.norm_after = act


def _append_to_concats(gm: fx.GraphModule, site: Site) -> None:
    """Each concat the grown tensor enters keeps its old channels where they were and gets the new
    ones at its end: ``cat([a, t, b])`` becomes ``cat([a, t[:, :C], b, t[:, C:]])``. Runs after the
    GrowNorm is in place, so the slices read the normalized tensor; a tensor already last needs no
    slices."""
    for arg in site.concats:
        cat = arg.node
        tensors, _ = analysis.concat_args(cat)  # type: ignore[misc]
        if arg.index == len(tensors) - 1:
            continue
        grown = tensors[arg.index]
        with gm.graph.inserting_before(cat):
            old = gm.graph.call_function(operator.getitem, (grown, (slice(None), slice(None, arg.width))))
            new = gm.graph.call_function(operator.getitem, (grown, (slice(None), slice(arg.width, None))))
        tensors[arg.index] = old
        tensors.append(new)
        if cat.args:
            cat.args = (tensors, *cat.args[1:])
        else:
            cat.kwargs = {**cat.kwargs, "tensors": tensors}


def _widen_excites(gm: fx.GraphModule, site: Site, k: int, init: str, mapping: torch.Tensor | None) -> None:
    """Each squeeze-excitation on the way gains one gate per new channel: its excite layer gains k
    outputs (net2net: copies of the source channels' gates)."""
    for name in site.excites:
        excite = gm.get_submodule(name)
        gm.set_submodule(name, Widened(excite, _new_branch(excite, k, init, mapping), dim=1))


def _extend_consumers(gm: fx.GraphModule, site: Site, k: int, step: GrowStep, state: GrowthState,
                      mapping: torch.Tensor | None, shares: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    for consumer in site.consumers:
        m = gm.get_submodule(consumer.name)
        fresh = consumer.name in state.fresh
        at, split = _at_offset(mapping, shares, consumer.offset, consumer.width)
        gm.set_submodule(consumer.name, _extend_input(m, k, consumer.positions, step.init, at, split, fresh))


def _at_offset(mapping: torch.Tensor | None, shares: tuple[torch.Tensor, torch.Tensor] | None, offset: int,
               width: int) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """net2net's mapping and shares for a consumer that reads ``width`` channels, the layer's at
    ``offset`` (through a concat): channels of the other branches keep their columns whole."""
    if mapping is None or shares is None:
        return mapping, shares
    old_share, new_share = shares
    if offset == 0 and width == len(old_share):
        return mapping, shares
    full = torch.ones(width, device="cpu")
    full[offset: offset + len(old_share)] = old_share
    return mapping + offset, (full, new_share)


def _add_norm(gm: fx.GraphModule, site: Site, c: int, k: int, step: GrowStep, state: GrowthState,
              named: str | None = None) -> None:
    if step.norm:
        name = _unique_name(gm, (named or site.layer).replace(".", "_") + "_norm")
        gm.add_submodule(name, GrowNorm((c, k), eps=step.eps, gamma_init=step.gamma_init, role="wide", axis=site.axis))
        _insert_after(gm, site.norm_after, name)
        state.norms.append(name)


def _widen_into_grouped(gm: fx.GraphModule, site: Site, layer: nn.Module, step: GrowStep, state: GrowthState) -> Site:
    """Widen ``layer`` that feeds a grouped conv: its ``k = m·w`` new channels (w: the grouped conv's
    input channels per group) are the input of ``m`` new groups of the grouped conv, whose
    ``m·(out/g)`` new output channels go through its BatchNorm/activation to its consumers (new input
    columns). The new groups read only new channels, so old and new first meet in those consumers:
    the one GrowNorm goes after the grouped conv's chain. net2net copies whole groups: new group j
    copies old group src[j] (the layer's channels feeding it, their BatchNorm, the group's filters),
    and the consumers' columns for the group's outputs are split between it and its copies."""
    sub = site.grouped
    assert sub is not None
    conv = gm.get_submodule(sub.layer)
    k, w, g = step.units, site.group_width, conv.groups
    if k % w:
        raise GrowthError(
            f"cannot grow '{site.layer}' by {k} units: its output feeds the grouped conv {sub.layer} (groups={g}, "
            f"{w} input channels per group), which grows by whole groups; use --units {w}, {2 * w}, {3 * w} or "
            f"another multiple of {w}")
    m, w_out = k // w, conv.out_channels // g
    k2 = m * w_out
    mapping = mapping2 = shares2 = None
    if step.init == "net2net":
        # Index bookkeeping on the CPU whatever the default device (a checkpoint rebuild runs under meta).
        src = winit.copy_mapping(g, m)
        mapping = (src[:, None] * w + torch.arange(w, device="cpu")).flatten()
        mapping2 = (src[:, None] * w_out + torch.arange(w_out, device="cpu")).flatten()
        shares2 = winit.split_shares(sub.channels, mapping2)

    gm.set_submodule(site.layer, Widened(layer, _new_branch(layer, k, step.init, mapping), dim=1))
    _split_batchnorms(gm, site, k, mapping)  # the chain and any region BatchNorm before the grouped conv
    new = nn.Conv2d(k, k2, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    groups=m, bias=conv.bias is not None, padding_mode=conv.padding_mode).to(dtype=conv.weight.dtype)
    if mapping2 is not None:
        with torch.no_grad():
            new.weight.copy_(conv.weight.detach()[mapping2])
            if conv.bias is not None:
                new.bias.copy_(conv.bias.detach()[mapping2])
    gm.set_submodule(sub.layer, GroupWidened(conv, new, split=site.channels))
    _grow_region(gm, sub, k2, step, state, mapping2, shares2)
    _add_norm(gm, sub, sub.channels, k2, step, state, named=site.layer)
    _append_to_concats(gm, sub)
    state.grown.append(site.layer)
    return site


def _deep_block(channels: int, units: int, features: bool, init: str) -> nn.Sequential:
    """Linear+ReLU on features (``[N, C]``, or units on the last dim), Conv3x3+BN+ReLU on maps."""
    if features:
        block = nn.Sequential(nn.Linear(channels, units), nn.ReLU())
    else:
        block = nn.Sequential(nn.Conv2d(channels, units, 3, padding=1, bias=False), nn.BatchNorm2d(units), nn.ReLU())
    if init == "net2net":  # Net2DeeperNet: an identity on non-negative (post-ReLU) inputs
        with torch.no_grad():
            if features:
                block[0].weight.copy_(torch.eye(units))
                block[0].bias.zero_()
            else:
                nn.init.dirac_(block[0].weight)
    return block


def _non_negative(gm: fx.GraphModule, site: Site) -> bool:
    """The chain's last activation is a ReLU, so the deep block reads inputs >= 0 (a GrowNorm with
    γ > 0 and dropout keep the sign)."""
    for n in reversed(site.chain):
        m = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        if isinstance(m, (GrowNorm, *analysis.PASS_MODULES)) or (m is None and n.target in analysis.PASS_FUNCTIONS):
            continue
        if m is not None:
            return isinstance(m, (nn.ReLU, nn.ReLU6))
        return n.target in (torch.relu, F.relu, F.relu6, F.relu_, "relu", "relu_")
    return False


def deepen(gm: fx.GraphModule, step: GrowStep, state: GrowthState) -> Site:
    _check_not_head(gm, step.layer, state)
    site = find_site(gm, step.layer)
    if step.init == "zero":
        raise GrowthError("--init zero applies to wide growth (it zeroes the new units' outgoing weights); deep growth takes random or net2net")
    assert site.tail is not None
    shape = shape_of(site.tail)
    assert shape is not None
    c, k = shape[site.axis], step.units
    if step.init == "net2net" and k != c:
        raise GrowthError(f"net2net deep growth starts as an identity and needs --units {c} (the width of '{site.layer}'), got {k}")
    if step.init == "net2net" and site.axis == -1 and not _non_negative(gm, site):
        raise GrowthError(f"net2net deep growth is an identity only on non-negative inputs, but '{site.layer}' is not "
                          "followed by a ReLU (a GELU can be negative); use --init random")
    if k != c:
        pretrained = [x.name for x in site.consumers if x.name not in state.fresh] + [
            b for b, _ in site.region_batchnorms]
        if pretrained:
            raise GrowthError(
                f"a block of {k} units after '{site.layer}' would change the input width of the pretrained "
                f"{', '.join(pretrained)} from {c}; use --units {c}, or deepen after the layer that feeds the head"
            )
        for consumer in site.consumers:
            m = gm.get_submodule(consumer.name)
            target = m[0] if isinstance(m, nn.Sequential) else m
            # Through a concat the consumer also reads the other branches: only the layer's part changes width.
            replacement = _default_head(target, (consumer.width - c + k) * consumer.positions, target.weight.shape[0])
            if isinstance(m, nn.Sequential):
                m[0] = replacement
            else:
                gm.set_submodule(consumer.name, replacement)
    block_name = _unique_name(gm, site.layer.replace(".", "_") + "_deep")
    gm.add_submodule(block_name, _deep_block(c, k, len(shape) == 2 or site.axis == -1, step.init))
    last = _insert_after(gm, site.tail, block_name)
    state.fresh.add(block_name)
    if step.norm:
        norm_name = _unique_name(gm, block_name + "_norm")
        gm.add_submodule(norm_name, GrowNorm((k,), eps=step.eps, gamma_init=step.gamma_init, role="deep", axis=site.axis))
        _insert_after(gm, last, norm_name)
        state.norms.append(norm_name)
    state.grown.append(site.layer)
    return site
