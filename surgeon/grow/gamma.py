"""γ initialisation from data (``--gamma-init auto``).

The goal is that growth does not change the scale of what the next layer reads:

- wide, old group: γ = E‖x_old‖, so the pretrained consumer first sees inputs of the magnitude it
  was trained on (normalized old activations times their typical norm);
- wide, new groups: γ = E‖x_old‖ · √(C_new / C_old), so each new unit has the same RMS magnitude
  as an old unit and is not a slow learner (the paper's point);
- deep (one group of k units after a layer of C channels): γ = E‖x_in‖ · √(k / C), the per-unit
  magnitude of what the consumer read before the block was inserted.

Norms are taken over the channel axis (dim 1, or the last dim for tokens / channels-last maps)
and averaged over the samples and positions of one calibration batch. GrowNorms are
calibrated in graph order during a single forward, so a norm downstream of another sees its
calibrated output.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import fx

from surgeon.grow.grownorm import GrowNorm


def _mean_norm(x: torch.Tensor, dim: int = 1) -> float:
    """L2 norm over the channels ``dim``, averaged over every other dim (samples, positions)."""
    return float(torch.linalg.vector_norm(x.float(), dim=dim).mean())


def gamma_values(norm: GrowNorm, x: torch.Tensor, block_input: torch.Tensor | None) -> torch.Tensor:
    """The auto γ for ``norm`` given its input ``x`` (and, for a deep block, the block's input)."""
    dim = 1 if norm.axis == 1 else x.dim() - 1
    if norm.role == "deep":
        assert block_input is not None
        in_dim = 1 if norm.axis == 1 else block_input.dim() - 1
        ref, ref_channels = _mean_norm(block_input, in_dim), block_input.shape[in_dim]
        per_unit = ref / math.sqrt(ref_channels)
        return torch.full((norm.channels,), per_unit * math.sqrt(norm.channels))
    c_old = norm.groups[0]
    ref = _mean_norm(x.narrow(dim, 0, c_old), dim)
    per_unit = ref / math.sqrt(c_old)
    return torch.cat([torch.full((c_old,), ref)] + [torch.full((g,), per_unit * math.sqrt(g)) for g in norm.groups[1:]])


class _Calibrator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, only_auto: bool) -> None:
        super().__init__(gm, garbage_collect_values=False)  # deep norms read their block's input
        self.only_auto = only_auto
        self.done: dict[str, list[float]] = {}

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        m = self.fetch_attr(target)
        if isinstance(m, GrowNorm) and m.gamma is not None and (m.gamma_init == "auto" or not self.only_auto):
            x = args[0]
            block_input = None
            if m.role == "deep":
                block_node = self._current.args[0]  # the deep block feeding this norm
                block_input = self.env[block_node.args[0]]
            values = gamma_values(m, x, block_input)
            if not torch.isfinite(values).all() or float(values.min()) <= 0:
                warnings.warn(f"{target}: the calibration batch gives no signal (all-zero activations); γ stays 1", stacklevel=2)
                values = torch.ones_like(values)
            with torch.no_grad():
                m.gamma.copy_(values.to(m.gamma))
            self.done[str(target)] = [float(values[0]), float(values[-1])]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        self._current = n
        return super().run_node(n)


@torch.no_grad()
def calibrate_gamma(gm: fx.GraphModule, images: torch.Tensor, only_auto: bool = True) -> dict[str, list[float]]:
    """Set γ of every ``auto`` GrowNorm from one batch; returns ``{norm: [γ_old, γ_new]}``."""
    was_training = gm.training
    gm.eval()
    try:
        cal = _Calibrator(gm, only_auto)
        cal.run(images)
    finally:
        gm.train(was_training)
    return cal.done
