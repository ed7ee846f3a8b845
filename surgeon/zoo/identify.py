"""Which ``--model`` spec rebuilds an ``nn.Module`` a user built in Python.

A grown checkpoint records its base architecture as a spec that :func:`surgeon.zoo.build_architecture`
rebuilds (never a pickled module). For a module handed to the Python API the spec is found from its
class: surgeon's own architectures, timm models (their ``pretrained_cfg`` names them), torchvision
builders of the class's module, or a class importable by name that builds the same thing with no
arguments. A candidate counts only if it builds the same state-dict keys and shapes, so a model built
with other arguments (``num_classes=10``) is not mistaken for the default one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from surgeon.errors import SurgeonError, first_line
from surgeon.preprocessing import Preprocessing
from surgeon.zoo import BaseModel, _load_structure


@dataclass(frozen=True)
class Identified:
    """The spec that rebuilds a module (``spec`` None: it cannot be recorded, ``why`` says why)."""

    spec: str | None
    preprocessing: Preprocessing | None = None
    why: str = ""


def signature(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes: what must match for a rebuilt architecture to take the weights."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _structure(spec: str) -> BaseModel | None:
    try:
        return _load_structure(spec, "none", None)  # on the meta device: no memory, no init
    except Exception:  # a builder that cannot run without arguments, a missing optional package
        return None


def _candidates(module: nn.Module) -> list[str]:
    cls = type(module)
    if cls.__module__ == "surgeon.zoo.digitnet":
        return ["surgeon:digitnet"]
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):  # timm
        tag = cfg.get("tag")
        return [f"timm:{cfg['architecture']}" + (f".{tag}" if tag else "")]
    if cls.__module__.startswith("torchvision.models"):
        import torchvision

        return [f"torchvision:{name}" for name in torchvision.models.list_models(module=torchvision.models)
                if torchvision.models.get_model_builder(name).__module__ == cls.__module__]
    if cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__:
        return [f"{cls.__module__}:{cls.__qualname__}"]
    return []


def _importable(spec: str, cls: type) -> bool:
    target, _, attr = spec.rpartition(":")
    try:
        obj = importlib.import_module(target)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception:
        return False
    return obj is cls


def identify(module: nn.Module) -> Identified:
    """The spec (and, for zoo models, the preprocessing) that rebuilds ``module``'s architecture."""
    cls = type(module)
    want = signature(module)
    what = f"a {cls.__qualname__} (from {cls.__module__})"
    tried: list[tuple[int, str]] = []  # zoo builders of the class whose layers differ: how many keys differ
    for spec in _candidates(module):
        user = not is_zoo_spec(spec)
        if user and not _importable(spec, cls):
            continue
        base = _structure(spec)
        if base is not None and type(base.module) is cls and signature(base.module) == want:
            return Identified(spec, None if user else base.preprocessing)
        if not user and base is not None and type(base.module) is cls:
            tried.append((len(set(want) ^ set(signature(base.module))), spec))
    if tried:
        closest = min(tried)[1]
        why = f"its layers are not those of {closest} (was it built with other arguments, such as num_classes?)"
    elif cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        why = "its class is defined in a script or a function, so nothing can import it by name"
    else:
        why = "no torchvision/timm/surgeon builder or no-argument constructor of its class builds the same layers"
    return Identified(None, None, f"surgeon cannot record how to rebuild {what}: {why}; pass arch='pkg.module:Factory' "
                                  "(a class or function that builds it without arguments) or 'torchvision:NAME' to "
                                  "surgeon.grow_model")


def is_zoo_spec(spec: str) -> bool:
    return spec.startswith(("torchvision:", "timm:", "surgeon:"))


def check_spec(module: nn.Module, spec: str) -> Preprocessing | None:
    """The preprocessing of ``spec`` (None for user code: surgeon cannot know it) if ``spec`` rebuilds
    ``module``'s architecture; a one-line error if it does not."""
    try:
        built = _load_structure(spec, "none", None)
    except SurgeonError as exc:
        raise SurgeonError(f"arch={spec!r}: {exc}") from None
    except Exception as exc:
        raise SurgeonError(f"arch={spec!r} cannot be built ({first_line(exc)[:200]})") from None
    mine, theirs = signature(module), signature(built.module)
    if mine != theirs:
        first = sorted(set(mine.items()) ^ set(theirs.items()))[0][0]
        raise SurgeonError(f"arch={spec!r} builds different layers than the model (first difference: {first})")
    return built.preprocessing if is_zoo_spec(spec) else None
