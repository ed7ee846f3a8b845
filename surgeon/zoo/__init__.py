"""Base models: where the network to grow comes from.

``--model`` accepts
- ``torchvision:NAME`` — any torchvision classification model; ``--weights`` is ``DEFAULT``, a
  weights enum name (``IMAGENET1K_V1``), ``none``, or a local state-dict file;
- ``timm:NAME`` (``timm:resnet18``, ``timm:resnet18.a1_in1k``) — any timm model (the optional extra
  ``surgeon[timm]``); ``--weights`` is ``DEFAULT`` (the pretrained tag's weights, downloaded by timm),
  ``none``, or a local state-dict file (``.pth``/``.bin``/``.safetensors``);
- ``surgeon:NAME`` — an architecture shipped with surgeon (``surgeon:digitnet``);
- a surgeon checkpoint file (``models/digitnet.pt``, or a ``grown.pt`` to grow further);
- ``MODULE:FACTORY`` or ``FILE.py:FACTORY`` — your own ``nn.Module`` class or factory (imported:
  this runs your code), with ``--weights`` a state-dict file.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from surgeon.errors import SurgeonError, first_line
from surgeon.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

BUILTIN_ARCHS = ("digitnet",)
# --weights DEFAULT for a built-in architecture: the checkpoint shipped in models/ (source checkouts;
# an installed package, e.g. the Docker image, points SURGEON_MODELS at its copy of models/).
MODELS_DIR = Path(os.environ.get("SURGEON_MODELS") or Path(__file__).resolve().parents[2] / "models")
SHIPPED_WEIGHTS = {"digitnet": MODELS_DIR / "digitnet.pt"}
DIGITS_PREPROCESSING = Preprocessing(input_size=32, resize=32, mean=(0.25, 0.25, 0.25), std=(0.35, 0.35, 0.35))


@dataclass
class BaseModel:
    """A base network before growth, with what later stages need to know about it."""

    module: nn.Module
    model: str                      # the --model spec that rebuilds the architecture
    weights: str                    # where the weights came from (recorded, never re-fetched)
    preprocessing: Preprocessing


def build_architecture(spec: str, *, trust_code: bool = False) -> nn.Module:
    """The randomly initialised architecture for ``spec`` (no weights are fetched). A spec naming user
    code (a models/ file, ``module:factory``) is imported only with ``trust_code=True``."""
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], None)
    if spec.startswith("timm:"):
        return _timm_model(spec.split(":", 1)[1], pretrained=False)
    if spec.startswith("surgeon:"):
        return _surgeon_arch(spec.split(":", 1)[1])
    if not trust_code:
        raise SurgeonError(
            f"this checkpoint was grown from user code '{spec}'; surgeon does not import code named inside a file. "
            "Pass --trust-code (CLI) or trust_code=True if you trust it"
        )
    return _user_factory(spec)()


def _surgeon_arch(name: str) -> nn.Module:
    if name == "digitnet":
        from surgeon.zoo.digitnet import DigitNet

        return DigitNet()
    raise SurgeonError(f"unknown surgeon architecture '{name}'; available: {', '.join(BUILTIN_ARCHS)}")


def _torchvision(name: str, weights: str | None) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise SurgeonError(f"torchvision has no classification model '{name}'; e.g. {', '.join(sorted(available)[:8])}, ...")
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (ValueError, KeyError) as exc:
        enums = [w.name for w in torchvision.models.get_model_weights(name)]
        raise SurgeonError(f"torchvision:{name} has no weights '{weights}' ({exc}); use DEFAULT, none, a file, or one of {', '.join(enums)}") from None
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        if weights is None:  # nothing was downloaded: a constructor failure (on the meta device, say)
            raise
        raise SurgeonError(
            f"could not download the {weights} weights of torchvision:{name} ({type(exc).__name__}: {exc}); "
            "without network, pass --weights none or --weights PATH to a local state dict"
        ) from None


def _torchvision_preprocessing(name: str, weights: str | None, module: nn.Module | None = None) -> Preprocessing:
    import torchvision

    # The weights' own eval transforms (e.g. 299 for inception_v3); metadata only, nothing is fetched,
    # so a model built without weights still gets the input size it was designed for.
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        enum = None
    if enum is not None:
        w = enum.DEFAULT if weights in (None, "DEFAULT") else getattr(enum, weights, None)
        fixed = getattr(module, "image_size", None) if weights is None else None
        if w is not None and isinstance(fixed, int) and int(w.transforms().crop_size[0]) != fixed:
            # a ViT built without weights takes its default size (vit_h_14: 224), not its DEFAULT
            # weights' (518): the transforms of weights made for that size, else none
            w = next((e for e in enum if int(e.transforms().crop_size[0]) == fixed), None)
        if w is not None:
            t = w.transforms()
            return Preprocessing(input_size=int(t.crop_size[0]), resize=int(t.resize_size[0]),
                                 mean=tuple(t.mean), std=tuple(t.std))
    return Preprocessing(input_size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)


TIMM_MISSING = "--model timm:NAME needs timm, an optional extra: pip install 'surgeon[timm]'"


def _import_timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise SurgeonError(TIMM_MISSING) from None
    return timm


def _timm_model(name: str, *, pretrained: bool) -> nn.Module:
    """``timm.create_model(name)``; ``pretrained`` downloads the weights of its (default) tag."""
    timm = _import_timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".", 1)[0], timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "timm.list_models('*PATTERN*') lists the names"
        raise SurgeonError(f"timm has no model '{name}'; {hint}")
    try:
        return _plain_linears(timm.create_model(name, pretrained=pretrained))
    except SurgeonError:
        raise
    except Exception as exc:  # hub, URL and file errors come in many types
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0][:160] if text else ""
        if pretrained:
            raise SurgeonError(
                f"could not download the pretrained weights of timm:{name} ({type(exc).__name__}: {first}); "
                "without network, pass --weights none or --weights PATH to a local state dict"
            ) from None
        raise SurgeonError(f"timm cannot build {name} ({type(exc).__name__}: {first})") from None


def _plain_linears(module: nn.Module) -> nn.Module:
    """timm's ``timm.layers.Linear`` (MobileNetV3's classifier, for one) is an ``nn.Linear`` whose
    forward only differs under TorchScript; torch.fx would trace into it and see no Linear layer.
    It becomes a plain ``nn.Linear`` with the same parameters (same state-dict keys)."""
    from timm.layers import Linear as TimmLinear

    for m in module.modules():
        if type(m) is TimmLinear:
            m.__class__ = nn.Linear
    return module


def _timm_preprocessing(module: nn.Module) -> Preprocessing:
    """Eval preprocessing from timm's data config: crop ``input_size``, resize the short side to
    ``floor(input_size / crop_pct)`` as timm's eval transforms do, timm's mean and std."""
    timm = _import_timm()
    cfg = timm.data.resolve_data_config({}, model=module)
    size = int(cfg["input_size"][-2])
    crop_pct = cfg.get("crop_pct") or 1.0
    return Preprocessing(input_size=size, resize=max(size, math.floor(size / crop_pct)),
                         mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]))


def _user_factory(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise SurgeonError(f"--model '{spec}' is not torchvision:NAME, surgeon:NAME, a checkpoint file, or MODULE:CLASS / FILE.py:CLASS")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.exists():
                raise SurgeonError(f"model file {path} does not exist")
            mod_name = f"surgeon_user_{path.stem}"
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            assert mspec and mspec.loader
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except SurgeonError:
        raise
    except Exception as exc:
        raise SurgeonError(f"cannot import {target} for --model {spec}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise SurgeonError(f"{target} has no class or function '{attr}'")
    return factory


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file (never unpickles objects); a surgeon checkpoint works too."""
    p = Path(path)
    if not p.exists():
        raise SurgeonError(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = first_line(exc)
        raise SurgeonError(f"{p} is not a weights file torch can load safely ({first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # torchvision reference-script checkpoints
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SurgeonError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    return obj


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise SurgeonError(f"{p} is a safetensors file; pip install safetensors to read it") from None
    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:
        first = first_line(exc)[:200]
        raise SurgeonError(f"{p} is not a readable safetensors file ({first})") from None


def _load_weights(module: nn.Module, path: str, spec: str) -> None:
    state = load_state_dict_file(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise SurgeonError(f"weights {path} do not fit {spec}: {detail[:300]}") from None


def load_base(spec: str, weights: str = "DEFAULT", input_size: int | None = None, *, meta: bool = False) -> BaseModel:
    """Build the base model for ``--model spec --weights weights``. ``meta`` with ``--weights none``:
    the structure only, on the meta device (no memory, no random init; shapes propagate without
    computing), for ``surgeon layers``."""
    w_lower = (weights or "none").lower()
    if meta and w_lower == "none":
        return _load_structure(spec, weights, input_size)
    path_like = w_lower not in ("none", "default") and (
        Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors") or Path(weights).exists())
    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        if w_lower == "none" or path_like:
            module = _torchvision(name, None)
            pre = _torchvision_preprocessing(name, None, module)
            if path_like:
                _load_weights(module, weights, spec)
        else:
            enum_name = "DEFAULT" if w_lower == "default" else weights
            module = _torchvision(name, enum_name)
            pre = _torchvision_preprocessing(name, enum_name)
    elif spec.startswith("timm:"):
        name = spec.split(":", 1)[1]
        if w_lower not in ("none", "default") and not path_like:
            raise SurgeonError(f"--weights for {spec} is DEFAULT, none or a file, got {weights!r}; "
                               f"name a pretrained tag in the model instead (timm:{name.split('.', 1)[0]}.TAG)")
        module = _timm_model(name, pretrained=w_lower == "default")
        pre = _timm_preprocessing(module)
        if path_like:
            _load_weights(module, weights, spec)
    elif spec.startswith("surgeon:"):
        arch = spec.split(":", 1)[1]
        module = _surgeon_arch(arch)
        pre = DIGITS_PREPROCESSING
        if w_lower == "default":  # the weights shipped in models/ (pretrained on digits 0-4)
            shipped = SHIPPED_WEIGHTS.get(arch)
            if shipped is None or not shipped.exists():
                raise SurgeonError(f"no pretrained weights are shipped for {spec} here; pass --weights none or a file")
            weights, path_like = str(shipped), True
        if path_like:
            _load_weights(module, weights, spec)
        elif w_lower != "none":
            raise SurgeonError(f"--weights for {spec} is DEFAULT, none or a file, got {weights!r}")
    else:
        factory = _user_factory(spec)
        module = factory()
        if not isinstance(module, nn.Module):
            raise SurgeonError(f"{spec} returned a {type(module).__name__}, not a torch.nn.Module")
        pre = Preprocessing()
        if path_like:
            _load_weights(module, weights, spec)
        elif w_lower not in ("none", "default"):
            raise SurgeonError(f"weights file {weights} does not exist")
    if input_size:
        pre = pre.at_size(input_size)
    source = w_lower if w_lower in ("none", "default") and not path_like else weights
    return BaseModel(module=module, model=spec, weights=str(source), preprocessing=pre)



_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _without_init() -> Iterator[None]:
    """``torch.nn.init``'s functions do nothing inside (weights stay as allocated: uninitialized)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _load_structure(spec: str, weights: str, input_size: int | None) -> BaseModel:
    """``load_base`` on the meta device. A constructor that reads tensor values (RegNet computes its
    widths with torch ops) cannot run there: it runs on the CPU with ``torch.nn.init`` disabled and
    the model then moves to the meta device."""
    try:
        with torch.device("meta"):
            return load_base(spec, weights, input_size)
    except Exception:
        with _without_init():
            base = load_base(spec, weights, input_size)
        base.module.to("meta")
        return base
