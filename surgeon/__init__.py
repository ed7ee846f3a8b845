"""surgeon: grow pretrained networks, fine-tune them, and deploy them.

Developmental transfer learning ("Growing a Brain", Wang, Ramanan, Hebert, CVPR 2017) plus the
model surgery that makes the grown network cheap at inference.

The Python API (docs/API.md)::

    grown = surgeon.grow_model(model, [surgeon.Wide("layer4.1.conv1", 64)], classes=10, calib=loader)
    optimizer = torch.optim.SGD(surgeon.param_groups(grown, lr=1e-3, tune="top"), momentum=0.9)
    surgeon.save(grown, "grown.pt", classes=names)
    surgeon.export_onnx("grown.pt", "model.onnx")

Its names load :mod:`surgeon.api` (and PyTorch) on first use, so ``import surgeon`` and the command
line's ``--help`` stay free of PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from surgeon.errors import SurgeonError, missing_extra

if TYPE_CHECKING:
    from surgeon.api import Deep, Wide, build, export_onnx, grow_model, param_groups, save
    from surgeon.export.quantize import QuantizeOptions
    from surgeon.export.quantize import quantize_file as quantize

_API = ("Wide", "Deep", "grow_model", "param_groups", "save", "export_onnx", "build")
# The deploy side's names: ONNX Runtime and onnx, no PyTorch (they work in the deploy-only install).
_DEPLOY = {"QuantizeOptions": ("surgeon.export.quantize", "QuantizeOptions"),
           "quantize": ("surgeon.export.quantize", "quantize_file")}

__all__ = ["SurgeonError", "__version__", "load", *_API, *_DEPLOY]


def load(path, *, trust_code: bool = False, map_location: str = "cpu"):
    """Rebuild the grown model stored in a ``grown.pt`` checkpoint (see :mod:`surgeon.checkpoint`).

    Example: ``model = surgeon.load("runs/wide/grown.pt"); model.surgeon_checkpoint.classes``
    """
    from surgeon.checkpoint import load_model

    return load_model(path, trust_code=trust_code, map_location=map_location)


def __getattr__(name: str) -> Any:
    # PEP 562: the API's names import PyTorch, so they load on first access, not with the package.
    if name in _API:
        try:
            from surgeon import api
        except ImportError as exc:
            err = missing_extra(exc, f"surgeon.{name}")
            if err is None:
                raise
            raise err from None
        value = getattr(api, name)
        globals()[name] = value
        return value
    if name in _DEPLOY:
        import importlib

        module, attr = _DEPLOY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | set(_DEPLOY))
