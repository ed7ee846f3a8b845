"""What ``--model`` names, ready to grow: a base network from :mod:`surgeon.zoo`, or a surgeon
checkpoint to grow further.

Above both the zoo and :mod:`surgeon.checkpoint` (which rebuilds its architecture through the zoo),
so neither imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from surgeon.checkpoint import read_checkpoint
from surgeon.errors import SurgeonError
from surgeon.grow.ops import GrowthState
from surgeon.grow.recipe import Step
from surgeon.preprocessing import Preprocessing, check_input_size
from surgeon.zoo import load_base


@dataclass
class Source:
    """A model to grow: a base network, or a surgeon checkpoint to grow further."""

    module: nn.Module                 # a GraphModule when it comes from a checkpoint
    model: str | None                 # architecture spec the recipe replays on (None: cannot be recorded)
    weights: str                      # weight source recorded in the new checkpoint
    preprocessing: Preprocessing
    recipe: list[Step]                # steps already applied (from a checkpoint), else []
    state: GrowthState | None = None  # the checkpoint's growth state, if any
    classes: list[str] | None = None  # the checkpoint's class names, if any
    unrecorded: str = ""              # why ``model`` is None: said when the grown model is saved


def is_checkpoint_spec(spec: str) -> bool:
    return ":" not in spec and Path(spec).suffix in (".pt", ".pth")


def open_model(spec: str, weights: str = "DEFAULT", input_size: int | None = None, *, trust_code: bool = False,
               meta: bool = False) -> Source:
    """``--model``/``--weights`` to a model ready for growth (see the module docstring for the forms).
    ``meta``: see :func:`load_base` (a checkpoint is always built with its weights)."""
    if input_size is not None:
        check_input_size(input_size)
    if is_checkpoint_spec(spec):
        ckpt = read_checkpoint(spec)  # says "does not exist" for a missing file
        if input_size and input_size != ckpt.preprocessing.input_size:
            raise SurgeonError(f"{spec} was trained at {ckpt.preprocessing.input_size}px; --input-size cannot change that")
        gm = ckpt.build_model(trust_code=trust_code)
        return Source(gm, ckpt.model, spec, ckpt.preprocessing, list(ckpt.recipe), gm.surgeon_state,  # type: ignore[attr-defined]
                      classes=list(ckpt.classes))
    base = load_base(spec, weights, input_size, meta=meta)
    return Source(base.module, base.model, base.weights, base.preprocessing, [])


def open_module(module: nn.Module, arch: str | None = None, input_size: int | None = None,
                weights: str = "module") -> Source:
    """A module built in Python, ready for growth. Its architecture spec is ``arch`` (checked: it must
    build the same layers) or found from its class (:mod:`surgeon.zoo.identify`); where neither works
    the model still grows and trains, and saving it says why it cannot be rebuilt. ``input_size``:
    the side the model reads (default: the identified architecture's)."""
    from surgeon.zoo.identify import check_spec, identify

    if not isinstance(module, nn.Module):
        raise SurgeonError(f"the model to grow must be a torch.nn.Module or a spec such as 'torchvision:resnet18', "
                           f"got {type(module).__name__}")
    if arch is not None:
        spec, pre, why = arch, check_spec(module, arch), ""
    else:
        found = identify(module)
        spec, pre, why = found.spec, found.preprocessing, found.why
    if pre is None:
        if input_size is None:
            raise SurgeonError(f"pass input_size= (the image side {type(module).__name__} reads): surgeon needs it to "
                               "trace the model's shapes")
        pre = Preprocessing().at_size(input_size)
    elif input_size is not None:
        pre = pre.at_size(check_input_size(input_size))
    return Source(module, spec, weights, pre, [], unrecorded=why)
