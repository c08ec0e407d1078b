"""Triton unroll / reroll: one pass that moves each token's row, found by index arithmetic.

Token order as a mixed-radix number (:func:`hiera_kernels.reference.token_orders`):
unrolled token ``n`` has digits ``n_k`` (least significant first, radix ``R_k``) and
sits at spatial index ``sum_k n_k * W_k``, where ``W_k`` is the digit's place value in
spatial (raster or windowed) order. The launcher turns the same digit description
the ``"torch"`` path permutes with into that ``(R, W)`` table; the kernel evaluates
it per row. Rows are moved as raw words, so one kernel serves every dtype.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import reference
from ..library import check_token_geometry
from .common import dtype_name, launch

# Digit tables are padded with (radix 1, weight 0) to a multiple of this, so that a
# handful of DIGITS specializations cover every geometry.
DIGIT_BUCKET = 4
MAX_DIGITS = 40  # 4 dims x (8 steps + the unit-grid digit) + the kept-unit digit = 37, rounded up
BLOCK_ROWS, BLOCK_WORDS = 16, 64
WORD_DTYPES = (torch.int64, torch.int32, torch.int16)


def digit_table(size: Sequence[int], strides: Sequence[int], windowed: bool, tokens: int) -> Tuple[List[int], List[int]]:
    """``(radix, weight)``, least significant digit first, digits of radix 1 dropped."""
    dims = len(size)
    schedule = [tuple(strides[j * dims:(j + 1) * dims]) for j in range(len(strides) // dims)]
    digit_shape, spatial_axes, unrolled_axes = reference.token_orders(size, schedule, windowed, tokens)
    place, value = {}, 1
    for axis in reversed(spatial_axes):
        place[axis], value = value, value * digit_shape[axis]
    radix = [digit_shape[a] for a in reversed(unrolled_axes) if digit_shape[a] > 1]
    weight = [place[a] for a in reversed(unrolled_axes) if digit_shape[a] > 1]
    return radix, weight


def as_words(op: str, x: torch.Tensor, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``out`` [B, N, C] viewed as the widest integer words that tile a row and
    that both start on (bits unchanged): one word size, so rows line up in both."""
    row_bytes = x.shape[2] * x.element_size()
    for word in WORD_DTYPES:  # int16 always fits: every supported dtype is >= 2 bytes
        size = word.itemsize
        aligned = x.device.type == "meta" or (x.data_ptr() % size == 0 and out.data_ptr() % size == 0)
        if row_bytes % size == 0 and aligned:
            # Through the flat view: a contiguous x may still carry any stride on a
            # size-1 dim (e.g. [B, 1, C] from a transpose), which view(word) rejects.
            B, N = x.shape[:2]
            return x.reshape(-1).view(word).view(B, N, -1), out.reshape(-1).view(word).view(B, N, -1)
    raise TypeError(f"{op}: x rows of {x.shape[2]} x {dtype_name(x.dtype)} cannot be moved as 2-byte words")


@triton.jit
def _move_rows_kernel(
    src, dst, rows, tokens, row_words, radix, weight,
    TO_UNROLLED: tl.constexpr, DIGITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_WORDS: tl.constexpr,
):
    # src, dst: [B * N, row_words] words. Rows of this program: BLOCK_ROWS unrolled tokens.
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < rows
    image = row // tokens
    n = (row - image * tokens).to(tl.int32)  # token within its image: < 2^31
    spatial = tl.zeros_like(n)
    for k in tl.static_range(DIGITS):
        spatial += (n % radix[k]) * weight[k]
        n = n // radix[k]
    spatial_row = image * tokens + spatial
    if TO_UNROLLED:  # unroll gathers: out[n] = x[s(n)]
        src_row, dst_row = spatial_row, row
    else:  # reroll scatters to distinct rows: out[s(n)] = x[n]
        src_row, dst_row = row, spatial_row
    for w0 in range(0, row_words, BLOCK_WORDS):
        word = w0 + tl.arange(0, BLOCK_WORDS)
        mask = row_ok[:, None] & (word < row_words)[None, :]
        values = tl.load(src + src_row[:, None] * row_words + word[None, :], mask=mask)
        tl.store(dst + dst_row[:, None] * row_words + word[None, :], values, mask=mask)


def _move_rows(op: str, x: torch.Tensor, size, strides, windowed: bool, to_unrolled: bool) -> torch.Tensor:
    check_token_geometry(op, x, size, strides, windowed, kernel_bounds=False)
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    B, N, _ = x.shape
    radix, weight = digit_table(size, strides, windowed, N)
    if len(radix) > MAX_DIGITS:
        raise ValueError(f"{op}: the schedule has {len(radix)} non-trivial digits, more than the kernel's {MAX_DIGITS}")
    digits = max(DIGIT_BUCKET, -(-len(radix) // DIGIT_BUCKET) * DIGIT_BUCKET)
    pad = digits - len(radix)
    src, dst = as_words(op, x, out)
    rows = B * N
    launch(
        _move_rows_kernel, (triton.cdiv(rows, BLOCK_ROWS),),
        src, dst, rows, N, src.shape[2], tuple(radix + [1] * pad), tuple(weight + [0] * pad),
        TO_UNROLLED=to_unrolled, DIGITS=digits, BLOCK_ROWS=BLOCK_ROWS, BLOCK_WORDS=BLOCK_WORDS,
    )
    return out


def unroll(x, size, strides, windowed):
    return _move_rows("hiera_kernels::unroll_triton", x, size, strides, windowed, True)


def reroll(x, size, strides, windowed):
    return _move_rows("hiera_kernels::reroll_triton", x, size, strides, windowed, False)
