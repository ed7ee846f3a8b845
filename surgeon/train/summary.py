"""What a fine-tuning run tells the person who started it: what it found and grew before epoch 1,
and when its losses say it is going wrong."""

from __future__ import annotations

import math
from collections.abc import Sized
from typing import Any

from torch import nn

from surgeon.errors import SurgeonError
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.recipe import GrowStep
from surgeon.train.config import FinetuneConfig
from surgeon.train.params import new_parameter_names

# An epoch whose loss is this many times chance level (ln C for C classes) is diverging: the paper's
# protocol starts from pretrained features, whose loss falls from about ln C, never rises 10x above it.
EXPLODED = 10.0


def _count(ds: Any) -> str:
    return str(len(ds)) if isinstance(ds, Sized) else "?"


def run_summary(prepared: Any, config: FinetuneConfig, device: Any) -> list[str]:
    """Lines printed before epoch 1: data, model, device and each growth step."""
    data, pre = prepared.data, prepared.preprocessing
    shown = ", ".join(data.classes[:8]) + (f", ... ({len(data.classes) - 8} more)" if len(data.classes) > 8 else "")
    lines = [
        f"data {config.data}: {len(data.classes)} classes ({shown}); {_count(data.train)} train, "
        f"{_count(data.val)} val images; input {pre.input_size}px",
        f"model {prepared.arch} (weights {prepared.weights}), head {prepared.state.head} -> {len(data.classes)} "
        f"classes; training on {device}",
    ]
    model: nn.Module = prepared.model
    norms = {name: m for name, m in model.named_modules() if isinstance(m, GrowNorm)}
    for step, norm_name in zip((s for s in config.grow if isinstance(s, GrowStep)), _step_norms(prepared, config)):
        what = f"+{step.units} units" if step.kind == "wide" else f"a {step.units}-unit block"
        where = "in" if step.kind == "wide" else "after"
        norm = norms.get(norm_name) if norm_name else None
        groups = f"GrowNorm {norm_name} groups {'+'.join(map(str, norm.groups))}" if norm is not None else "no GrowNorm"
        lines.append(f"grew {step.kind} {where} {step.layer}: {what} (init {step.init}), {groups}")
    if not config.baseline and config.grow:
        names = new_parameter_names(model, prepared.state)
        params = dict(model.named_parameters())
        new = sum(params[n].numel() for n in names if n in params and n not in _head_params(prepared))
        total = sum(p.numel() for p in params.values())
        lines.append(f"new parameters {new:,} ({100 * new / max(total, 1):.1f}% of {total:,}), head excluded; "
                     f"they train at {config.lr_new_mult:g}x --lr")
    return lines


def _head_params(prepared: Any) -> set[str]:
    head = prepared.state.head
    return {f"{head}.{n}" for n, _ in prepared.model.get_submodule(head).named_parameters()} if head else set()


def _step_norms(prepared: Any, config: FinetuneConfig) -> list[str | None]:
    """The GrowNorm each growth step of this run made (None for --no-norm), in recipe order."""
    steps = [s for s in config.grow if isinstance(s, GrowStep)]
    made = list(prepared.state.norms)[-sum(1 for s in steps if s.norm):] if any(s.norm for s in steps) else []
    it = iter(made)
    return [next(it, None) if s.norm else None for s in steps]


def start_warnings(config: FinetuneConfig, weights: str) -> list[str]:
    if str(weights).lower() == "none":
        return [f"--weights none trains from random weights with transfer-learning settings (--lr {config.lr:g}, "
                f"new units and head at {config.lr_new_mult:g}x): expect slow or diverging training; use pretrained "
                "weights, or a lower --lr and more --epochs"]
    return []


class LossWatch:
    """Stops a run whose loss is not a number and warns once when it explodes."""

    def __init__(self, classes: int, lr: float) -> None:
        self.chance = math.log(max(classes, 2))
        self.lr = lr
        self.warned = False

    def check(self, epoch: int, **losses: float) -> str | None:
        for name, value in losses.items():
            if not math.isfinite(value):
                raise SurgeonError(f"the {name.replace('_', ' ')} became {value} in epoch {epoch}; the run diverged: "
                                   f"lower --lr (now {self.lr:g}) and start again")
        worst_name, worst = max(losses.items(), key=lambda kv: kv[1])
        if self.warned or worst <= EXPLODED * self.chance:
            return None
        self.warned = True
        return (f"epoch {epoch}: {worst_name.replace('_', ' ')} {worst:.4g} is {worst / self.chance:.0f}x chance level "
                f"(ln {round(math.exp(self.chance))} = {self.chance:.2f}): the run is diverging; lower --lr (now {self.lr:g})")
