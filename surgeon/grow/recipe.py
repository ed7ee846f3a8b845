"""Growth recipes: plain JSON-able descriptions of what was done to the base model, in order.

A recipe is a list of steps; replaying it on the base architecture rebuilds the grown model's
structure exactly (the weights then come from the checkpoint's state dict).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError
from surgeon.contract import DEFAULT_EPS  # not grow.grownorm: that imports torch, and the CLI reads this module

GROW_KINDS = ("wide", "deep")
INITS = ("random", "net2net", "zero")


def parse_gamma_init(value: str | float) -> float | str:
    """'auto' or a positive number."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SurgeonError(f"--gamma-init must be 'auto' or a number, got {value!r}") from None
    if not 0 < v < math.inf:
        raise SurgeonError(f"--gamma-init must be a positive finite number, got {value!r}")
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class HeadStep:
    """Replace the classifier head ``layer`` with a fresh one for ``classes`` outputs."""

    classes: int
    layer: str = ""  # found automatically when empty
    op: str = field(default="head", init=False)

    def __post_init__(self) -> None:
        if not _is_int(self.classes) or self.classes < 2:
            raise SurgeonError(f"a head needs an integer number of classes >= 2, got {self.classes!r}")
        if not isinstance(self.layer, str):
            raise SurgeonError(f"a head's layer must be a module name, got {self.layer!r}")


@dataclass(frozen=True)
class GrowStep:
    """Widen ``layer`` by ``units`` (``wide``) or insert a block of ``units`` after it (``deep``)."""

    kind: str
    layer: str
    units: int
    init: str = "random"
    norm: bool = True
    gamma_init: float | str = "auto"
    eps: float = DEFAULT_EPS
    op: str = field(default="grow", init=False)

    def __post_init__(self) -> None:
        if self.kind not in GROW_KINDS:
            raise SurgeonError(f"growth kind must be one of {', '.join(GROW_KINDS)}, got {self.kind!r}")
        if self.init not in INITS:
            raise SurgeonError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not _is_int(self.units) or self.units <= 0:
            raise SurgeonError(f"--units must be a positive integer, got {self.units!r}")
        if not self.layer or not isinstance(self.layer, str):
            raise SurgeonError("every growth step needs a --layer")
        if not isinstance(self.norm, bool):
            raise SurgeonError(f"a growth step's norm must be true or false, got {self.norm!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < math.inf:
            raise SurgeonError(f"a growth step's eps must be a positive finite number, got {self.eps!r}")
        object.__setattr__(self, "gamma_init", parse_gamma_init(self.gamma_init))


Step = HeadStep | GrowStep


def step_to_dict(step: Step) -> dict[str, Any]:
    return asdict(step)


def step_from_dict(d: dict[str, Any]) -> Step:
    if not isinstance(d, dict) or d.get("op") not in ("head", "grow"):
        raise SurgeonError(f"not a recipe step: {d!r}")
    cls = HeadStep if d["op"] == "head" else GrowStep
    names = {f.name for f in fields(cls) if f.init}
    unknown = set(d) - names - {"op"}
    if unknown:
        raise SurgeonError(f"unknown keys {sorted(unknown)} in recipe step {d!r}")
    try:
        return cls(**{k: v for k, v in d.items() if k in names})
    except TypeError as exc:
        raise SurgeonError(f"bad recipe step {d!r}: {exc}") from None


def recipe_to_json(steps: list[Step]) -> list[dict[str, Any]]:
    return [step_to_dict(s) for s in steps]


def recipe_from_json(data: Any) -> list[Step]:
    if not isinstance(data, list):
        raise SurgeonError("a recipe is a JSON list of steps")
    return [step_from_dict(d) for d in data]


def read_recipe_file(path: str | Path) -> list[GrowStep]:
    """A user's recipe file: a JSON list of growth steps, e.g.
    ``[{"kind": "wide", "layer": "classifier.0", "units": 1024}, {"kind": "wide", "layer": "classifier.3", "units": 1024}]``
    (``"op": "grow"`` may be omitted)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise SurgeonError(f"recipe file {p} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SurgeonError(f"recipe file {p} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise SurgeonError(f"recipe file {p} must hold a JSON list of growth steps")
    steps = recipe_from_json([{"op": "grow", **d} if isinstance(d, dict) and "op" not in d else d for d in data])
    if any(not isinstance(s, GrowStep) for s in steps):
        raise SurgeonError(f"recipe file {p} may only hold growth steps (the head is replaced automatically)")
    return steps  # type: ignore[return-value]
