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
    model: str                        # architecture spec the recipe replays on
    weights: str                      # weight source recorded in the new checkpoint
    preprocessing: Preprocessing
    recipe: list[Step]                # steps already applied (from a checkpoint), else []
    state: GrowthState | None = None  # the checkpoint's growth state, if any


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
        return Source(gm, ckpt.model, spec, ckpt.preprocessing, list(ckpt.recipe), gm.surgeon_state)  # type: ignore[attr-defined]
    base = load_base(spec, weights, input_size, meta=meta)
    return Source(base.module, base.model, base.weights, base.preprocessing, [])
