"""The public functional API: validate once, choose a backend, run it.

Every function takes ``backend=None`` (the default backend, see
:mod:`hiera_kernels.backends`) or a backend name. Bad input raises ``ValueError``
or ``TypeError`` naming the op, the argument and the numbers, whatever the
backend; a backend that cannot run the inputs raises ``BackendError``.

Shapes (B batch, N tokens, C channels, D spatial dims):

=====================  ===========================================================
``unroll``             [B, prod(size), C] raster -> [B, N, C] unrolled (official ``Unroll``)
``reroll``             [B, N, C] unrolled -> [B, *size, C]; with a keep-mask
                       [B, K * mu, C] -> [B, K, *mu_shape, C] (official ``Reroll``)
``query_pool``         [B, N, C] -> [B, N // stride, C], max over the leading digit
``mask_unit_attention`` qkv [B, N, 3 * dim_out] -> [B, N // q_stride, dim_out]
``window_attention``   SAM 2: qkv [B, H, W, 3 * C] -> [B, H // s, W // s, C]
=====================  ===========================================================
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .backends import WITH_FLOAT64 as SUPPORTED_DTYPES
from .backends import choose
from .library import MAX_WINDOW_Q_STRIDE
from .reference import mask_unit_shape


def _check_tensor(op: str, name: str, x, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != layout.count(",") + 1:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {x.dtype}; supported: float32, float16, bfloat16 "
            "(and float64 on the 'torch' and 'cpu' backends)"
        )


def _check_positive_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {value}")
    return value


def _check_geometry(op: str, size, schedule) -> Tuple[Tuple[int, ...], Tuple[Tuple[int, ...], ...]]:
    """Normalise ``size`` and ``schedule`` to int tuples; every dim of ``size`` must
    split into whole mask units."""
    if not isinstance(size, Sequence) or len(size) == 0:
        raise TypeError(f"{op}: size must be a non-empty sequence of ints, got {size!r}")
    size = tuple([_check_positive_int(op, f"size[{d}]", s) for d, s in enumerate(size)])
    if not isinstance(schedule, Sequence):
        raise TypeError(f"{op}: schedule must be a sequence of stride tuples, got {schedule!r}")
    steps = []
    for j, step in enumerate(schedule):
        if not isinstance(step, Sequence) or len(step) != len(size):
            raise ValueError(f"{op}: schedule[{j}]={step!r} must have one stride per dim of size={size}")
        steps.append(tuple([_check_positive_int(op, f"schedule[{j}][{d}]", s) for d, s in enumerate(step)]))
    for d, (n, unit) in enumerate(zip(size, mask_unit_shape(steps, len(size)))):
        if n % unit:
            raise ValueError(
                f"{op}: size[{d}]={n} is not divisible by {unit}, the product of the schedule's "
                f"strides in that dim (schedule={steps})"
            )
    return size, tuple(steps)


def unroll(x: torch.Tensor, size: Sequence[int], schedule: Sequence[Sequence[int]], *, backend: Optional[str] = None):
    """The official ``Unroll(size, schedule)``: reorder raster tokens [B, prod(size), C]
    so every schedule step's stride digits lead (see :mod:`hiera_kernels.reference`)."""
    _check_tensor("unroll", "x", x, "[B, N, C]")
    size, schedule = _check_geometry("unroll", size, schedule)
    if x.shape[1] != math.prod(size):
        raise ValueError(f"unroll: x has N={x.shape[1]} tokens but size={size} holds {math.prod(size)}")
    return choose("unroll", x, backend, dims=len(size), steps=len(schedule)).unroll(x, size, schedule)


def reroll(
    x: torch.Tensor,
    size: Sequence[int],
    schedule: Sequence[Sequence[int]],
    mask: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
):
    """The official ``Reroll`` for one stage: ``size`` is the stage's token grid and
    ``schedule`` its remaining unroll strides. Returns [B, *size, C]; with a boolean
    keep-mask [B, num_units] (x then holds the K kept units), [B, K, *mu_shape, C].
    As officially, only the mask's shape matters: K comes from x."""
    _check_tensor("reroll", "x", x, "[B, N, C]")
    size, schedule = _check_geometry("reroll", size, schedule)
    B, N, _ = x.shape
    if mask is None:
        if N != math.prod(size):
            raise ValueError(f"reroll: x has N={N} tokens but size={size} holds {math.prod(size)}")
    else:
        unit = math.prod(mask_unit_shape(schedule, len(size)))
        units = math.prod(size) // unit
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"reroll: mask must be a bool tensor [B, num_units], got {getattr(mask, 'dtype', type(mask))}")
        if tuple(mask.shape) != (B, units):
            raise ValueError(f"reroll: mask must have shape (B, num_units)=({B}, {units}), got {tuple(mask.shape)}")
        if N % unit or N // unit > units:
            raise ValueError(
                f"reroll: with a mask, x must hold whole kept mask units of {unit} tokens "
                f"(at most {units} units), got N={N}"
            )
    impl = choose("reroll", x, backend, dims=len(size), steps=len(schedule))
    return impl.reroll(x, size, schedule, mask is not None)


def query_pool(x: torch.Tensor, stride: int, *, backend: Optional[str] = None):
    """The official ``do_pool``: ``x.view(B, stride, N // stride, C).max(dim=1).values``.
    In unrolled order this is a max-pool over the finest remaining stride window."""
    _check_tensor("query_pool", "x", x, "[B, N, C]")
    _check_positive_int("query_pool", "stride", stride)
    if x.shape[1] % stride:
        raise ValueError(f"query_pool: N={x.shape[1]} is not divisible by stride={stride}")
    return choose("query_pool", x, backend, stride=stride).query_pool(x, stride)


def mask_unit_attention(
    qkv: torch.Tensor,
    heads: int,
    q_stride: int,
    window_size: int,
    use_mask_unit_attn: bool,
    *,
    backend: Optional[str] = None,
):
    """The official ``MaskUnitAttention.forward`` between its two Linears.

    ``qkv`` is the qkv Linear's output [B, N, 3 * dim_out] (features ``[3][heads][hd]``);
    ``window_size`` is the flattened mask unit after this block's pooling. Returns
    [B, N // q_stride, dim_out], ready for ``proj``.
    """
    op = "mask_unit_attention"
    _check_tensor(op, "qkv", qkv, "[B, N, 3 * dim_out]")
    B, N, width = qkv.shape
    check_mask_unit_geometry(op, N, width, heads, q_stride, window_size, use_mask_unit_attn)
    # The pooling argmax is one byte; the kernels bound the head dim.
    impl = choose(op, qkv, backend, stride=q_stride, head_dim=width // (3 * heads))
    return impl.mask_unit_attention(qkv, heads, q_stride, window_size, bool(use_mask_unit_attn))


def check_mask_unit_geometry(op: str, N: int, width: int, heads: int, q_stride: int, window_size: int,
                             use_mask_unit_attn: bool) -> None:
    """Mask-unit attention's geometry, as the official module assumes it: N tokens, a qkv
    ``width`` of 3 * heads * head_dim, and whole windows of q_stride * window_size tokens
    (global attention: N divisible by q_stride)."""
    _check_positive_int(op, "heads", heads)
    _check_positive_int(op, "q_stride", q_stride)
    if N == 0:
        raise ValueError(f"{op}: qkv has no tokens (N=0)")
    if width % (3 * heads):
        raise ValueError(f"{op}: qkv width {width} is not divisible by 3 * heads = {3 * heads}")
    if use_mask_unit_attn:
        _check_positive_int(op, "window_size", window_size)
        if N % (q_stride * window_size):
            raise ValueError(
                f"{op}: N={N} is not a whole number of windows of q_stride * window_size = "
                f"{q_stride} * {window_size} tokens"
            )
    elif N % q_stride:
        raise ValueError(f"{op}: N={N} is not divisible by q_stride={q_stride}")


def window_attention(
    qkv: torch.Tensor,
    heads: int,
    window_size: int,
    q_stride: int = 1,
    pad: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
):
    """SAM 2's ``MultiScaleBlock`` attention (``sam2.modeling.backbones.hieradet``)
    between its qkv and proj Linears, on the spatial map: window partition with
    padding, the s x s query max-pool, attention, window unpartition and crop in one op.

    ``qkv`` is the qkv Linear applied to the *unpadded* normed map, [B, H, W, 3 * C]
    (features ``[3][heads][hd]``). ``window_size`` is the block's window (0: global
    attention over the whole map); ``q_stride`` the pooling stride per side (SAM 2's
    ``q_stride=(2, 2)`` is 2). SAM 2 pads the normed map with zeros before its qkv
    Linear, so a padded token's q, k and v are that Linear's bias: pass it as ``pad``
    [3 * C] (``None``: zeros, a Linear without bias). Padded keys take part in the
    softmax, as in SAM 2. Returns [B, H // s, W // s, C], ready for ``proj``.
    """
    op = "window_attention"
    _check_tensor(op, "qkv", qkv, "[B, H, W, 3 * dim_out]")
    _check_positive_int(op, "heads", heads)
    _check_positive_int(op, "q_stride", q_stride)
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
        raise ValueError(f"{op}: window_size must be an int >= 0 (0: global attention), got {window_size!r}")
    B, H, W, width = qkv.shape
    if width % (3 * heads):
        raise ValueError(f"{op}: qkv width {width} is not divisible by 3 * heads = {3 * heads}")
    if H == 0 or W == 0:
        raise ValueError(f"{op}: qkv has an empty token map (H={H}, W={W})")
    if q_stride > MAX_WINDOW_Q_STRIDE:
        raise ValueError(f"{op}: q_stride={q_stride} exceeds {MAX_WINDOW_Q_STRIDE} (s * s candidates, one-byte argmax)")
    if window_size and window_size % q_stride:
        raise ValueError(f"{op}: window_size={window_size} is not divisible by q_stride={q_stride}")
    if H < q_stride or W < q_stride:
        raise ValueError(f"{op}: the {H}x{W} map is smaller than one {q_stride}x{q_stride} pooling window")
    if pad is None:
        pad = qkv.new_zeros(width)
    elif not isinstance(pad, torch.Tensor) or tuple(pad.shape) != (width,):
        raise ValueError(f"{op}: pad must be a tensor [3 * dim_out] = [{width}], got {getattr(pad, 'shape', pad)!r}")
    elif pad.device != qkv.device:
        raise ValueError(f"{op}: pad is on {pad.device} but qkv on {qkv.device}")
    impl = choose(op, qkv, backend, stride=q_stride * q_stride, head_dim=width // (3 * heads))
    return impl.window_attention(qkv, pad.to(qkv.dtype), heads, window_size, q_stride)


__all__: List[str] = ["unroll", "reroll", "query_pool", "mask_unit_attention", "window_attention"]
