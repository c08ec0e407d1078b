"""Mask-unit selection with static shapes: what the official models do with boolean
indexing (a host sync and a shape that depends on the data), done with index gathers
and scatters whose sizes come from counts known on the host (the MAE mask ratio, or a
tensor's shape). Same values and gradients; and torch.compile(fullgraph=True) can trace
them. One copy, shared by the drop-in models and the patched official/transformers ones.

Masks are bool [B, U] (or [B, N]), True selected, with the same count in every row.
"""

from __future__ import annotations

from typing import Optional

import torch


def selected(mask: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] indices of each row's True entries, ascending. A stable descending sort
    of the 0/1 mask puts the selected entries first, in their order."""
    return torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :count]


def check_mask(mask, batch: int, units: int, kept: Optional[int], where: str) -> int:
    """Validate a keep-mask [B, U] and return the units kept per sample.

    ``kept`` None: read from the mask, every sample must agree (one host sync, as the
    official indexing does; the official model would mix tokens across samples instead).
    ``kept`` given: no sync; a mask keeping another count fails an on-device assert."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, units):
        raise ValueError(
            f"{where}: mask must be a bool tensor of shape (B, num_mask_units)=({batch}, {units}), "
            f"got {getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
        )
    if kept is not None:
        torch._assert_async((mask.sum(dim=1) == kept).all(), f"{where}: every sample must keep {kept} mask units")
        return kept
    counts = mask.sum(dim=1)
    if batch > 1 and bool((counts != counts[0]).any()):
        raise ValueError(f"{where}: every sample must keep the same number of mask units, got {counts.tolist()}")
    return int(counts[0])


def keep_units(x: torch.Tensor, mask: torch.Tensor, kept: int) -> torch.Tensor:
    """The tokens of the kept units, in order: x [B, N, C] unrolled (token t * U + w is
    position t of unit w) -> [B, (N // U) * kept, C], as ``x[mask tiled].view(B, -1, C)``."""
    B, N, C = x.shape
    units = mask.shape[1]
    index = selected(mask, kept)[:, None, :, None].expand(B, N // units, kept, C)
    return x.view(B, N // units, units, C).gather(2, index).reshape(B, -1, C)


def scatter_units(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse placement: kept units x [B, K, *unit] -> [B, U, *unit], zeros at the
    dropped units, as ``out[mask expanded] = x.flatten()``; K comes from x's shape."""
    B, K = x.shape[:2]
    index = selected(mask, K).view(B, K, *([1] * (x.dim() - 2))).expand_as(x)
    return x.new_zeros(B, mask.shape[1], *x.shape[2:]).scatter(1, index, x)


def select_rows(t: torch.Tensor, mask: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """``t[mask]`` for t [B, N, D] and mask [B, N] with ``count`` True per row (None: read
    from the first row, one host sync) -> [B * count, D], rows in the same order."""
    if count is None:
        count = int(mask[0].sum())
    index = selected(mask, count)[..., None].expand(-1, -1, t.shape[-1])
    return t.gather(1, index).flatten(0, 1)
