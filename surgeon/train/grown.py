"""A grown model and what its checkpoint records: the one path from a base model to ``grown.pt``
that ``surgeon finetune`` and the Python API (:mod:`surgeon.api`) both take.

:func:`grow` traces the base model, replays the steps (head, then growth) and leaves on the returned
GraphModule a :class:`Grown` record (``model.surgeon_grown``): base architecture, weight source,
recipe, preprocessing, growth state. :func:`calibrate` sets the ``auto`` γ from a batch and records
the γ it started from; :func:`checkpoint_of` turns the model and its record into the
:class:`~surgeon.checkpoint.Checkpoint` that :func:`~surgeon.checkpoint.save_checkpoint` writes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from surgeon.checkpoint import Checkpoint
from surgeon.errors import SurgeonError
from surgeon.grow.analysis import trace
from surgeon.grow.gamma import calibrate_gamma
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import HeadStep, Step
from surgeon.preprocessing import Preprocessing
from surgeon.source import Source

ATTR = "surgeon_grown"


@dataclass
class Grown:
    """What a grown model remembers so that saving it needs only a path."""

    model: str | None                 # the base architecture spec (None: it cannot be recorded, see unrecorded)
    weights: str                      # where the base weights came from
    preprocessing: Preprocessing
    recipe: list[Step]                # every step since the base architecture, in order
    state: GrowthState
    classes: list[str] | None = None  # class names, where known (a checkpoint's, or given to the API)
    unrecorded: str = ""
    gamma_init: dict[str, list[float]] = field(default_factory=dict)  # mean γ per group before training

    @property
    def outputs(self) -> int | None:
        """The number of classes the last replaced head outputs (None: the head was kept)."""
        return next((s.classes for s in reversed(self.recipe) if isinstance(s, HeadStep)), None)


def _remember(gm: fx.GraphModule, grown: Grown) -> None:
    setattr(gm, ATTR, grown)
    # GraphModule's deepcopy keeps only what its meta lists here (an EMA copy, say, stays saveable).
    key = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", None)
    if key is not None:
        gm.meta.setdefault(key, {})[ATTR] = grown


def unwrap(model: nn.Module) -> nn.Module:
    """The grown module inside DistributedDataParallel / DataParallel and ``torch.compile``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def grown_info(model: nn.Module) -> Grown | None:
    """The record of a grown model: the one :func:`grow` left, or one made from the checkpoint a
    model was loaded from (``surgeon.load``). None for any other module."""
    model = unwrap(model)
    found = getattr(model, ATTR, None)
    if isinstance(found, Grown):
        return found
    ckpt, state = getattr(model, "surgeon_checkpoint", None), getattr(model, "surgeon_state", None)
    if isinstance(ckpt, Checkpoint) and isinstance(state, GrowthState) and isinstance(model, fx.GraphModule):
        grown = Grown(ckpt.model, ckpt.weights, ckpt.preprocessing, list(ckpt.recipe), state, list(ckpt.classes),
                      gamma_init=dict(ckpt.history.get("gamma_init", {})))
        _remember(model, grown)
        return grown
    return None


def source_of(model: nn.Module) -> Source | None:
    """A grown (or loaded) model as the source of further growth; its own record is left as it is."""
    info = grown_info(model)
    if info is None:
        return None
    return Source(unwrap(model), info.model, info.weights, info.preprocessing, list(info.recipe),
                  copy.deepcopy(info.state), classes=list(info.classes) if info.classes else None,
                  unrecorded=info.unrecorded)


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def gamma_stats(model: nn.Module) -> dict[str, list[float]]:
    """Mean γ of each group of each GrowNorm (the scales' trajectory for analysis)."""
    out: dict[str, list[float]] = {}
    for name, m in model.named_modules():
        if isinstance(m, GrowNorm) and m.gamma is not None and not m.gamma.is_meta:
            g = m.gamma.detach().float().cpu()
            out[name] = [float(part.mean()) for part in torch.split(g, list(m.groups))]
    return out


def grow(src: Source, steps: Sequence[Step]) -> fx.GraphModule:
    """Trace ``src.module`` and replay ``steps`` on it (the base's own layers are reused, so the
    source module changes too). New tensors are created on the model's device and in its dtype; on
    the meta device growth computes shapes only."""
    gm = trace(src.module)
    state = src.state or GrowthState(input_size=src.preprocessing.input_size)
    # On meta, modules growth creates must be born there: their init would copy out of meta tensors.
    with torch.device("meta") if _is_meta(gm) else contextlib.nullcontext():
        apply_steps(gm, list(steps), state)
    heads = any(isinstance(s, HeadStep) for s in steps)
    _remember(gm, Grown(src.model, src.weights, src.preprocessing, list(src.recipe) + list(steps), state,
                        classes=None if heads else src.classes, unrecorded=src.unrecorded,
                        gamma_init=gamma_stats(gm)))
    return gm


def calibrate(model: fx.GraphModule, images: torch.Tensor) -> dict[str, list[float]]:
    """Set the γ of every ``auto`` GrowNorm from ``images`` (on the model's device) and record the
    starting γ; returns ``{norm: [γ_old, γ_new]}``."""
    done = calibrate_gamma(model, images)
    info = grown_info(model)
    if info is not None:
        info.gamma_init = gamma_stats(model)
    return done


def checkpoint_of(model: nn.Module, *, classes: Sequence[str] | None = None,
                  preprocessing: Preprocessing | None = None, history: list[dict[str, Any]] | None = None,
                  train_args: dict[str, Any] | None = None) -> Checkpoint:
    """The checkpoint of a grown model (weights as they are now); ``classes`` and ``preprocessing``
    default to what the record knows."""
    info = grown_info(model)
    if info is None:
        raise SurgeonError(f"this {type(unwrap(model)).__name__} was not grown by surgeon (grow it with "
                           "surgeon.grow_model, or load a grown.pt with surgeon.load)")
    if info.model is None:
        raise SurgeonError(f"cannot save: {info.unrecorded}")
    names = [str(c) for c in classes] if classes is not None else info.classes
    if names is None:
        raise SurgeonError(f"name the model's {info.outputs or ''} classes: surgeon.save(model, path, classes=[...])"
                           .replace("  ", " "))
    if info.outputs is not None and len(names) != info.outputs:
        raise SurgeonError(f"{len(names)} class names for a head of {info.outputs} outputs")
    pre = preprocessing or info.preprocessing
    if pre.input_size != info.preprocessing.input_size:
        raise SurgeonError(f"the model was grown for {info.preprocessing.input_size}px inputs; preprocessing cannot "
                           f"change that to {pre.input_size}px")
    module = unwrap(model)
    if _is_meta(module):
        raise SurgeonError("a model on the meta device has shapes but no weights: there is nothing to save")
    return Checkpoint(model=info.model, weights=info.weights, recipe=list(info.recipe), classes=names,
                      preprocessing=pre, state_dict=module.state_dict(),
                      history={"epochs": list(history or []), "gamma_init": info.gamma_init},
                      train_args=dict(train_args or {}))
