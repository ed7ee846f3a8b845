"""GrowNorm: the grouped L2-normalize-and-scale op of developmental transfer learning.

For ``x`` of shape ``[N, C, *spatial]`` (``axis=1``, the default) or ``[N, ..., C]`` (``axis=-1``:
tokens, channels-last MLPs) with channels split into groups (old units, new units; one group for a
deepened layer)::

    x̂_g = x_g / max(‖x_g‖₂, eps)     (norm over the group's channels, per sample and position)
    y_c = γ_c · x̂_c                   (one learned scale per channel)

This composite is the reference implementation (the CPU path and the oracle for fused kernels);
on CUDA, :class:`GrowNorm` runs the fused Triton kernel of ``plugins/`` (``surgeon_plugins``);
for ``axis=-1`` it runs the kernel's ``[N, C]`` layout on ``x`` viewed as ``[-1, C]``.
``max(‖x‖, eps)`` is computed as ``sqrt(max(‖x‖², eps²))`` so an all-zero group (common after a
ReLU) has a finite gradient: the clamp cuts the gradient through the norm instead of 0·inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function

from surgeon.contract import AXES, DEFAULT_EPS  # the contract's plain values (torch-free), re-exported


def _check_groups(groups: Sequence[int]) -> tuple[int, ...]:
    groups = tuple(int(g) for g in groups)
    if not groups or any(g <= 0 for g in groups):
        raise ValueError(f"GrowNorm groups must be positive channel counts, got {groups}")
    return groups


def _check_axis(axis: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or axis not in AXES:
        raise ValueError(f"GrowNorm axis must be 1 ([N, C, ...]) or -1 ([N, ..., C]), got {axis!r}")
    return axis


def grow_norm(
    x: torch.Tensor,
    groups: Sequence[int],
    gamma: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    axis: int = 1,
) -> torch.Tensor:
    """Functional GrowNorm over the channel ``axis`` (1 or -1) of a rank ≥ 2 tensor; reductions run
    in at least fp32."""
    operands = (x,) if gamma is None else (x, gamma)
    if has_torch_function(operands):  # torch.fx proxies: record one call instead of tracing the checks
        return handle_torch_function(grow_norm, operands, x, groups, gamma=gamma, eps=eps, axis=axis)
    if not eps > 0:
        raise ValueError(f"GrowNorm eps must be positive, got {eps}")
    axis = _check_axis(axis)
    if x.dim() < 2:
        layout = "[N, C, ...]" if axis == 1 else "[N, ..., C]"
        raise ValueError(f"GrowNorm needs a tensor of rank >= 2 ({layout}), got shape {tuple(x.shape)}")
    groups = _check_groups(groups)
    dim = 1 if axis == 1 else x.dim() - 1
    if x.shape[dim] != sum(groups):
        raise ValueError(f"GrowNorm groups {groups} sum to {sum(groups)} but the input has {x.shape[dim]} channels "
                         f"(axis {axis})")
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    parts = torch.split(work, list(groups), dim=dim)
    scales = [p.pow(2).sum(dim=dim, keepdim=True).clamp_min(eps * eps).rsqrt() for p in parts]
    if gamma is not None:  # fold γ into the per-group scale: one multiply per element
        view = [1] * x.dim()
        view[dim] = -1
        g = gamma.to(work.dtype).reshape(view)
        scales = [s * gg for s, gg in zip(scales, torch.split(g, list(groups), dim=dim))]
    scaled = [p * s for p, s in zip(parts, scales)]
    y = scaled[0] if len(scaled) == 1 else torch.cat(scaled, dim=dim)
    return y.to(x.dtype)


def fused_grow_norm(kernel, x: torch.Tensor, groups: Sequence[int], gamma: torch.Tensor | None, eps: float,
                    axis: int = 1) -> torch.Tensor:
    """``kernel`` (the fused ``grow_norm_triton``, which normalizes dim 1) over the channel ``axis``:
    axis -1 runs its ``[N, C]`` layout on ``x`` viewed as ``[-1, C]`` (rows of C contiguous)."""
    if _check_axis(axis) == 1 or x.dim() == 2:
        return kernel(x, groups, gamma, eps)
    rows = x.contiguous().view(-1, x.shape[-1])
    return kernel(rows, groups, gamma, eps).view(x.shape)


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
def grow_norm_op(x: torch.Tensor, gamma: torch.Tensor, groups: list[int], eps: float, axis: int = 1) -> torch.Tensor:
    """GrowNorm as one opaque op, so ``torch.export`` (and the ONNX exporter) see a single node."""
    return grow_norm(x, groups, gamma, eps, axis)


@grow_norm_op.register_fake
def _(x: torch.Tensor, gamma: torch.Tensor, groups: list[int], eps: float, axis: int = 1) -> torch.Tensor:
    return torch.empty_like(x)


def _runs_fused(x: torch.Tensor) -> bool:
    """Whether a GrowNorm module sends ``x`` to the fused kernel (CUDA tensors; fx traces the composite)."""
    return not isinstance(x, torch.fx.Proxy) and x.is_cuda and fused_kernel() is not None


class GrowNorm(nn.Module):
    """Module form of :func:`grow_norm` with a learned per-channel ``gamma``.

    ``gamma_init`` is kept for calibration: ``"auto"`` (set from data by
    :func:`surgeon.grow.gamma.calibrate_gamma`) or a constant. ``role`` says how ``auto`` reads the
    data: ``"wide"`` (group 0 holds the pretrained units) or ``"deep"`` (one group of new units).
    ``axis`` is the channel axis (1 or -1), a plain attribute: not in the state dict, so a model
    rebuilt from its recipe gets it from the recipe, as it gets ``groups``.
    """

    def __init__(
        self,
        groups: Sequence[int],
        eps: float = DEFAULT_EPS,
        scale: bool = True,
        gamma_init: float | str = "auto",
        role: str = "wide",
        axis: int = 1,
    ) -> None:
        super().__init__()
        self.groups = _check_groups(groups)
        self.axis = _check_axis(axis)
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
            return grow_norm_op(x, gamma, list(self.groups), self.eps, self.axis)
        if _runs_fused(x):
            return fused_grow_norm(fused_kernel(), x, self.groups, self.gamma, self.eps, self.axis)
        return grow_norm(x, self.groups, self.gamma, self.eps, self.axis)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, eps={self.eps}, scale={self.gamma is not None}, role={self.role}, "
                f"axis={self.axis}")
