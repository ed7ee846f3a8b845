"""The modules growth leaves in a model.

Old and new parameters stay separate tensors so that the pretrained part can be frozen or trained
at the base learning rate while new units train at a multiple of it, and so the exported graph
shows the old/new structure the export passes merge (two branches + Concat → one op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def out_channels(layer: nn.Module) -> int:
    """Number of output units/channels of a Linear/Conv2d-like layer (grown or not)."""
    if isinstance(layer, Widened):
        return out_channels(layer.old) + out_channels(layer.new)
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    raise TypeError(f"{type(layer).__name__} is not a Linear or Conv2d layer")


def in_channels(layer: nn.Module) -> int:
    if isinstance(layer, GroupWidened):
        return in_channels(layer.old) + in_channels(layer.new)
    if isinstance(layer, Widened):
        return in_channels(layer.old)
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels
    raise TypeError(f"{type(layer).__name__} is not a Linear or Conv2d layer")


class Widened(nn.Module):
    """A widened layer: the pretrained ``old`` units and the ``new`` ones read the same input;
    their outputs are concatenated on the channel dimension ``dim``: 1, or -1 for a Linear applied
    to tokens / channels-last maps. ``dim`` is a plain attribute (not in the state dict): a rebuild
    gets it from replaying the recipe, like the module structure."""

    def __init__(self, old: nn.Module, new: nn.Module, dim: int = 1) -> None:
        super().__init__()
        if dim not in (1, -1):
            raise ValueError(f"Widened concatenates on dim 1 or -1, got {dim!r}")
        self.old = old
        self.new = new
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.old(x), self.new(x)], dim=self.dim)

    def extra_repr(self) -> str:
        return "" if self.dim == 1 else f"dim={self.dim}"


class GroupWidened(Widened):
    """A grouped conv grown by whole groups: its input gained channels at the end (``split`` is
    where they start), which only the ``new`` grouped conv reads; its new output channels follow the
    old ones. The pretrained groups see exactly their old inputs. ``split`` is a plain attribute,
    like ``dim``: a rebuild gets it from replaying the recipe."""

    def __init__(self, old: nn.Conv2d, new: nn.Conv2d, split: int) -> None:
        super().__init__(old, new, dim=1)
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.old(x[:, : self.split]), self.new(x[:, self.split:])], dim=1)

    def extra_repr(self) -> str:
        return f"split={self.split}"


class SplitBatchNorm(nn.Module):
    """A BatchNorm whose input gained channels: the pretrained statistics stay with the old ones.

    ``bn_only``: ``old`` is a BatchNorm with an activation inside (timm's BatchNormAct2d) of which
    only the normalization runs here; growth put its dropout and activation in a module after this
    one, so both halves get them and the export still sees two BatchNorms and a Concat to merge.
    A plain attribute, like ``Widened.dim``: a rebuild gets it from replaying the recipe."""

    def __init__(self, old: nn.Module, new: nn.modules.batchnorm._BatchNorm, bn_only: bool = False) -> None:
        super().__init__()
        self.old = old
        self.new = new
        self.bn_only = bn_only

    @property
    def num_features(self) -> int:
        return self.old.num_features + self.new.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.old.num_features
        head = x[:, :c]
        old = nn.modules.batchnorm._BatchNorm.forward(self.old, head) if self.bn_only else self.old(head)
        return torch.cat([old, self.new(x[:, c:])], dim=1)

    def extra_repr(self) -> str:
        return "bn_only=True" if self.bn_only else ""


class _ExtendedInput:
    """Shared by the Extended layers: ``weight`` keeps the pretrained input columns (dim 1),
    ``weight_extra`` holds the columns for inputs added by growth (appended at the end)."""

    weight: nn.Parameter
    weight_extra: nn.Parameter
    bias: nn.Parameter | None

    def _take_weights(self, base: nn.Module, extra: int) -> None:
        prev = base.weight_extra.detach() if isinstance(base, _ExtendedInput) else base.weight.detach()[:, :0]
        shape = list(base.weight.shape)
        shape[1] = extra
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.weight_extra = nn.Parameter(torch.cat([prev, prev.new_zeros(shape)], dim=1))
        self.bias = nn.Parameter(base.bias.detach().clone()) if base.bias is not None else None

    def full_weight(self) -> torch.Tensor:
        return torch.cat([self.weight, self.weight_extra], dim=1)


class ExtendedLinear(_ExtendedInput, nn.Linear):
    """A Linear whose input gained features at the end (new columns start at zero; the caller fills them)."""

    def __init__(self, base: nn.Linear, extra: int) -> None:
        nn.Linear.__init__(self, base.in_features + extra, base.out_features, bias=base.bias is not None)
        self._take_weights(base, extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.full_weight(), self.bias)


class ExtendedConv2d(_ExtendedInput, nn.Conv2d):
    """A Conv2d (groups=1) whose input gained channels at the end; see :class:`ExtendedLinear`."""

    def __init__(self, base: nn.Conv2d, extra: int) -> None:
        nn.Conv2d.__init__(self, base.in_channels + extra, base.out_channels, base.kernel_size, stride=base.stride,
                           padding=base.padding, dilation=base.dilation, groups=1, bias=base.bias is not None,
                           padding_mode=base.padding_mode)
        self._take_weights(base, extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.full_weight(), self.bias)


SURGEON_LEAF_MODULES: tuple[type[nn.Module], ...] = (Widened, GroupWidened, SplitBatchNorm, ExtendedLinear, ExtendedConv2d)
