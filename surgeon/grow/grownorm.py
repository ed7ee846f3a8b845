"""GrowNorm: the grouped L2-normalize-and-scale op of developmental transfer learning.

For ``x`` of shape ``[N, C, *spatial]`` with channels split into groups (old units, new units; one
group for a deepened layer)::

    x̂_g = x_g / max(‖x_g‖₂, eps)     (norm over the group's channels, per sample and position)
    y_c = γ_c · x̂_c                   (one learned scale per channel)

This composite is the reference implementation (the CPU path and the oracle for fused kernels);
on CUDA, :class:`GrowNorm` runs the fused Triton kernel of ``plugins/`` (``surgeon_plugins``).
``max(‖x‖, eps)`` is computed as ``sqrt(max(‖x‖², eps²))`` so an all-zero group (common after a
ReLU) has a finite gradient: the clamp cuts the gradient through the norm instead of 0·inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function

DEFAULT_EPS = 1e-6


def _check_groups(groups: Sequence[int]) -> tuple[int, ...]:
    groups = tuple(int(g) for g in groups)
    if not groups or any(g <= 0 for g in groups):
        raise ValueError(f"GrowNorm groups must be positive channel counts, got {groups}")
    return groups


def grow_norm(
    x: torch.Tensor,
    groups: Sequence[int],
    gamma: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Functional GrowNorm over dim 1 of a rank ≥ 2 tensor; reductions run in at least fp32."""
    operands = (x,) if gamma is None else (x, gamma)
    if has_torch_function(operands):  # torch.fx proxies: record one call instead of tracing the checks
        return handle_torch_function(grow_norm, operands, x, groups, gamma=gamma, eps=eps)
    if not eps > 0:
        raise ValueError(f"GrowNorm eps must be positive, got {eps}")
    if x.dim() < 2:
        raise ValueError(f"GrowNorm needs a tensor of rank >= 2 ([N, C, ...]), got shape {tuple(x.shape)}")
    groups = _check_groups(groups)
    if x.shape[1] != sum(groups):
        raise ValueError(f"GrowNorm groups {groups} sum to {sum(groups)} but the input has {x.shape[1]} channels")
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    parts = torch.split(work, list(groups), dim=1)
    scales = [p.pow(2).sum(dim=1, keepdim=True).clamp_min(eps * eps).rsqrt() for p in parts]
    if gamma is not None:  # fold γ into the per-group scale: one multiply per element
        g = gamma.to(work.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))
        scales = [s * gg for s, gg in zip(scales, torch.split(g, list(groups), dim=1))]
    scaled = [p * s for p, s in zip(parts, scales)]
    y = scaled[0] if len(scaled) == 1 else torch.cat(scaled, dim=1)
    return y.to(x.dtype)


_FUSED: dict[str, object] = {"enabled": True}


def use_fused_kernel(enabled: bool) -> None:
    """On CUDA, GrowNorm modules run the fused Triton kernel (forward and backward) when it can be
    imported; ``use_fused_kernel(False)`` makes them run the composite instead (for comparisons)."""
    _FUSED["enabled"] = bool(enabled)


def fused_kernel():
    """The fused kernel's ``grow_norm_triton(x, groups, gamma, eps)``, or None (disabled, or no
    Triton / no ``surgeon_plugins``)."""
    if not _FUSED["enabled"]:
        return None
    if "fn" not in _FUSED:
        try:
            from surgeon_plugins.grownorm_kernel import grow_norm_triton
        except ImportError:
            grow_norm_triton = None
        _FUSED["fn"] = grow_norm_triton
    return _FUSED["fn"]


@torch.library.custom_op("surgeon::grow_norm", mutates_args=())
def grow_norm_op(x: torch.Tensor, gamma: torch.Tensor, groups: list[int], eps: float) -> torch.Tensor:
    """GrowNorm as one opaque op, so ``torch.export`` (and the ONNX exporter) see a single node."""
    return grow_norm(x, groups, gamma, eps)


@grow_norm_op.register_fake
def _(x: torch.Tensor, gamma: torch.Tensor, groups: list[int], eps: float) -> torch.Tensor:
    return torch.empty_like(x)


class GrowNorm(nn.Module):
    """Module form of :func:`grow_norm` with a learned per-channel ``gamma``.

    ``gamma_init`` is kept for calibration: ``"auto"`` (set from data by
    :func:`surgeon.grow.gamma.calibrate_gamma`) or a constant. ``role`` says how ``auto`` reads the
    data: ``"wide"`` (group 0 holds the pretrained units) or ``"deep"`` (one group of new units).
    """

    def __init__(
        self,
        groups: Sequence[int],
        eps: float = DEFAULT_EPS,
        scale: bool = True,
        gamma_init: float | str = "auto",
        role: str = "wide",
    ) -> None:
        super().__init__()
        self.groups = _check_groups(groups)
        if not eps > 0:
            raise ValueError(f"GrowNorm eps must be positive, got {eps}")
        self.eps = float(eps)
        self.gamma_init = gamma_init
        self.role = role
        channels = sum(self.groups)
        if scale:
            start = 1.0 if gamma_init == "auto" else float(gamma_init)
            self.gamma: nn.Parameter | None = nn.Parameter(torch.full((channels,), start))
        else:
            self.register_parameter("gamma", None)

    @property
    def channels(self) -> int:
        return sum(self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            gamma = self.gamma if self.gamma is not None else x.new_ones(self.channels)
            return grow_norm_op(x, gamma, list(self.groups), self.eps)
        if not isinstance(x, torch.fx.Proxy) and x.is_cuda and fused_kernel() is not None:  # fx traces the composite
            return fused_kernel()(x, self.groups, self.gamma, self.eps)
        return grow_norm(x, self.groups, self.gamma, self.eps)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, eps={self.eps}, scale={self.gamma is not None}, role={self.role}"
