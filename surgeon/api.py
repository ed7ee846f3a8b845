"""The Python API: grow a model, train it in your own loop, save, export, build.

    import surgeon, torch
    grown = surgeon.grow_model("surgeon:digitnet", [surgeon.Wide("classifier.3", 128)], classes=10, calib=loader)
    optimizer = torch.optim.SGD(surgeon.param_groups(grown, lr=1e-2, new_lr_mult=10, tune="top"),
                                momentum=0.9, weight_decay=5e-4)
    ...  # your loop: grown is an nn.Module (a torch.fx GraphModule)
    surgeon.save(grown, "grown.pt", classes=[...])
    surgeon.export_onnx("grown.pt", "model.onnx")
    surgeon.build("model.onnx", "model.engine")

It is the path ``surgeon finetune`` takes (:mod:`surgeon.train.grown`, :mod:`surgeon.train.params`),
so a checkpoint saved here is one the CLI would have written. Why ``grow_model`` and ``export_onnx``
rather than ``grow`` and ``export``: ``surgeon.grow`` and ``surgeon.export`` are subpackages, and a
function of the same name would be replaced by the subpackage as soon as anything imports it.
Reference: docs/API.md.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx, nn

from surgeon.checkpoint import save_checkpoint
from surgeon.contract import DEFAULT_EPS
from surgeon.errors import SurgeonError
from surgeon.grow.recipe import GrowStep, HeadStep, Step
from surgeon.preprocessing import Preprocessing
from surgeon.source import open_model, open_module
from surgeon.spec import DEFAULT_OPSET, BatchRange
from surgeon.train import grown as _grown
from surgeon.train import params as _params
from surgeon.train.config import TUNE_MODES

if TYPE_CHECKING:  # imported when called: export brings onnx and ONNX Runtime, trt TensorRT
    from surgeon.export.onnx_export import ExportResult
    from surgeon.export.quantize import QuantizeOptions
    from surgeon.trt.build import EngineReport

__all__ = ["Wide", "Deep", "grow_model", "param_groups", "save", "export_onnx", "build"]

CALIB_SAMPLES = 256  # images for gamma_init="auto", as `surgeon finetune --calib-samples`


@dataclass(frozen=True)
class _Growth:
    layer: str
    units: int
    init: str | None = None                 # None: grow_model's init
    gamma_init: float | str | None = None   # None: grow_model's gamma_init
    norm: bool | None = None                # None: grow_model's norm
    eps: float = DEFAULT_EPS
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.step()  # a bad layer/units/init fails here, in one line, not halfway through growth

    def step(self, init: str = "random", gamma_init: float | str = "auto", norm: bool = True) -> GrowStep:
        """The recipe step, with the settings this one leaves open taken from the arguments."""
        return GrowStep(self.kind, self.layer, self.units, init=self.init if self.init is not None else init,
                        norm=self.norm if self.norm is not None else norm,
                        gamma_init=self.gamma_init if self.gamma_init is not None else gamma_init, eps=self.eps)


@dataclass(frozen=True)
class Wide(_Growth):
    """Widen ``layer`` (Linear or Conv2d) by ``units`` new units that read its input (the paper's WA).

    Example: ``surgeon.Wide("classifier.3", 1024)``; ``surgeon.Wide("layer4.1.conv1", 64, init="net2net")``.
    """

    kind: ClassVar[str] = "wide"


@dataclass(frozen=True)
class Deep(_Growth):
    """Insert a new block of ``units`` after ``layer``'s activation (the paper's DA): Linear+ReLU on
    features, Conv3x3+BN+ReLU on feature maps.

    Example: ``surgeon.Deep("classifier.3", 1024)``.
    """

    kind: ClassVar[str] = "deep"


def _steps(steps: Iterable[_Growth | GrowStep], init: str, gamma_init: float | str, norm: bool) -> list[GrowStep]:
    if isinstance(steps, (_Growth, GrowStep)):
        steps = [steps]
    out = []
    for s in steps:
        if isinstance(s, _Growth):
            out.append(s.step(init, gamma_init, norm))
        elif isinstance(s, GrowStep):
            out.append(s)
        else:
            raise SurgeonError(f"a growth step is surgeon.Wide(layer, units) or surgeon.Deep(layer, units), got {s!r}")
    return out


def _head(classes: int | Sequence[str] | None, head: str | None) -> tuple[list[Step], list[str] | None]:
    if classes is None:
        if head:
            raise SurgeonError("head= names the layer to replace: pass classes= too (how many outputs it gets)")
        return [], None
    if isinstance(classes, str):
        raise SurgeonError(f"classes is a number or a list of class names, got the string {classes!r}")
    names = None if isinstance(classes, int) else [str(c) for c in classes]
    return [HeadStep(classes=len(names) if names is not None else classes, layer=head or "")], names


def _calibration_images(calib: torch.Tensor | Iterable[Any], n: int) -> torch.Tensor:
    """Up to ``n`` images from a batch tensor or from an iterable of batches (a DataLoader yielding
    ``images`` or ``(images, labels, ...)``)."""
    if isinstance(calib, torch.Tensor):
        return calib[:n]
    taken: list[torch.Tensor] = []
    count = 0
    for batch in calib:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, torch.Tensor):
            raise SurgeonError(f"calib yields {type(images).__name__}; it must yield image tensors [N, C, H, W] "
                               "or (images, labels) pairs")
        taken.append(images)
        count += len(images)
        if count >= n:
            break
    if not taken:
        raise SurgeonError("calib yielded no images")
    return torch.cat(taken)[:n]


def grow_model(model: nn.Module | str | Path, steps: Iterable[Wide | Deep | GrowStep] = (), *,
               classes: int | Sequence[str] | None = None, input_size: int | None = None, init: str = "random",
               gamma_init: float | str = "auto", norm: bool = True, calib: torch.Tensor | Iterable[Any] | None = None,
               calib_samples: int = CALIB_SAMPLES, head: str | None = None, arch: str | None = None,
               weights: str | None = None, trust_code: bool = False) -> fx.GraphModule:
    """Grow ``model``: replace its head for ``classes`` (a count or the class names; None keeps the
    head), then apply ``steps`` in order. Returns a ``torch.fx.GraphModule``: train it as any
    ``nn.Module``; it remembers its base model and recipe, so :func:`save` needs only a path. It
    reuses ``model``'s layers, which growth edits: pass ``copy.deepcopy(model)`` to keep the original.

    ``model`` is one of
    - a spec as ``surgeon finetune --model`` takes it (``"torchvision:resnet18"``, ``"timm:NAME"``,
      ``"surgeon:digitnet"``, a ``grown.pt`` to grow further, ``"pkg.module:Class"`` with
      ``trust_code``), with ``weights`` as ``--weights`` (default ``DEFAULT``);
    - an ``nn.Module`` you built. The checkpoint must name its architecture: surgeon finds it for
      torchvision, timm and surgeon models and for classes importable by name that build it without
      arguments, or takes ``arch`` (checked against the module); otherwise the model grows and
      trains, and :func:`save` says why it cannot be saved. ``weights`` is recorded as where its weights came
      from (default ``"module"``);
    - a model from :func:`grow_model` or ``surgeon.load`` (grow it further).

    ``init``, ``gamma_init`` and ``norm`` apply to the steps that do not set their own (as
    ``--init``, ``--gamma-init``, ``--norm/--no-norm``). ``gamma_init="auto"`` sets each GrowNorm's γ
    from ``calib``: a batch of images or an iterable of batches (a DataLoader of the target data;
    ``calib_samples`` images are used), on the model's device. Growth runs where the model is (CPU,
    CUDA, any float dtype; on the meta device it computes shapes only, with no calibration).

    Example::

        grown = surgeon.grow_model(model, [surgeon.Wide("layer4.1.conv1", 64), surgeon.Deep("fc", 512)],
                                   input_size=224, classes=10, calib=loader)
    """
    new_steps = _steps(steps, init, gamma_init, norm)
    head_steps, names = _head(classes, head)
    if isinstance(model, (str, Path)):
        src = open_model(str(model), weights or "DEFAULT", input_size, trust_code=trust_code)
    elif (src := _grown.source_of(model)) is not None:
        if input_size is not None and input_size != src.preprocessing.input_size:
            raise SurgeonError(f"the model was grown for {src.preprocessing.input_size}px inputs; input_size cannot change that")
    else:
        src = open_module(_grown.unwrap(model), arch=arch, input_size=input_size, weights=weights or "module")
    was_training = src.module.training
    meta = any(p.is_meta for p in src.module.parameters())
    auto = [s.layer for s in new_steps if s.norm and s.gamma_init == "auto"]
    if auto and calib is None and not meta:
        raise SurgeonError(f"gamma_init='auto' sets GrowNorm's scale from data: pass calib= (a DataLoader or a batch "
                           f"of images) or a number, e.g. gamma_init=20 (ParseNet), for {', '.join(auto)}")
    gm = _grown.grow(src, head_steps + new_steps)
    info = _grown.grown_info(gm)
    assert info is not None
    if names is not None:
        info.classes = names
    if calib is not None and not meta:
        ref = next((p for p in gm.parameters() if p.is_floating_point()), None)
        images = _calibration_images(calib, calib_samples)
        _grown.calibrate(gm, images.to(ref.device, ref.dtype) if ref is not None else images)
    gm.train(was_training)
    return gm


def _state(model: nn.Module) -> tuple[fx.GraphModule, Any]:
    info = _grown.grown_info(model)
    module = _grown.unwrap(model)
    if info is None or not isinstance(module, fx.GraphModule):
        raise SurgeonError(f"this {type(module).__name__} was not grown by surgeon: grow it with surgeon.grow_model "
                           "(or load a grown.pt with surgeon.load)")
    return module, info.state


def param_groups(model: nn.Module, *, lr: float, new_lr_mult: float = 10.0, tune: str = "all",
                 weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups for any ``torch.optim`` optimizer, the paper's protocol: new units, γ and
    the head at ``lr * new_lr_mult``; the pretrained parameters that ``tune`` trains at ``lr`` (``new``:
    none, ``top``: from the first grown layer up, ``all``). The others are frozen
    (``requires_grad=False``), and a frozen BatchNorm keeps its statistics even in ``model.train()``.
    γ has no weight decay; the other groups take ``weight_decay``, or the optimizer's when None.
    Each group has a ``name``: ``pretrained``, ``new``, ``pretrained gamma``/``new gamma``.

    Example::

        optimizer = torch.optim.SGD(surgeon.param_groups(grown, lr=1e-3, tune="top"), momentum=0.9,
                                    weight_decay=5e-4)
    """
    if tune not in TUNE_MODES:
        raise SurgeonError(f"tune must be one of {', '.join(TUNE_MODES)}, got {tune!r}")
    if not lr > 0 or not new_lr_mult > 0:
        raise SurgeonError(f"lr and new_lr_mult must be positive, got lr={lr!r}, new_lr_mult={new_lr_mult!r}")
    module, state = _state(model)
    return _params.param_groups(module, state, lr=lr, new_lr_mult=new_lr_mult, tune=tune, weight_decay=weight_decay)


def _preprocessing(given: Preprocessing | Mapping[str, Any] | None, model: nn.Module) -> Preprocessing | None:
    if given is None or isinstance(given, Preprocessing):
        return given
    info = _grown.grown_info(model)
    base = info.preprocessing.to_dict() if info is not None else Preprocessing().to_dict()
    unknown = set(given) - set(base)
    if unknown:
        raise SurgeonError(f"unknown preprocessing keys {sorted(unknown)}; use {', '.join(base)}")
    try:
        return Preprocessing.from_dict({**base, **given})
    except (TypeError, ValueError) as exc:
        raise SurgeonError(f"bad preprocessing {dict(given)}: {exc}") from None


def save(model: nn.Module, path: str | Path, *, classes: Sequence[str] | None = None,
         preprocessing: Preprocessing | Mapping[str, Any] | None = None,
         history: list[dict[str, Any]] | None = None) -> Path:
    """Write ``model`` (grown, or loaded with ``surgeon.load``) as a ``grown.pt`` checkpoint,
    atomically, in the format ``surgeon finetune`` writes: ``surgeon.load``, ``surgeon export`` and
    every other stage read it. ``classes``: the class names (needed unless :func:`grow_model` got
    them); ``preprocessing``: a :class:`surgeon.preprocessing.Preprocessing` or a dict of the fields
    to change (``resize``, ``mean``, ``std``; default: the base model's); ``history``: per-epoch
    metrics to keep (JSON-able dicts). Unwraps DistributedDataParallel and ``torch.compile``.

    Example: ``surgeon.save(grown, "runs/grown.pt", classes=["cat", "dog"], preprocessing={"mean": (0.5,) * 3})``
    """
    ckpt = _grown.checkpoint_of(model, classes=classes, preprocessing=_preprocessing(preprocessing, model),
                                history=history)
    return save_checkpoint(path, ckpt)


def export_onnx(grown: str | Path | nn.Module, output: str | Path | None = None, *, precision: str = "fp32",
                opset: int = DEFAULT_OPSET, calib: str | None = None, fold: bool = True,
                batch: str | BatchRange = BatchRange(), classes: Sequence[str] | None = None,
                trust_code: bool = False, quantization: QuantizeOptions | None = None) -> ExportResult:
    """Export a ``grown.pt`` (or a grown model, saved first to a temporary checkpoint) to ONNX, as
    ``surgeon export``: graph passes (``fold=False``: cleanup only), verified against PyTorch with
    ONNX Runtime after export and after each pass, written atomically only if it matches.
    ``precision="fp16"`` keeps GrowNorm in fp32; ``precision="int8"`` quantizes the folded graph
    with ``quantization`` (a :class:`surgeon.QuantizeOptions`; default: its defaults on the ``calib``
    images) and writes it only if it agrees with fp32. ``output`` defaults to ``model.onnx`` beside the
    checkpoint (required for a module). Returns the export's result (``.path``, ``.verifications``,
    ``.passes``).

    Example: ``surgeon.export_onnx("runs/grown.pt", "runs/model.onnx", precision="fp16")``
    """
    from surgeon.export.onnx_export import export_checkpoint

    batch = BatchRange.parse(batch) if isinstance(batch, str) else batch
    kwargs = dict(opset=opset, trust_code=trust_code, calib=calib, fold=fold, precision=precision, batch=batch,
                  quantization=quantization)
    if isinstance(grown, (str, Path)):
        return export_checkpoint(grown, output, **kwargs)
    if output is None:
        raise SurgeonError("export_onnx(model, output): name the ONNX file to write")
    with tempfile.TemporaryDirectory(prefix="surgeon-export-") as tmp:
        path = save(grown, Path(tmp) / "grown.pt", classes=classes)
        return export_checkpoint(path, output, **kwargs)


def build(onnx_path: str | Path, output: str | Path | None = None, *, batch: str | BatchRange | None = None,
          precision: str | None = None, plugin: str = "auto", timing_cache: str | Path | None = None,
          workspace_mb: int | None = None, builder: str = "auto") -> EngineReport:
    """Build a TensorRT engine from an exported ONNX file, as ``surgeon build``: full TensorRT on a
    CUDA GPU (with the ``surgeon::GrowNorm`` plugin where it loads), else TensorRT-RTX CPU-only.
    ``output`` defaults to the ONNX path with ``.engine``; ``batch`` to the range recorded at export.
    Returns the build report (``.engine``, ``.builder``, ``.grownorm_impl``).

    Example: ``surgeon.build("runs/model.onnx", "runs/model.engine", batch="1:8:32")``
    """
    from surgeon.trt.build import build_engine

    return build_engine(onnx_path, output, batch=BatchRange.parse(batch) if isinstance(batch, str) else batch,
                        precision=precision, plugin=plugin, timing_cache=timing_cache, workspace_mb=workspace_mb,
                        builder=builder)
