"""Fine-tuning settings: the options of ``surgeon finetune`` as one JSON-able record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from surgeon.errors import SurgeonError
from surgeon.grow.recipe import GrowStep, recipe_from_json, recipe_to_json
from surgeon.spec import DEFAULT_MAX_IMAGE_PIXELS

TUNE_MODES = ("new", "top", "all")


@dataclass
class FinetuneConfig:
    model: str = "surgeon:digitnet"
    weights: str = "DEFAULT"
    data: str = "builtin:digits-target"
    output_dir: str = "runs/finetune"
    grow: list[GrowStep] = field(default_factory=list)
    baseline: bool = False
    head: str | None = None
    input_size: int | None = None
    tune: str = "all"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    lr_new_mult: float = 10.0
    momentum: float = 0.9
    wd: float = 5e-4
    lr_step: int | None = None        # epochs between ÷10 decays; default: once, at 2/3 of the run
    lr_gamma: float = 0.1
    workers: int = 2
    amp: bool = False
    device: str = "auto"
    seed: int = 0
    val_split: float = 0.2
    augment: bool = True
    skip_bad_images: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    calib_samples: int = 256
    trust_code: bool = False
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.tune not in TUNE_MODES:
            raise SurgeonError(f"--tune must be one of {', '.join(TUNE_MODES)}, got {self.tune!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise SurgeonError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise SurgeonError("--lr must be positive")
        if self.baseline and self.grow:
            raise SurgeonError("--baseline fine-tunes without growth; drop --grow/--layer/--units (or --recipe)")
        if self.lr_step is not None and self.lr_step < 1:
            raise SurgeonError("--lr-step must be at least 1 epoch")

    @property
    def step_size(self) -> int:
        return self.lr_step or max(1, round(2 * self.epochs / 3))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grow"] = recipe_to_json(self.grow)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["grow"] = recipe_from_json(kw.get("grow", []))
        return cls(**kw)
