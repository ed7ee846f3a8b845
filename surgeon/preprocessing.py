"""How images become model inputs: the part of a checkpoint every later stage (export, runtime) reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation-time preprocessing: resize the short side to ``resize``, center-crop ``input_size``,
    scale to [0, 1], normalize with ``mean``/``std`` (RGB order)."""

    input_size: int = 224
    resize: int = 256
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            resize=int(d["resize"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )
