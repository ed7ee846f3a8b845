"""Which parameters are new, which pretrained ones train (``--tune``), and at what learning rate.

The paper's protocol: new units, γ and the head learn at ``lr_new_mult`` (10×) the base rate.
``--tune new`` freezes every pretrained parameter, ``top`` trains the pretrained layers from the
first grown layer up (for a baseline: from the layer that feeds the head), ``all`` trains everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.modules import ExtendedConv2d, ExtendedLinear, SplitBatchNorm, Widened
from surgeon.grow.ops import GrowthState


@dataclass
class ParamSplit:
    new: dict[str, nn.Parameter]
    pretrained: dict[str, nn.Parameter]
    frozen: dict[str, nn.Parameter]
    no_decay: set[str]          # γ: weight decay would pull the learned scales towards 0


def new_parameter_names(gm: nn.Module, state: GrowthState) -> set[str]:
    names: set[str] = set()
    fresh = set(state.fresh) | set(state.norms)
    for prefix, m in gm.named_modules():
        dot = f"{prefix}." if prefix else ""
        if prefix in fresh or isinstance(m, GrowNorm):
            names.update(dot + n for n, _ in m.named_parameters())
        elif isinstance(m, (Widened, SplitBatchNorm)):
            names.update(f"{dot}new.{n}" for n, _ in m.new.named_parameters())
        elif isinstance(m, (ExtendedLinear, ExtendedConv2d)):
            names.add(dot + "weight_extra")
    return names


def _graph_order(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def _top_boundary(gm: fx.GraphModule, state: GrowthState) -> int:
    """Graph index from which pretrained layers train under ``--tune top``."""
    order = _graph_order(gm)
    if state.grown:
        return min(order.index(layer) for layer in state.grown if layer in order)
    # Baseline: the last pretrained Linear/Conv before the head.
    idx = order.index(state.head) if state.head in order else len(order)
    for i in range(idx - 1, -1, -1):
        if isinstance(gm.get_submodule(order[i]), (nn.Linear, nn.Conv2d, Widened)):
            return i
    return idx


def split_parameters(gm: fx.GraphModule, state: GrowthState, tune: str) -> ParamSplit:
    new_names = new_parameter_names(gm, state)
    order = _graph_order(gm)
    boundary = _top_boundary(gm, state) if tune == "top" else 0
    rank = {name: i for i, name in enumerate(order)}

    def trains(param_name: str) -> bool:
        if tune == "all":
            return True
        if tune == "new":
            return False
        # The module that calls this parameter: the longest prefix that is a graph node.
        parts = param_name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            owner = ".".join(parts[:cut])
            if owner in rank:
                return rank[owner] >= boundary
        return False

    split = ParamSplit({}, {}, {}, set())
    for name, p in gm.named_parameters():
        if name in new_names:
            split.new[name] = p
        elif trains(name):
            split.pretrained[name] = p
        else:
            split.frozen[name] = p
    for prefix, m in gm.named_modules():
        if isinstance(m, GrowNorm) and m.gamma is not None:
            split.no_decay.add(f"{prefix}.gamma" if prefix else "gamma")
    return split


def param_groups(gm: fx.GraphModule, state: GrowthState, *, lr: float, new_lr_mult: float = 10.0, tune: str = "all",
                 weight_decay: float | None = None) -> list[dict[str, Any]]:
    """The paper's optimizer groups: pretrained parameters that train (``tune``) at ``lr``, new units,
    γ and the head at ``lr * new_lr_mult``; γ without weight decay (it would pull the learned scales
    to 0). ``weight_decay`` None leaves the others' decay to the optimizer's default. Freezes what does
    not train (``requires_grad``), and frozen BatchNorms keep their running statistics in train mode."""
    split = split_parameters(gm, state, tune)
    apply_freeze(gm, split)
    keep_frozen_batchnorm_statistics(gm)
    groups: list[dict[str, Any]] = []
    for kind, params, mult in (("pretrained", split.pretrained, 1.0), ("new", split.new, new_lr_mult)):
        decay = [p for n, p in params.items() if n not in split.no_decay]
        no_decay = [p for n, p in params.items() if n in split.no_decay]
        if decay:
            groups.append({"params": decay, "lr": lr * mult, "name": kind}
                          | ({"weight_decay": weight_decay} if weight_decay is not None else {}))
        if no_decay:
            groups.append({"params": no_decay, "lr": lr * mult, "weight_decay": 0.0, "name": f"{kind} gamma"})
    return groups


def apply_freeze(gm: nn.Module, split: ParamSplit) -> None:
    for p in split.frozen.values():
        p.requires_grad_(False)
    for p in (*split.new.values(), *split.pretrained.values()):
        p.requires_grad_(True)


def _frozen(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad


def freeze_frozen_batchnorms(gm: nn.Module) -> None:
    """Frozen BatchNorms also keep their running statistics (call after ``model.train()``)."""
    for m in gm.modules():
        if _frozen(m):
            m.eval()


def _stay_in_eval_while_frozen(m: nn.Module, args: Any) -> None:
    if m.training and _frozen(m):
        m.eval()


def keep_frozen_batchnorm_statistics(gm: nn.Module) -> None:
    """Every BatchNorm, while its affine parameters are frozen, runs in eval mode whatever
    ``model.train()`` set: a training loop that surgeon does not own (the user's, Lightning's) keeps
    the pretrained statistics of what it does not train, as ``surgeon finetune`` does."""
    for m in gm.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not getattr(m, "_surgeon_keeps_stats", False):
            m.register_forward_pre_hook(_stay_in_eval_while_frozen)
            m._surgeon_keeps_stats = True
