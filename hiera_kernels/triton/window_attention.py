"""Triton window attention for SAM 2 (HieraDet's MultiScaleBlock), forward and backward.

Layout contract: csrc/include/hiera_kernels/window_layout.h (``WindowLayout``), whose
geometry is :func:`hiera_kernels.reference.window_grid`'s; the oracle is
:func:`hiera_kernels.reference.window_attention`.

* ``qkv`` [B, H, W, 3, heads, head_dim] is the qkv Linear over the *unpadded* map, read
  in place (token row ``(b * H + y) * W + x``); ``pad`` [3, heads, head_dim] is what a
  padded token's qkv is (the Linear's bias: SAM 2 pads before its qkv Linear).
* Keys: key ``j`` of window ``w = wy * windows_x + wx`` is at ``(wy * window_h + j //
  window_w, wx * window_w + j % window_w)``; past the map it reads ``pad`` and takes
  part in the softmax like any key.
* Queries: pooled query ``i`` of window ``w`` is the max over its ``s * s`` candidates
  ``c = dy * s + dx`` at ``(wy * window_h + (i // pooled_w) * s + dy, wx * window_w +
  (i % pooled_w) * s + dx)``, taken by MaxPool2d's rule (bigger, or NaN), in its scan
  order, so the first maximum and the last NaN win; the one-byte argmax ``c`` is saved.
* ``out`` [B, out_h, out_w, heads * head_dim] holds query ``i`` of window ``w`` at
  ``(wy * pooled_h + i // pooled_w, wx * pooled_w + i % pooled_w)``, when that is inside
  the out_h x out_w map (window_unpartition's crop); ``q_argmax`` likewise; ``lse``
  [B, heads, windows, queries] (fp32, natural log) is saved for the backward.

The index math, one Triton function per WindowLayout method (a -1 offset there is
``inside``/``stored`` False here)::

    WindowLayout::token_offset      _token_rows      (row * 3 * dim + which * dim + head column)
    WindowLayout::pad_offset        _load_part       (which * dim + head column)
    WindowLayout::key_offset        _key_rows
    WindowLayout::candidate_offset  _candidate_rows
    WindowLayout::out_offset        _out_rows        (row * dim + head column)
    WindowLayout::lse_offset        mask_unit_attention._lse_rows (the same formula)

Cropped queries (outside the output map, in the last window row or column of a map
that the windows or s do not divide) are computed like the others, their candidates
read like keys (pad past the map), exactly as SAM 2 computes them before its crop:
their lse is stored (it is the oracle's), their out and q_argmax are not. The backward
leaves them out (they have no dO, so they contribute nothing to dK or dV).

Everything else is mask_unit_attention's, imported from it: the tile plan (windows of at
most 64 padded queries and keys packed side by side in one tile, longer ones tiled with
a loop over key blocks), the online softmax, fp32 loads, the MMA-operand rule, and the
non-finite isolation (P and dS selected to 0 outside a row's window, packed products
checked and split window by window; see that module's docstring). Padded key rows are
loaded from ``pad`` per row (a select between the qkv load and pad's row), so a window's
padded keys are its own rows like any other key, and head-dim padding stays 0.

Backward: the kv kernel (one program per key block) writes dK/dV of the keys inside the
map, and dQ when its key block holds every key (fused); otherwise the q kernel writes dQ.
dQ goes to the candidates of each stored query, the argmax one taking it and the others
0. Every qkv element inside the map is so written exactly once, except the q part of
tokens no stored query pools from (rows y >= out_h * s, columns x >= out_w * s: the
crop of a map that s does not divide), which the launcher zero-fills first (two thin
strips, no full pass). grad_pad: the q part is 0 (only cropped queries pool from
padding); for k and v each kv program writes the sum of dK and dV over its padded key
rows to a partials tensor [B, heads, programs per head, 2, head_dim] (fp32), which the
launcher sums. Partials rather than tl.atomic_add: the result is deterministic, and
every program would otherwise add into the same 2 * head_dim addresses; the partials
are 2 * head_dim floats per program, small next to qkv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..library import check_triton_main_tensor, check_window_attention_args
from ..reference import window_grid
from .common import check_tensor, launch, mma_operand, new_attention_lse, next_power_of_2
from .mask_unit_attention import (BACKWARD_BLOCK_M, BACKWARD_BLOCK_N, BACKWARD_CONFIGS, FORWARD_CONFIGS, LOG2E,
                                  MAX_HEAD_DIM, Geometry, _autotune, _configs, _forward_block, _head_columns,
                                  _lse_rows, _product, _program, _slot_rows, _softmax_grads, _tile_plan, tiling)


# ------------------------------------------------------------------ index math
@triton.jit
def _token_rows(b, y, x, height, width):
    """WindowLayout::token_offset: the row of map position (y, x) of image b in qkv
    [B * H * W, 3 * dim] (int64), and whether it is inside the map (else it is padding)."""
    return (b.to(tl.int64) * height + y) * width + x, (y < height) & (x < width)


@triton.jit
def _key_rows(b, w, j, height, width, windows_x, window_h, window_w):
    """WindowLayout::key_offset: key j of window w."""
    return _token_rows(b, (w // windows_x) * window_h + j // window_w, (w % windows_x) * window_w + j % window_w,
                       height, width)


@triton.jit
def _candidate_rows(b, w, i, c, height, width, windows_x, window_h, window_w, pooled_w, q_stride):
    """WindowLayout::candidate_offset: candidate c = dy * s + dx of pooled query i of window w."""
    y = (w // windows_x) * window_h + (i // pooled_w) * q_stride + c // q_stride
    x = (w % windows_x) * window_w + (i % pooled_w) * q_stride + c % q_stride
    return _token_rows(b, y, x, height, width)


@triton.jit
def _out_rows(b, w, i, windows_x, pooled_h, pooled_w, out_h, out_w):
    """WindowLayout::out_offset: the row of pooled query i of window w in out (and q_argmax)
    [B * out_h * out_w, dim], and whether it is stored (inside the cropped output map)."""
    y = (w // windows_x) * pooled_h + i // pooled_w
    x = (w % windows_x) * pooled_w + i % pooled_w
    return (b.to(tl.int64) * out_h + y) * out_w + x, (y < out_h) & (x < out_w)


# ---------------------------------------------------------------------- loads
@triton.jit
def _load_part(qkv, pad, rows, inside, ok, part, h_col, d_ok, dim):
    """Part ``part`` (0 q, 1 k, 2 v) of a tile's rows, [BLOCK, BLOCK_D] in the storage
    dtype: qkv's row inside the map, pad's (WindowLayout::pad_offset) outside it, 0 for
    rows that are not ``ok`` and head-dim columns past head_dim."""
    columns = part * dim + h_col
    x = tl.load(qkv + rows[:, None] * (3 * dim) + columns[None, :], mask=(ok & inside)[:, None] & d_ok[None, :], other=0.0)
    padded = tl.load(pad + columns, mask=d_ok, other=0.0)
    return tl.where((ok & ~inside)[:, None], padded[None, :], x)


@triton.jit
def _max_pool2d_takes(candidate, best):
    """MaxPool2d's rule for the next candidate in scan order: bigger, or NaN (so the first
    maximum and the last NaN win, as torch's max_pool2d routes its gradient)."""
    return (candidate > best) | (candidate != candidate)


@triton.jit
def _load_pooled_q(qkv, pad, b, w, i, row_ok, h_col, d_ok, dim,
                   height, width, windows_x, window_h, window_w, pooled_w, q_stride):
    """The queries of a tile, max-pooled over their s * s candidates: fp32 [BLOCK_M,
    BLOCK_D] and the argmax c."""
    rows, inside = _candidate_rows(b, w, i, 0, height, width, windows_x, window_h, window_w, pooled_w, q_stride)
    q = _load_part(qkv, pad, rows, inside, row_ok, 0, h_col, d_ok, dim).to(tl.float32)
    arg = tl.zeros(q.shape, tl.int32)
    for c in range(1, q_stride * q_stride):
        rows, inside = _candidate_rows(b, w, i, c, height, width, windows_x, window_h, window_w, pooled_w, q_stride)
        candidate = _load_part(qkv, pad, rows, inside, row_ok, 0, h_col, d_ok, dim).to(tl.float32)
        take = _max_pool2d_takes(candidate, q)
        q = tl.where(take, candidate, q)
        arg = tl.where(take, c, arg)
    return q, arg


@triton.jit
def _load_kv(qkv, pad, b, wk, j, col_ok, h_col, d_ok, dim, height, width, windows_x, window_h, window_w):
    """Keys and values of a key block [BLOCK_N, BLOCK_D] in the storage dtype (pad's
    past the map), with their rows and which are inside the map."""
    rows, inside = _key_rows(b, wk, j, height, width, windows_x, window_h, window_w)
    k = _load_part(qkv, pad, rows, inside, col_ok, 1, h_col, d_ok, dim)
    return k, _load_part(qkv, pad, rows, inside, col_ok, 2, h_col, d_ok, dim), rows, inside


# -------------------------------------------------------------------- forward
@triton.jit
def _window_forward_kernel(
    qkv, pad, out, lse, q_argmax,
    height, width, windows_x, window_h, window_w, pooled_h, pooled_w, out_h, out_w,
    windows, queries, keys, q_stride, heads, head_dim, packed, q_pad, k_pad, q_shift, k_shift, scale_log2,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    q_slot, k_slot, wpp, q_tiles = _tile_plan(packed, q_pad, k_pad, queries, BLOCK_M, BLOCK_N)
    b, h, group, tile = _program(windows, wpp, q_tiles, heads)
    head_dim, h_col, d_ok = _head_columns(h, head_dim, HEAD_DIM, BLOCK_D)
    dim = heads * head_dim

    w, i, row_ok = _slot_rows(group, tile, q_slot, q_shift, wpp, queries, windows, BLOCK_M)
    q, arg = _load_pooled_q(qkv, pad, b, w, i, row_ok, h_col, d_ok, dim,
                            height, width, windows_x, window_h, window_w, pooled_w, q_stride)
    out_rows, stored = _out_rows(b, w, i, windows_x, pooled_h, pooled_w, out_h, out_w)
    mask = (row_ok & stored)[:, None] & d_ok[None, :]
    if q_stride > 1:
        tl.store(q_argmax + out_rows[:, None] * dim + h_col[None, :], arg.to(tl.uint8), mask=mask)
    q_op = mma_operand(q.to(qkv.dtype.element_ty))  # exact: the pooled q is one of the inputs

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if wpp > 1:  # several windows in the tile: packed, so all their keys are in key block 0
        wk, j, col_ok = _slot_rows(group, 0, k_slot, k_shift, wpp, keys, windows, BLOCK_N)
        k, v, _, _ = _load_kv(qkv, pad, b, wk, j, col_ok, h_col, d_ok, dim, height, width, windows_x, window_h, window_w)
        m_i, l_i, acc = _forward_block(q_op, k, v, row_ok, col_ok, w, wk, m_i, l_i, acc, scale_log2,
                                       group * wpp, wpp, True, PRECISION)
    else:  # one window: the products never mix windows
        for key_block in range(0, tl.cdiv(keys, k_slot)):
            wk, j, col_ok = _slot_rows(group, key_block, k_slot, k_shift, wpp, keys, windows, BLOCK_N)
            k, v, _, _ = _load_kv(qkv, pad, b, wk, j, col_ok, h_col, d_ok, dim,
                                  height, width, windows_x, window_h, window_w)
            m_i, l_i, acc = _forward_block(q_op, k, v, row_ok, col_ok, w, wk, m_i, l_i, acc, scale_log2,
                                           group * wpp, wpp, False, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(out + out_rows[:, None] * dim + h_col[None, :], (acc / l_safe[:, None]).to(out.dtype.element_ty), mask=mask)
    # Cropped queries' lse too: every row of lse is written (see the module docstring).
    tl.store(lse + _lse_rows(b, h, w, i, heads, windows, queries), (m_i + tl.log2(l_safe)) / LOG2E, mask=row_ok)


# ------------------------------------------------------------------- backward
@triton.jit
def _load_query_grads(qkv, pad, out, grad_out, lse, q_argmax, b, h, w, i, row_ok, h_col, d_ok, dim,
                      height, width, windows_x, window_h, window_w, pooled_h, pooled_w, out_h, out_w,
                      windows, queries, q_stride, heads):
    """For a query tile: which rows take part (real and stored: cropped queries have no
    dO), pooled q and dO as MMA operands, rowsum(dO * O), lse in base 2 and the saved
    pooling argmax (0 without pooling)."""
    out_rows, stored = _out_rows(b, w, i, windows_x, pooled_h, pooled_w, out_h, out_w)
    row_ok = row_ok & stored
    q, _ = _load_pooled_q(qkv, pad, b, w, i, row_ok, h_col, d_ok, dim,
                          height, width, windows_x, window_h, window_w, pooled_w, q_stride)
    rows = out_rows[:, None] * dim + h_col[None, :]
    mask = row_ok[:, None] & d_ok[None, :]
    do = tl.load(grad_out + rows, mask=mask, other=0.0)
    o = tl.load(out + rows, mask=mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_log2 = tl.load(lse + _lse_rows(b, h, w, i, heads, windows, queries), mask=row_ok, other=0.0) * LOG2E
    if q_stride > 1:
        arg = tl.load(q_argmax + rows, mask=mask, other=0).to(tl.int32)
    else:
        arg = tl.zeros(do.shape, tl.int32)
    return row_ok, mma_operand(q.to(qkv.dtype.element_ty)), mma_operand(do), delta, lse_log2, arg


@triton.jit
def _store_routed_dq(grad_qkv, dq, arg, b, w, i, row_ok, h_col, d_ok, dim,
                     height, width, windows_x, window_h, window_w, pooled_w, q_stride):
    """Write dq to every candidate of the stored queries (``row_ok``): the argmax gets it,
    the others 0. A stored query's candidates are all inside the map (window_layout.h),
    so none of these rows is padding."""
    mask = row_ok[:, None] & d_ok[None, :]
    dq = dq.to(grad_qkv.dtype.element_ty)
    for c in range(0, q_stride * q_stride):
        rows, _ = _candidate_rows(b, w, i, c, height, width, windows_x, window_h, window_w, pooled_w, q_stride)
        tl.store(grad_qkv + rows[:, None] * (3 * dim) + h_col[None, :], tl.where(arg == c, dq, tl.zeros_like(dq)),
                 mask=mask)


@triton.jit
def _backward_kv_tile(grad_out, qkv, pad, out, lse, q_argmax, grad_qkv, k, v, dk, dv, b, h, group, tile, wk, col_ok,
                      h_col, d_ok, dim, height, width, windows_x, window_h, window_w, pooled_h, pooled_w, out_h, out_w,
                      windows, queries, q_stride, heads, q_slot, q_shift, wpp, scale_log2, fuse_dq,
                      MIXED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query tile against the key block (k, v): the updated (dk, dv), and dq stored
    when ``fuse_dq``. dV = P^T dO and dK = dS^T q sum over queries, dq = dS K over keys."""
    dtype = qkv.dtype.element_ty
    w, i, row_ok = _slot_rows(group, tile, q_slot, q_shift, wpp, queries, windows, BLOCK_M)
    row_ok, q_op, do_op, delta, lse_log2, arg = _load_query_grads(
        qkv, pad, out, grad_out, lse, q_argmax, b, h, w, i, row_ok, h_col, d_ok, dim,
        height, width, windows_x, window_h, window_w, pooled_h, pooled_w, out_h, out_w, windows, queries, q_stride, heads)
    p, ds = _softmax_grads(q_op, k, v, do_op, delta, lse_log2, row_ok, col_ok, w, wk, scale_log2, PRECISION)
    first_window = group * wpp
    dv += _product(tl.trans(mma_operand(p.to(dtype))), do_op, wk, w, first_window, wpp, MIXED, PRECISION)
    ds_op = mma_operand(ds.to(dtype))
    dk += _product(tl.trans(ds_op), q_op, wk, w, first_window, wpp, MIXED, PRECISION)
    if fuse_dq:
        dq = _product(ds_op, mma_operand(k), w, wk, first_window, wpp, MIXED, PRECISION) * (scale_log2 / LOG2E)
        _store_routed_dq(grad_qkv, dq, arg, b, w, i, row_ok, h_col, d_ok, dim,
                         height, width, windows_x, window_h, window_w, pooled_w, q_stride)
    return dk, dv


@triton.jit
def _window_backward_kv_kernel(
    grad_out, qkv, pad, out, lse, q_argmax, grad_qkv, pad_partials,
    height, width, windows_x, window_h, window_w, pooled_h, pooled_w, out_h, out_w,
    windows, queries, keys, q_stride, heads, head_dim, packed, q_pad, k_pad, q_shift, k_shift, scale_log2, fuse_dq,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per key block: dK and dV over all query tiles, stored for the keys
    inside the map and summed over the padded ones into this program's row of
    pad_partials [programs, 2, head_dim]; dQ too when ``fuse_dq`` (this block holds every
    key its queries see), else _window_backward_q_kernel does."""
    q_slot, k_slot, wpp, q_tiles = _tile_plan(packed, q_pad, k_pad, queries, BLOCK_M, BLOCK_N)
    b, h, group, key_block = _program(windows, wpp, tl.cdiv(keys, k_slot), heads)
    head_dim, h_col, d_ok = _head_columns(h, head_dim, HEAD_DIM, BLOCK_D)
    dim = heads * head_dim
    dtype = qkv.dtype.element_ty

    wk, j, col_ok = _slot_rows(group, key_block, k_slot, k_shift, wpp, keys, windows, BLOCK_N)
    k, v, rows, inside = _load_kv(qkv, pad, b, wk, j, col_ok, h_col, d_ok, dim, height, width, windows_x, window_h, window_w)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if wpp > 1:  # several windows in the tile: packed, so all their queries are in query tile 0
        dk, dv = _backward_kv_tile(grad_out, qkv, pad, out, lse, q_argmax, grad_qkv, k, v, dk, dv, b, h, group, 0, wk,
                                   col_ok, h_col, d_ok, dim, height, width, windows_x, window_h, window_w, pooled_h,
                                   pooled_w, out_h, out_w, windows, queries, q_stride, heads, q_slot, q_shift, wpp,
                                   scale_log2, fuse_dq, True, PRECISION, BLOCK_M)
    else:  # one window: the products never mix windows
        for tile in range(0, q_tiles):
            dk, dv = _backward_kv_tile(grad_out, qkv, pad, out, lse, q_argmax, grad_qkv, k, v, dk, dv, b, h, group, tile,
                                       wk, col_ok, h_col, d_ok, dim, height, width, windows_x, window_h, window_w,
                                       pooled_h, pooled_w, out_h, out_w, windows, queries, q_stride, heads, q_slot,
                                       q_shift, wpp, scale_log2, fuse_dq, False, PRECISION, BLOCK_M)
    dk *= scale_log2 / LOG2E
    offsets = rows[:, None] * (3 * dim) + h_col[None, :]
    mask = (col_ok & inside)[:, None] & d_ok[None, :]
    tl.store(grad_qkv + offsets + dim, dk.to(dtype), mask=mask)
    tl.store(grad_qkv + offsets + 2 * dim, dv.to(dtype), mask=mask)
    # Padded keys: selected (not multiplied) so a non-finite dK of a real key stays out.
    padded = (col_ok & ~inside)[:, None]
    partial = pad_partials + tl.program_id(0).to(tl.int64) * (2 * head_dim) + (h_col - h * head_dim)
    tl.store(partial, tl.sum(tl.where(padded, dk, 0.0), 0), mask=d_ok)
    tl.store(partial + head_dim, tl.sum(tl.where(padded, dv, 0.0), 0), mask=d_ok)


@triton.jit
def _window_backward_q_kernel(
    grad_out, qkv, pad, out, lse, q_argmax, grad_qkv,
    height, width, windows_x, window_h, window_w, pooled_h, pooled_w, out_h, out_w,
    windows, queries, keys, q_stride, heads, head_dim, packed, q_pad, k_pad, q_shift, k_shift, scale_log2,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per query tile: dQ over all key blocks, routed through the pooling argmax.
    Launched only for tiled (one-window) tiles, so dS K never mixes windows."""
    q_slot, k_slot, wpp, q_tiles = _tile_plan(packed, q_pad, k_pad, queries, BLOCK_M, BLOCK_N)
    b, h, group, tile = _program(windows, wpp, q_tiles, heads)
    head_dim, h_col, d_ok = _head_columns(h, head_dim, HEAD_DIM, BLOCK_D)
    dim = heads * head_dim

    w, i, row_ok = _slot_rows(group, tile, q_slot, q_shift, wpp, queries, windows, BLOCK_M)
    row_ok, q_op, do_op, delta, lse_log2, arg = _load_query_grads(
        qkv, pad, out, grad_out, lse, q_argmax, b, h, w, i, row_ok, h_col, d_ok, dim,
        height, width, windows_x, window_h, window_w, pooled_h, pooled_w, out_h, out_w, windows, queries, q_stride, heads)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_block in range(0, tl.cdiv(keys, k_slot)):
        wk, j, col_ok = _slot_rows(group, key_block, k_slot, k_shift, wpp, keys, windows, BLOCK_N)
        k, v, _, _ = _load_kv(qkv, pad, b, wk, j, col_ok, h_col, d_ok, dim, height, width, windows_x, window_h, window_w)
        _, ds = _softmax_grads(q_op, k, v, do_op, delta, lse_log2, row_ok, col_ok, w, wk, scale_log2, PRECISION)
        dq += tl.dot(mma_operand(ds.to(qkv.dtype.element_ty)), mma_operand(k), input_precision=PRECISION)
    dq *= scale_log2 / LOG2E
    _store_routed_dq(grad_qkv, dq, arg, b, w, i, row_ok, h_col, d_ok, dim,
                     height, width, windows_x, window_h, window_w, pooled_w, q_stride)


_forward = _autotune(_configs(FORWARD_CONFIGS), _window_forward_kernel)
# The backward kernels write each element of grad_qkv and pad_partials once (the same
# value every run), so re-running them while autotuning is harmless.
_backward_kv = _autotune(_configs(BACKWARD_CONFIGS), _window_backward_kv_kernel)
_backward_q = _autotune(_configs(BACKWARD_CONFIGS), _window_backward_q_kernel)
KERNELS = (_forward, _backward_kv, _backward_q)


# ------------------------------------------------------------------ launchers
class WindowGeometry(Geometry):
    """The sizes of one call, checked as csrc's check_window_attention_args does, with the
    attention sizes (windows, queries, keys per window, ...) of mask_unit_attention's
    Geometry, whose tile plan, grid and constexprs it shares."""

    def __init__(self, op: str, qkv: torch.Tensor, pad: torch.Tensor, heads: int, window_size: int, q_stride: int):
        check_triton_main_tensor(op, qkv)
        self.batch, self.height, self.width, channels = qkv.shape
        check_window_attention_args(op, qkv, pad, heads, window_size, q_stride)
        self.heads, self.q_stride = heads, q_stride
        self.dim = channels // 3
        self.head_dim = self.dim // heads
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{op}: head_dim {self.head_dim} exceeds the Triton kernels' {MAX_HEAD_DIM}")
        self.layout = window_grid(self.height, self.width, window_size, q_stride)
        self.windows, self.queries = self.layout.windows, self.layout.queries
        self.keys = self.layout.window_h * self.layout.window_w
        self.block_d = max(32, next_power_of_2(self.head_dim))

    def scalars(self, block_m: int, block_n: int):
        """The kernels' runtime arguments after the tensors (without fuse_dq)."""
        g = self.layout
        return (self.height, self.width, g.windows_x, g.window_h, g.window_w, g.pooled_h, g.pooled_w, g.out_h, g.out_w,
                *self.tile_scalars(block_m, block_n))


def forward(qkv: torch.Tensor, pad: torch.Tensor, heads: int, window_size: int, q_stride: int):
    g = WindowGeometry("hiera_kernels::window_attention_triton", qkv, pad, heads, window_size, q_stride)
    qkv, pad = qkv.contiguous(), pad.contiguous()
    out = qkv.new_empty((g.batch, g.layout.out_h, g.layout.out_w, g.dim))
    lse = new_attention_lse(qkv, g)
    q_argmax = qkv.new_empty(out.shape if q_stride > 1 else (0,), dtype=torch.uint8)
    if out.numel() == 0:
        return out, lse, q_argmax
    # packed, q_pad and k_pad do not depend on the block sizes (see mask_unit_attention.forward).
    first = FORWARD_CONFIGS[0].kwargs
    launch(_forward, g.grid(lambda meta, q_tiles: q_tiles), qkv, pad, out, lse, q_argmax,
           *g.scalars(first["BLOCK_M"], first["BLOCK_N"]), **g.constexprs())
    return out, lse, q_argmax


def backward(grad_out, qkv, pad, out, lse, q_argmax, heads: int, window_size: int, q_stride: int):
    op = "hiera_kernels::window_attention_backward_triton"
    g = WindowGeometry(op, qkv, pad, heads, window_size, q_stride)
    # The saved tensors must be what the forward made of this qkv (see forward()).
    on = {"device": qkv.device, "device_of": "qkv"}
    out_shape = {"shape": (g.batch, g.layout.out_h, g.layout.out_w, g.dim), "shape_names": "B, H // s, W // s, dim_out"}
    check_tensor(op, "grad_out", grad_out, **on, dtype=qkv.dtype, dtype_of="qkv", **out_shape)
    check_tensor(op, "out", out, **on, dtype=qkv.dtype, dtype_of="qkv", **out_shape)
    check_tensor(op, "lse", lse, **on, dtype=torch.float32, shape=(g.batch, heads, g.windows, g.queries),
                 shape_names="B, heads, windows, queries")
    if q_stride == 1:  # no pooling: the forward returns an empty argmax
        out_shape = {"shape": (0,), "shape_names": "0 (q_stride 1)"}
    check_tensor(op, "q_argmax", q_argmax, **on, dtype=torch.uint8, **out_shape)
    qkv, pad, out, grad_out, lse, q_argmax = (t.contiguous() for t in (qkv, pad, out, grad_out, lse, q_argmax))
    grad_qkv = torch.empty_like(qkv)
    if grad_qkv.numel() == 0:  # no batch, or C = 0
        return grad_qkv, torch.zeros_like(pad)
    # The q part of tokens that no stored query pools from (see the module docstring).
    grad_qkv[:, g.layout.out_h * q_stride:, :, : g.dim].zero_()
    grad_qkv[:, :, g.layout.out_w * q_stride:, : g.dim].zero_()
    scalars = g.scalars(BACKWARD_BLOCK_M, BACKWARD_BLOCK_N)
    blocks = {"BLOCK_M": BACKWARD_BLOCK_M, "BLOCK_N": BACKWARD_BLOCK_N}
    packed, _, _, groups, _ = tiling(g.queries, g.keys, g.windows, BACKWARD_BLOCK_M, BACKWARD_BLOCK_N)
    key_tiles = 1 if packed else triton.cdiv(g.keys, BACKWARD_BLOCK_N)
    fuse_dq = int(key_tiles == 1)  # one key block holds every key these queries see
    # One row per kv program, in the grid's order [B, heads, window groups, key tiles].
    pad_partials = torch.empty((g.batch, heads, groups * key_tiles, 2, g.head_dim), dtype=torch.float32,
                               device=qkv.device)
    launch(_backward_kv, g.grid(lambda meta, q_tiles: key_tiles), grad_out, qkv, pad, out, lse, q_argmax, grad_qkv,
           pad_partials, *scalars, fuse_dq, **g.constexprs(), **blocks)
    if not fuse_dq:
        launch(_backward_q, g.grid(lambda meta, q_tiles: q_tiles), grad_out, qkv, pad, out, lse, q_argmax, grad_qkv,
               *scalars, **g.constexprs(), **blocks)
    # [B, heads, programs, 2, hd] -> [2 (k, v), heads, hd], after pad's zero q part.
    kv = pad_partials.sum((0, 2)).transpose(0, 1).reshape(2 * g.dim)
    return grad_qkv, torch.cat([kv.new_zeros(g.dim), kv]).to(pad.dtype)
