"""The ``"torch"`` backend: Hiera's token ops in plain PyTorch.

This module is the oracle every kernel is tested and benchmarked against, so it
reproduces the official package (facebookresearch/hiera 0.1.4) exactly:
permutations bit for bit, pooling with the same argmax routing (``max(dim)``,
first maximum wins ties and the first NaN wins), attention to float rounding.

It is also a good plain-PyTorch implementation, where the official code wastes
time (``../shared/hiera_spec.md`` §4, §6):

* unroll and reroll are ONE ``view -> permute -> reshape`` (one copy) instead of
  one copy per schedule step;
* attention folds the windows into the batch dimension and calls 4-D
  ``scaled_dot_product_attention``, so PyTorch's fused kernels apply; the
  official 5-D call always falls back to the math path.

Token order (spec §4). With a schedule of k strides ``S_1..S_k`` (each a tuple
over the D spatial dims), a spatial coordinate splits, most significant first,
as ``p_d = r1_d + S1_d * (r2_d + S2_d * (... + Sk_d * q_d))``. Unrolled order
is the mixed-radix number ``[r1_0..r1_{D-1}, ..., rk_0..rk_{D-1}, q_0..q_{D-1}]``:
the mask-unit (window) index ``q`` varies fastest. Raster order is
``[q_0, rk_0, ..., r1_0, q_1, rk_1, ..., r1_1, ...]``.

No argument checking happens here: :mod:`hiera_kernels.ops` validates once for
every backend.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F

Schedule = Sequence[Sequence[int]]


def mask_unit_shape(schedule: Schedule, dims: int) -> List[int]:
    """Per-dim size of a mask unit after ``schedule``: the product of its strides."""
    unit = [1] * dims
    for step in schedule:
        for d in range(dims):
            unit[d] *= step[d]
    return unit


def _digit_views(size: Sequence[int], schedule: Schedule) -> Tuple[List[int], List[int], List[int]]:
    """Split every spatial dim into digits and return the permutation between orders.

    Returns ``(digit_shape, raster_axes, unrolled_axes)``: ``x.view(B, *digit_shape, C)``
    with digits of dim d laid out as ``[q_d, rk_d, ..., r1_d]`` (raster order), and
    the axis orders (into that view, batch excluded) that spell raster order and
    unrolled order.
    """
    dims, steps = len(size), len(schedule)
    mu = mask_unit_shape(schedule, dims)
    digit_shape = []
    for d in range(dims):
        digit_shape.append(size[d] // mu[d])  # q_d
        digit_shape.extend(schedule[j][d] for j in reversed(range(steps)))  # rk_d .. r1_d
    per_dim = steps + 1
    # axis of digit r_{j+1} (j = 0..k-1) of dim d in the view; q_d sits at d * per_dim
    r_axis = lambda j, d: d * per_dim + (steps - j)  # noqa: E731
    unrolled = [r_axis(j, d) for j in range(steps) for d in range(dims)]
    unrolled += [d * per_dim for d in range(dims)]
    raster = list(range(dims * per_dim))
    return digit_shape, raster, unrolled


def _permute_digits(x: torch.Tensor, digit_shape, src_axes, dst_axes) -> torch.Tensor:
    """Reorder tokens of ``x`` [B, N, C] from digit order ``src_axes`` to ``dst_axes``."""
    B, N, C = x.shape
    src_shape = [digit_shape[a] for a in src_axes]
    position = {a: i for i, a in enumerate(src_axes)}
    perm = [0] + [1 + position[a] for a in dst_axes] + [len(src_axes) + 1]
    return x.reshape(B, *src_shape, C).permute(perm).reshape(B, N, C)


def token_orders(size: Sequence[int], schedule: Schedule, windowed: bool, tokens: int):
    """``(digit_shape, spatial_axes, unrolled_axes)`` of ``tokens`` tokens: the digits
    and the two axis orders that spell the spatial side (raster order, or windowed
    order when ``windowed``) and the unrolled side. Windowed order (Reroll with a
    keep-mask) has the kept units in order, each in raster order over the unit
    shape: the unit index is one opaque digit, the most significant spatially and
    the least significant unrolled. With ``size == mu`` every q_d is 1, so those
    axes are inert."""
    if not windowed:
        return _digit_views(size, schedule)
    mu = mask_unit_shape(schedule, len(size))
    digit_shape, raster, unrolled = _digit_views(mu, schedule)
    unit = len(digit_shape)
    return digit_shape + [tokens // math.prod(mu)], [unit] + raster, unrolled + [unit]


def unroll(x: torch.Tensor, size: Sequence[int], schedule: Schedule) -> torch.Tensor:
    """Official ``Unroll(size, schedule)``: [B, N, C] raster -> [B, N, C] unrolled."""
    digit_shape, raster, unrolled = token_orders(size, schedule, False, x.shape[1])
    return _permute_digits(x, digit_shape, raster, unrolled)


def reroll(x: torch.Tensor, size: Sequence[int], schedule: Schedule, windowed: bool = False) -> torch.Tensor:
    """Official ``Reroll`` for one stage (plus ``undo_windowing`` when unmasked).

    ``windowed=False`` (no mask): [B, N, C] unrolled -> [B, *size, C] spatial.
    ``windowed=True`` (a keep-mask was given): [B, K * mu, C] -> [B, K, *mu_shape, C],
    the K kept units in order.
    """
    B, N, C = x.shape
    digit_shape, spatial, unrolled = token_orders(size, schedule, windowed, N)
    out = _permute_digits(x, digit_shape, unrolled, spatial)
    if not windowed:
        return out.view(B, *size, C)
    mu = mask_unit_shape(schedule, len(size))
    return out.view(B, N // math.prod(mu), *mu, C)


def undo_windowing(x: torch.Tensor, size: Sequence[int], mu_shape: Sequence[int]) -> torch.Tensor:
    """Official ``undo_windowing``: [B, #MU, *mu_shape, C] (units in raster) -> [B, *size, C]."""
    dims = len(size)
    B, C = x.shape[0], x.shape[-1]
    units = [s // m for s, m in zip(size, mu_shape)]
    x = x.view(B, *units, *mu_shape, C)
    perm = [0] + [a for d in range(dims) for a in (1 + d, 1 + dims + d)] + [2 * dims + 1]
    return x.permute(perm).reshape(B, *size, C)


def query_pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Official ``do_pool``: [B, N, C] -> [B, N // stride, C], max over the leading digit.

    ``max(dim).values`` (not ``amax``) so the gradient goes to a single element,
    the first maximum, exactly as in the official model.
    """
    B, N, C = x.shape
    return x.view(B, stride, N // stride, C).max(dim=1).values


def window_count(tokens: int, q_stride: int, window_size: int, use_mask_unit_attn: bool) -> int:
    """Windows of a mask-unit attention block: N // (q_stride * window_size), or 1 (global)."""
    return tokens // (q_stride * window_size) if use_mask_unit_attn else 1


def mask_unit_attention(
    qkv: torch.Tensor, heads: int, q_stride: int, window_size: int, use_mask_unit_attn: bool
) -> torch.Tensor:
    """Official ``MaskUnitAttention.forward`` between its two Linears.

    qkv: [B, N, 3 * dim_out], features ``[which][head][hd]``; token ``n = t * nw + w``
    is position t of window w. Returns [B, N // q_stride, dim_out], same token order.
    """
    B, N, width = qkv.shape
    dim_out = width // 3
    head_dim = dim_out // heads
    windows = window_count(N, q_stride, window_size, use_mask_unit_attn)
    per_window = N // windows
    # [B, t, w, 3, h, hd] -> [3, B*w, h, t, hd]: windows folded into the batch so
    # SDPA gets 4-D tensors (its fused kernels refuse 5-D). One copy of qkv.
    qkv = qkv.view(B, per_window, windows, 3, heads, head_dim).permute(3, 0, 2, 4, 1, 5)
    q, k, v = qkv.reshape(3, B * windows, heads, per_window, head_dim).unbind(0)
    queries = per_window // q_stride
    if q_stride > 1:
        # The leading digit of t is the finest remaining 2x2 (or 1x2x2): a max-pool.
        q = q.view(B * windows, heads, q_stride, queries, head_dim).max(dim=2).values
    out = F.scaled_dot_product_attention(q, k, v)  # [B*w, h, t', hd]
    out = out.view(B, windows, heads, queries, head_dim).permute(0, 3, 1, 2, 4)  # [B, t', w, h, hd]
    return out.reshape(B, queries * windows, dim_out)


# ------------------------------------------------------------------ SAM 2 (HieraDet)
class WindowGrid(NamedTuple):
    """The geometry of one SAM 2 attention block over a [B, height, width] token map
    (``window_size`` 0: global attention; ``q_stride`` s: queries max-pooled s x s).

    Keys come in ``windows_y * windows_x`` windows of ``window_h x window_w`` positions
    (the whole map when global; the map zero-padded to whole windows otherwise);
    queries in pooled windows of ``pooled_h x pooled_w``; the output map is
    ``out_h x out_w`` = the map // s (``MaxPool2d``'s floor, and the crop of
    ``window_unpartition`` to the pooled shortcut). One copy of these formulas for the
    fake, the reference and the Triton kernels (csrc's WindowLayout mirrors them)."""

    window_h: int
    window_w: int
    windows_y: int
    windows_x: int
    pooled_h: int
    pooled_w: int
    out_h: int
    out_w: int

    @property
    def windows(self) -> int:
        return self.windows_y * self.windows_x

    @property
    def queries(self) -> int:
        return self.pooled_h * self.pooled_w


def window_grid(height: int, width: int, window_size: int, q_stride: int) -> WindowGrid:
    if window_size == 0:
        wh, ww = height, width
    else:
        wh = ww = window_size
    return WindowGrid(wh, ww, -(-height // wh), -(-width // ww), wh // q_stride, ww // q_stride,
                      height // q_stride, width // q_stride)


def window_attention(qkv: torch.Tensor, pad: torch.Tensor, heads: int, window_size: int, q_stride: int) -> torch.Tensor:
    """SAM 2's ``MultiScaleBlock`` attention between the qkv and proj Linears, as SAM 2's
    own sequence of ops (sam2/modeling/backbones/hieradet.py and utils.py).

    qkv: [B, H, W, 3 * C], the qkv Linear of the *unpadded* normed map, features
    ``[which][head][hd]``; pad: [3 * C], what the qkv Linear makes of a padded (zero)
    token, i.e. its bias. SAM 2 pads the normed map with zeros to whole windows before
    the qkv Linear, so its padded tokens' q, k and v are the bias, unmasked: they are
    keys of every window they fill. Returns [B, H // s, W // s, C], un-partitioned and
    cropped, ready for proj.
    """
    B, H, W, width = qkv.shape
    C = width // 3
    grid = window_grid(H, W, window_size, q_stride)
    if window_size > 0:  # window_partition, with the padded rows the Linear would have made
        Hp, Wp = grid.windows_y * window_size, grid.windows_x * window_size
        if (Hp, Wp) != (H, W):
            full = pad.to(qkv.dtype).expand(B, Hp, Wp, width).clone()
            full[:, :H, :W] = qkv
            qkv = full
        qkv = qkv.view(B, grid.windows_y, window_size, grid.windows_x, window_size, width)
        qkv = qkv.permute(0, 1, 3, 2, 4, 5).reshape(B * grid.windows, window_size, window_size, width)
    nb, wh, ww, _ = qkv.shape
    # MultiScaleAttention.forward. Explicit sizes where SAM 2 writes -1: a -1 cannot be
    # inferred from an empty batch.
    head_dim = C // heads
    q, k, v = torch.unbind(qkv.reshape(nb, wh * ww, 3, heads, head_dim), 2)
    if q_stride > 1:
        q = F.max_pool2d(q.reshape(nb, wh, ww, C).permute(0, 3, 1, 2), q_stride, q_stride)
        q = q.permute(0, 2, 3, 1)
        wh, ww = q.shape[1:3]
        q = q.reshape(nb, wh * ww, heads, head_dim)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    x = x.transpose(1, 2).reshape(nb, wh, ww, C)
    if window_size > 0:  # window_unpartition to the pooled, padded map, then the crop
        wq = window_size // q_stride
        x = x.reshape(B, grid.windows_y, grid.windows_x, wq, wq, C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, grid.windows_y * wq, grid.windows_x * wq, C)
        x = x[:, : grid.out_h, : grid.out_w, :]
    return x
