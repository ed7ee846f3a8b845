"""Initialisation of new units and of the weights that read them.

- ``random`` (the paper): new units get their layer type's default init; the consumers' new
  columns are drawn with the spread of the existing columns, so new inputs start at a comparable
  influence.
- ``net2net``: each new unit copies a random existing unit; the copied unit's outgoing weights are
  split between it and its copies with random positive shares that sum to one. The split weights
  differ (so the copies do not stay identical) and the function before normalization is preserved
  exactly.
- ``zero``: new units are random, their outgoing weights are zero.
"""

from __future__ import annotations

import torch


def copy_mapping(channels: int, units: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which existing channel each new unit copies: distinct channels first, then repeats."""
    # Index bookkeeping stays on the CPU whatever the default device (a rebuild runs on meta).
    first = torch.randperm(channels, generator=generator, device="cpu")[: min(units, channels)]
    if units <= channels:
        return first
    rest = torch.randint(channels, (units - channels,), generator=generator, device="cpu")
    return torch.cat([first, rest])


def split_shares(channels: int, mapping: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive shares per source channel: ``(old_share[C], new_share[k])`` with
    ``old_share[c] + sum(new_share[i] for i copying c) == 1`` for every copied channel ``c``
    (and ``old_share[c] == 1`` for channels nobody copies)."""
    old_share = torch.ones(channels, device="cpu")
    new_share = torch.empty(len(mapping), device="cpu")
    for c in torch.unique(mapping).tolist():
        copies = (mapping == c).nonzero().flatten()
        # Shares bounded away from 0 (Dirichlet-like, concentration high enough to avoid dead copies).
        raw = torch.rand(len(copies) + 1, generator=generator, device="cpu") + 0.5
        raw = raw / raw.sum()
        old_share[c] = raw[0]
        new_share[copies] = raw[1:]
    return old_share, new_share


def extra_columns(
    full: torch.Tensor,
    units: int,
    positions: int,
    init: str,
    mapping: torch.Tensor | None,
    shares: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New input columns for a consumer whose input gains ``units`` channels × ``positions``.

    ``full`` is the consumer's current weight with inputs on dim 1 (channel-major when
    ``positions`` > 1). Returns ``(updated_full, extra)``; only net2net changes ``full``.
    """
    shape = list(full.shape)
    shape[1] = units * positions
    # The new columns go where the consumer's weight lives (CPU, CUDA, meta), in its dtype: the caller
    # concatenates them with it. Random values are drawn on the CPU (as the new modules' own inits
    # are) and then moved, so a seed grows the same weights on every device; meta draws nothing.
    draw = full.device if full.is_meta else torch.device("cpu")
    if init == "zero":
        return full, torch.zeros(shape, dtype=full.dtype, device=full.device)
    if init == "random":
        std = float(full.std()) if full.numel() > 1 and not full.is_meta else 1.0  # meta: shapes only (a rebuild)
        extra = torch.randn(shape, dtype=full.dtype, device=draw) * (std if std > 0 else 1.0)
        return full, extra.to(full.device)
    assert mapping is not None and shares is not None
    old_share, new_share = shares
    full = full.clone()
    view = (1, -1) + (1,) * (full.dim() - 2)
    # Column j of channel c is c * positions + j.
    old_cols = old_share.repeat_interleave(positions).to(full.device, full.dtype)
    src_cols = (mapping[:, None] * positions + torch.arange(positions, device=mapping.device)).flatten().to(full.device)
    extra = full[:, src_cols] * new_share.repeat_interleave(positions).to(full.device, full.dtype).reshape(view)
    full = full * old_cols.reshape(view)
    return full, extra
