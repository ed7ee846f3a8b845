"""The grown checkpoint (``grown.pt``): one file that ``torch.load(..., weights_only=True)`` reads.

It holds only tensors and plain JSON-able data — never pickled modules — so opening an untrusted
checkpoint cannot run code. The model is rebuilt by replaying the growth recipe on the base
architecture and loading the state dict.
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from surgeon import __version__
from surgeon.errors import CheckpointError, GrowthError, SurgeonError, first_line
from surgeon.fileio import atomic_write
from surgeon.grow.analysis import trace
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import Step, recipe_from_json, recipe_to_json
from surgeon.log import LOG
from surgeon.preprocessing import Preprocessing

FORMAT = "surgeon.checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """Everything in a ``grown.pt`` except the tensors' meaning, which the recipe gives."""

    model: str                                   # architecture spec, e.g. torchvision:resnet18
    weights: str                                 # where the base weights came from
    recipe: list[Step]
    classes: list[str]
    preprocessing: Preprocessing
    state_dict: dict[str, torch.Tensor]
    history: dict[str, Any] = field(default_factory=dict)   # per-epoch metrics and γ statistics
    train_args: dict[str, Any] = field(default_factory=dict)
    surgeon_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "surgeon_version": self.surgeon_version,
            "base": {"model": self.model, "weights": self.weights},
            "recipe": recipe_to_json(self.recipe),
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "state_dict": self.state_dict,
            "history": self.history,
            "train_args": self.train_args,
        }

    def build_model(self, *, trust_code: bool = False, share_weights: bool = False) -> fx.GraphModule:
        """Replay the recipe on the base architecture and load the weights. ``share_weights``: the
        model's parameters become the checkpoint's tensors instead of copies, and the architecture is
        built without initializing its weights — one copy of the weights in memory, for inference
        (training would update this checkpoint's tensors too)."""
        built = None
        # Shared weights: build without writing any weight (on the meta device, or at least with
        # the base architecture uninitialized); each attempt refused or failed falls back to the next.
        failures = []
        for mode in ("meta", "uninitialized") if share_weights else ():
            try:
                built = self._grow(trust_code, mode)
            except SurgeonError as exc:
                if not isinstance(exc, GrowthError):
                    raise  # the user's to fix (code not trusted, unknown architecture): the full build says the same
                failures.append(f"{mode}: {first_line(exc)[:200]}")
            except Exception as exc:  # a model this way of building cannot handle: say so, then build it whole
                failures.append(f"{mode}: {type(exc).__name__}: {first_line(exc)[:200]}")
            if built is not None:
                break
        if failures and built is None:
            LOG.warning("rebuilding %s with one copy of the weights failed (%s); it is built with initialized "
                        "weights first, which needs more memory", self.model,
                        "; ".join(failures))
        gm, state = built or self._grow(trust_code, "ordinary")  # type: ignore[misc]
        try:
            gm.load_state_dict(self.state_dict, assign=share_weights)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise CheckpointError(f"the checkpoint's weights do not fit its recipe: {(lines[1] if len(lines) > 1 else lines[0])[:300]}") from None
        gm.surgeon_state = state  # type: ignore[attr-defined]
        gm.surgeon_checkpoint = self  # type: ignore[attr-defined]
        gm.eval()
        return gm

    def _grow(self, trust_code: bool, mode: str) -> tuple[fx.GraphModule, GrowthState] | None:
        """The grown architecture. ``mode``: "ordinary" (initialized weights); "uninitialized"
        (the base's weights allocated but never written: their pages cost nothing until
        load_state_dict(assign=True) replaces them); "meta" (the growth too). None where a buffer
        is not in the state dict (its value would be lost)."""
        from surgeon.zoo import build_architecture

        if mode == "ordinary":
            arch = build_architecture(self.model, trust_code=trust_code)
        else:
            with torch.device("meta"):
                arch = build_architecture(self.model, trust_code=trust_code)
            if any(m._non_persistent_buffers_set for m in arch.modules()):
                return None
            if mode == "uninitialized":
                arch = arch.to_empty(device="cpu")
        with torch.device("meta") if mode == "meta" else contextlib.nullcontext():
            gm = trace(arch)
            state = GrowthState(input_size=self.preprocessing.input_size)
            apply_steps(gm, self.recipe, state)
        if mode == "meta":
            if any(m._non_persistent_buffers_set for m in gm.modules()):
                return None
            gm = gm.to_empty(device="cpu")
        return gm, state


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically."""
    data = ckpt.to_dict()
    data["state_dict"] = {k: v.detach().cpu().clone() for k, v in ckpt.state_dict.items()}
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


def _is_plain_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(3)
    return len(head) == 3 and head[0] == 0x80 and head[1] in (4, 5) and head[2] == 0x95  # PROTO n, FRAME


def read_raw(path: str | Path, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for missing, corrupt and unsafe files."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory, not a checkpoint file")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "unsupported global" in msg.lower():  # torch 2.4-2.13: "Unsupported global", 2.14: "unsupported GLOBAL"
            raise CheckpointError(
                f"{p} contains pickled Python objects, which surgeon refuses to load (loading them could run code)"
            ) from None
        if "unsupported operand" in msg.lower() and _is_plain_pickle(p):  # pickle.dump's protocol 4/5 framing
            raise CheckpointError(f"{p} is a plain Python pickle, not a torch checkpoint; surgeon does not unpickle files "
                                  "(save weights with torch.save(model.state_dict(), path))") from None
        raise CheckpointError(f"{p} is corrupt or not a torch checkpoint (torch.load cannot read it)") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = first_line(exc)
        raise CheckpointError(f"{p} is corrupt or not a torch checkpoint ({first})") from None


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> Checkpoint:
    """Read and validate a surgeon checkpoint (without building the model)."""
    return checkpoint_from_dict(read_raw(path, map_location), path)


def checkpoint_from_dict(raw: Any, path: str | Path) -> Checkpoint:
    p = Path(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        hint = " (it looks like a plain state dict: pass it as --weights)" if isinstance(raw, dict) and raw and all(
            isinstance(v, torch.Tensor) for v in raw.values()) else ""
        raise CheckpointError(f"{p} is not a surgeon checkpoint{hint}")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{p} has checkpoint format version {version!r}; this surgeon ({__version__}) reads up to {FORMAT_VERSION}: upgrade surgeon")
    try:
        base = raw["base"]
        ckpt = Checkpoint(
            model=str(base["model"]),
            weights=str(base.get("weights", "")),
            recipe=recipe_from_json(raw["recipe"]),
            classes=[str(c) for c in raw["classes"]],
            preprocessing=Preprocessing.from_dict(raw["preprocessing"]),
            state_dict=dict(raw["state_dict"]),
            history=dict(raw.get("history") or {}),
            train_args=dict(raw.get("train_args") or {}),
            surgeon_version=str(raw.get("surgeon_version", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{p} is a damaged surgeon checkpoint (missing or bad field: {exc})") from None
    if not all(isinstance(v, torch.Tensor) for v in ckpt.state_dict.values()):
        raise CheckpointError(f"{p} is a damaged surgeon checkpoint (its state dict holds non-tensors)")
    return ckpt


def load_model(path: str | Path, *, trust_code: bool = False, map_location: str = "cpu") -> fx.GraphModule:
    """Rebuild the grown model from ``path``; see :meth:`Checkpoint.build_model`."""
    return read_checkpoint(path, map_location).build_model(trust_code=trust_code)
