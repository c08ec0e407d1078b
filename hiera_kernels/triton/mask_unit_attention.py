"""Triton mask-unit attention, forward and backward (flash-attention style, for Hiera).

Layout contract (the same as csrc/include/hiera_kernels/attention_layout.h):

* ``qkv`` [B, N, 3, heads, head_dim] is the qkv Linear's output, read in place:
  token ``n = t * windows + w`` is position ``t`` of window ``w``;
* with ``q_stride > 1`` the query of pooled position ``i`` is the max over the
  positions ``t = s * queries + i``, taken while loading; its one-byte argmax ``s``
  is saved for the backward;
* ``out`` [B, queries * windows, heads * head_dim] holds query ``i`` of window ``w``
  at token ``i * windows + w``, ready for ``proj``; ``lse`` [B, heads, windows,
  queries] (fp32, natural log) is saved for the backward.

Programs. One program takes a tile of BLOCK_M query rows and walks key blocks of
BLOCK_N rows. A tile holds either ``wpp`` whole windows side by side (``packed``:
Hiera's windows have 64, 16 or 4 queries over 64 or 16 keys, too small for one
tensor-core tile each; scores between different windows are masked, so the tile
computes a block diagonal), or, for longer sequences, BLOCK_M queries of one
window with a loop over its keys. The slots are ``q_slot``/``k_slot`` rows wide:
the windows' padded sizes when packed, the block sizes otherwise.

Numerics: loads are converted to fp32 before any arithmetic (the interpreter gets
bf16 arithmetic wrong); tl.dot takes the storage dtype on GPUs (tensor cores, fp32
accumulation) and fp32 with ``input_precision="ieee"`` for fp32 inputs, so fp32
results stay fp32-accurate (no tf32). The softmax runs in base 2 on scaled scores.

Non-finite values stay in their window (as on the "torch" path, where windows never
meet). Elementwise, every P and dS entry outside a row's own window (or outside the
real rows and keys) is *selected* to 0, never computed as exp(-inf - lse) or P * (dP -
D), which are NaN when the row's lse or D or the other window's dP is inf or NaN.
Inside a product that is not enough: a packed tile's P @ V sums over the keys of every
window in the tile, and 0 * inf is NaN, so one inf in window 0's v would reach every
row. Zeroing operands cannot fix that in one product (window 0's rows need that v row),
so a packed tile with several windows checks the summed-over operand (v, k, q or dO)
once for inf/NaN, and only then multiplies window by window (:func:`_packed_dot`). Why
a check and not always window by window: that costs ``wpp`` (up to 16) products
instead of one on every tile, while the check is one reduction of a tile already in
registers; tiles of one window (``wpp == 1``: every tiled, long-sequence loop) never
mix windows, so their loops have no check and no branch around the products. Padding
(head dim columns past head_dim, rows past the window, keys past the block) is loaded
as 0, so it never carries a NaN.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from ..library import check_attention_args, check_triton_main_tensor
from .common import INTERPRETED, check_tensor, launch, mma_operand, new_attention_lse, next_power_of_2
from .query_pool import pool_takes

LOG2E = tl.constexpr(1.4426950408889634)  # scores run in base 2: exp(x) = exp2(x * LOG2E)
MAX_HEAD_DIM = 128
# Head dims compiled as constants: Hiera's (T/S/B 96, B+ 56, L 72, H 64) and the MAE
# decoder's 32; any other head dim up to MAX_HEAD_DIM runs the generic specialization.
SPECIALIZED_HEAD_DIMS = (32, 56, 64, 72, 96)
MAX_PACKED_SLOT = 64  # windows with at most this many (padded) queries and keys are packed

# Configurations for A100/H100 (head dims 56-96 pad to 64 or 128). Packing needs
# BLOCK_M, BLOCK_N >= MAX_PACKED_SLOT. The interpreter cannot benchmark, so it runs
# the first configuration only: the same kernel, one config.
FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
]
# The backward's blocks are fixed: whether dq is fused depends on the key blocks. Eight
# warps: with four, the dK/dV accumulators spill at head dim 128 (sm_90 ptxas).
BACKWARD_BLOCK_M = BACKWARD_BLOCK_N = 64
BACKWARD_CONFIGS = [triton.Config({}, num_warps=8, num_stages=2)]


# A packed tile holds at least one whole window: blocks must cover the largest slot.
assert all(min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= MAX_PACKED_SLOT for c in FORWARD_CONFIGS)
assert min(BACKWARD_BLOCK_M, BACKWARD_BLOCK_N) >= MAX_PACKED_SLOT


def _configs(configs):
    return configs[:1] if INTERPRETED else configs


def tiling(queries: int, keys: int, windows: int, block_m: int, block_n: int) -> Tuple[int, int, int, int, int]:
    """``(packed, q_pad, k_pad, window_groups, q_tiles)`` for one block size: the
    windows' padded sizes when packed (0 when tiled). The kernels derive the same
    numbers from the same inputs (:func:`_tile_plan`)."""
    q_pad, k_pad = next_power_of_2(queries), next_power_of_2(keys)
    if q_pad <= MAX_PACKED_SLOT and k_pad <= MAX_PACKED_SLOT:
        wpp = min(block_m // q_pad, block_n // k_pad)
        return 1, q_pad, k_pad, triton.cdiv(windows, wpp), 1
    return 0, 0, 0, windows, triton.cdiv(queries, block_m)


TILED_SHIFT = 30  # a slot "2**30 rows wide": every row of a tile is in slot 0


@triton.jit
def _tile_plan(packed, q_pad, k_pad, queries, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Device side of :func:`tiling`: the query and key slot widths, windows per program
    and query tiles. Slots are powers of two, so rows split into (slot, offset) with
    shifts: the shifts come from the launcher (log2 of the pads, or TILED_SHIFT)."""
    tiled = 1 - packed  # packed is 0 or 1: arithmetic instead of a branch keeps one type
    q_slot = q_pad + tiled * BLOCK_M
    k_slot = k_pad + tiled * BLOCK_N
    q_tiles = packed + tiled * tl.cdiv(queries, BLOCK_M)
    return q_slot, k_slot, tl.minimum(BLOCK_M // q_slot, BLOCK_N // k_slot), q_tiles


@triton.jit
def _slot_rows(group, tile, slot, shift, wpp, count, windows, BLOCK: tl.constexpr):
    """Rows of a tile: window ``w``, index ``i`` in the window, and which rows are real."""
    r = tl.arange(0, BLOCK)
    local = r >> shift
    w = group * wpp + local
    i = tile * slot + (r & ((1 << shift) - 1))
    return w, i, (local < wpp) & (i < count) & (w < windows)


@triton.jit
def _program(windows, wpp, tiles, heads):
    """This program's (image b, head h, window group, tile): the grid is flat over
    [B, heads, window groups, tiles] (see Geometry.grid)."""
    pid = tl.program_id(0)
    per_head = tl.cdiv(windows, wpp) * tiles
    bh, rest = pid // per_head, pid % per_head
    return bh // heads, bh % heads, rest // tiles, rest % tiles


@triton.jit
def _head_columns(h, head_dim, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(head_dim, columns of head h in a [.., heads * head_dim] row, which are real).
    With HEAD_DIM > 0 (Hiera's head dims) the head dim is a compile-time constant, so
    the masks and row strides are known and loads vectorise; 0 means any head dim."""
    if HEAD_DIM > 0:
        head_dim = HEAD_DIM
    d = tl.arange(0, BLOCK_D)
    return head_dim, h * head_dim + d, d < head_dim


@triton.jit
def _token_rows(b, t, w, tokens, windows):
    """qkv row (token) of position t of window w in image b: [B, N] flat, int64."""
    return b.to(tl.int64) * tokens + t.to(tl.int64) * windows + w


@triton.jit
def _out_rows(b, i, w, queries, windows):
    """out / q_argmax row of pooled query i of window w in image b: [B, queries * windows] flat."""
    return (b.to(tl.int64) * queries + i) * windows + w


@triton.jit
def _lse_rows(b, h, w, i, heads, windows, queries):
    """lse element of pooled query i of window w, head h, image b: [B, heads, windows, queries]."""
    return ((b * heads + h).to(tl.int64) * windows + w) * queries + i


@triton.jit
def _load_pooled_q(qkv, b, w, i, row_ok, h_col, d_ok, tokens, windows, queries, q_stride, width):
    """The queries of a tile, max-pooled over the q_stride candidates t = s * queries + i:
    fp32 values [BLOCK_M, BLOCK_D] and the argmax s."""
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(qkv + _token_rows(b, i, w, tokens, windows)[:, None] * width + h_col[None, :], mask=mask, other=0.0)
    q = q.to(tl.float32)
    arg = tl.zeros(q.shape, tl.int32)
    for s in range(1, q_stride):
        rows = _token_rows(b, s * queries + i, w, tokens, windows)
        candidate = tl.load(qkv + rows[:, None] * width + h_col[None, :], mask=mask, other=0.0).to(tl.float32)
        take = pool_takes(candidate, q)
        q = tl.where(take, candidate, q)
        arg = tl.where(take, s, arg)
    return q, arg


@triton.jit
def _load_kv(qkv, b, w, j, col_ok, h_col, d_ok, tokens, windows, dim, width):
    """Keys and values of a key block [BLOCK_N, BLOCK_D] in the storage dtype."""
    ptr = qkv + _token_rows(b, j, w, tokens, windows)[:, None] * width + h_col[None, :]
    mask = col_ok[:, None] & d_ok[None, :]
    return tl.load(ptr + dim, mask=mask, other=0.0), tl.load(ptr + 2 * dim, mask=mask, other=0.0)


@triton.jit
def _scores(q_op, k, row_ok, col_ok, w, wk, scale_log2, PRECISION: tl.constexpr):
    """Scaled base-2 scores [BLOCK_M, BLOCK_N], -inf outside the block diagonal, and that
    block diagonal (real query and key of the same window) as a mask."""
    s = tl.dot(q_op, tl.trans(mma_operand(k)), input_precision=PRECISION) * scale_log2
    valid = row_ok[:, None] & col_ok[None, :] & (w[:, None] == wk[None, :])
    return tl.where(valid, s, float("-inf")), valid


@triton.jit
def _has_nonfinite(x):
    """Whether tile ``x`` holds an inf or a NaN (|x| < inf is false for both)."""
    return tl.max(tl.where(tl.abs(x.to(tl.float32)) < float("inf"), 0, 1)) > 0


@triton.jit
def _packed_dot(a, b, a_win, b_win, first_window, wpp, PRECISION: tl.constexpr):
    """a @ b (fp32 [M, N]) for a packed tile of windows first_window .. + wpp, where
    ``a`` [M, K] is 0 outside each row's own window (a_win [M]) and ``b`` [K, N] has its
    rows in windows b_win [K]. One product when ``b`` is finite (0 * finite = 0 exactly);
    otherwise one per window, each over that window's rows of ``b`` only (the others
    zeroed) and kept for that window's rows of ``a`` only, so an inf or NaN in one
    window's ``b`` never meets another window's zeros. One tl.dot in the code either way
    (a loop of one pass over every window, or of ``wpp`` passes), to keep registers down."""
    parts = tl.where(_has_nonfinite(b), wpp, 1)
    whole = parts == 1
    c = tl.zeros((a.shape[0], b.shape[1]), tl.float32)
    for s in range(0, parts):
        window = first_window + s
        part = tl.dot(a, tl.where(((b_win == window) | whole)[:, None], b, tl.zeros_like(b)), input_precision=PRECISION)
        c = tl.where(((a_win == window) | whole)[:, None], part, c)
    return c


@triton.jit
def _product(a, b, a_win, b_win, first_window, wpp, MIXED: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b summed within windows: MIXED tiles (several windows) go through _packed_dot."""
    if MIXED:
        return _packed_dot(a, b, a_win, b_win, first_window, wpp, PRECISION)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _forward_block(q_op, k, v, row_ok, col_ok, w, wk, m_i, l_i, acc, scale_log2, first_window, wpp,
                   MIXED: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax: the updated (m_i, l_i, acc)."""
    s, valid = _scores(q_op, k, row_ok, col_ok, w, wk, scale_log2, PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet (padding)
    p = tl.where(valid, tl.exp2(s - m_safe[:, None]), 0.0)  # 0, not exp2(-inf - inf) = NaN
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = _product(mma_operand(p.to(k.dtype)), mma_operand(v), w, wk, first_window, wpp, MIXED, PRECISION)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _attention_forward_kernel(
    qkv, out, lse, q_argmax,
    tokens, windows, queries, keys, q_stride, heads, head_dim, packed, q_pad, k_pad, q_shift, k_shift, scale_log2,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    q_slot, k_slot, wpp, q_tiles = _tile_plan(packed, q_pad, k_pad, queries, BLOCK_M, BLOCK_N)
    b, h, group, tile = _program(windows, wpp, q_tiles, heads)
    head_dim, h_col, d_ok = _head_columns(h, head_dim, HEAD_DIM, BLOCK_D)
    dim = heads * head_dim

    w, i, row_ok = _slot_rows(group, tile, q_slot, q_shift, wpp, queries, windows, BLOCK_M)
    q, arg = _load_pooled_q(qkv, b, w, i, row_ok, h_col, d_ok, tokens, windows, queries, q_stride, 3 * dim)
    out_rows = _out_rows(b, i, w, queries, windows)
    mask = row_ok[:, None] & d_ok[None, :]
    if q_stride > 1:
        tl.store(q_argmax + out_rows[:, None] * dim + h_col[None, :], arg.to(tl.uint8), mask=mask)
    q_op = mma_operand(q.to(qkv.dtype.element_ty))  # exact: the pooled q is one of the inputs

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if wpp > 1:  # several windows in the tile: packed, so all their keys are in key block 0
        wk, j, col_ok = _slot_rows(group, 0, k_slot, k_shift, wpp, keys, windows, BLOCK_N)
        k, v = _load_kv(qkv, b, wk, j, col_ok, h_col, d_ok, tokens, windows, dim, 3 * dim)
        m_i, l_i, acc = _forward_block(q_op, k, v, row_ok, col_ok, w, wk, m_i, l_i, acc, scale_log2,
                                       group * wpp, wpp, True, PRECISION)
    else:  # one window: the products never mix windows
        for key_block in range(0, tl.cdiv(keys, k_slot)):
            wk, j, col_ok = _slot_rows(group, key_block, k_slot, k_shift, wpp, keys, windows, BLOCK_N)
            k, v = _load_kv(qkv, b, wk, j, col_ok, h_col, d_ok, tokens, windows, dim, 3 * dim)
            m_i, l_i, acc = _forward_block(q_op, k, v, row_ok, col_ok, w, wk, m_i, l_i, acc, scale_log2,
                                           group * wpp, wpp, False, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(out + out_rows[:, None] * dim + h_col[None, :], (acc / l_safe[:, None]).to(out.dtype.element_ty), mask=mask)
    tl.store(lse + _lse_rows(b, h, w, i, heads, windows, queries), (m_i + tl.log2(l_safe)) / LOG2E, mask=row_ok)


@triton.jit
def _softmax_grads(q_op, k, v, do_op, delta, lse_log2, row_ok, col_ok, w, wk, scale_log2, PRECISION: tl.constexpr):
    """P (recomputed from the log-sum-exp) and dS = P * (dO V^T - rowsum(dO * O)), fp32,
    both selected to 0 outside the block diagonal (where lse, D or dP may be inf or NaN)."""
    s, valid = _scores(q_op, k, row_ok, col_ok, w, wk, scale_log2, PRECISION)
    p = tl.where(valid, tl.exp2(s - lse_log2[:, None]), 0.0)
    dp = tl.dot(do_op, tl.trans(mma_operand(v)), input_precision=PRECISION)
    return p, tl.where(valid, p * (dp - delta[:, None]), 0.0)


@triton.jit
def _load_query_grads(qkv, out, grad_out, lse, q_argmax, b, h, w, i, row_ok, h_col, d_ok,
                      tokens, windows, queries, q_stride, heads, dim):
    """For a query tile: pooled q (MMA operand), dO (MMA operand), rowsum(dO * O), lse in
    base 2, and the saved pooling argmax (0 without pooling)."""
    q, _ = _load_pooled_q(qkv, b, w, i, row_ok, h_col, d_ok, tokens, windows, queries, q_stride, 3 * dim)
    rows = _out_rows(b, i, w, queries, windows)[:, None] * dim + h_col[None, :]
    mask = row_ok[:, None] & d_ok[None, :]
    do = tl.load(grad_out + rows, mask=mask, other=0.0)
    o = tl.load(out + rows, mask=mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_log2 = tl.load(lse + _lse_rows(b, h, w, i, heads, windows, queries), mask=row_ok, other=0.0) * LOG2E
    if q_stride > 1:
        arg = tl.load(q_argmax + rows, mask=mask, other=0).to(tl.int32)
    else:
        arg = tl.zeros(do.shape, tl.int32)
    return mma_operand(q.to(qkv.dtype.element_ty)), mma_operand(do), delta, lse_log2, arg


@triton.jit
def _store_routed_dq(grad_qkv, dq, arg, b, w, i, row_ok, h_col, d_ok, tokens, windows, queries, q_stride, width):
    """Write dq to every query candidate t = s * queries + i: the pooled winner gets it,
    the others get zero (each q element of grad_qkv is written exactly once)."""
    mask = row_ok[:, None] & d_ok[None, :]
    dq = dq.to(grad_qkv.dtype.element_ty)
    for s in range(0, q_stride):
        rows = _token_rows(b, s * queries + i, w, tokens, windows)
        tl.store(grad_qkv + rows[:, None] * width + h_col[None, :], tl.where(arg == s, dq, tl.zeros_like(dq)), mask=mask)


@triton.jit
def _backward_kv_tile(grad_out, qkv, out, lse, q_argmax, grad_qkv, k, v, dk, dv, b, h, group, tile, wk, col_ok, h_col, d_ok,
                      tokens, windows, queries, q_stride, heads, dim, q_slot, q_shift, wpp, scale_log2, fuse_dq,
                      MIXED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query tile against the key block (k, v): the updated (dk, dv), and dq stored
    when ``fuse_dq``. dV = P^T dO and dK = dS^T q sum over queries, dq = dS K over keys."""
    dtype = qkv.dtype.element_ty
    w, i, row_ok = _slot_rows(group, tile, q_slot, q_shift, wpp, queries, windows, BLOCK_M)
    q_op, do_op, delta, lse_log2, arg = _load_query_grads(
        qkv, out, grad_out, lse, q_argmax, b, h, w, i, row_ok, h_col, d_ok,
        tokens, windows, queries, q_stride, heads, dim)
    p, ds = _softmax_grads(q_op, k, v, do_op, delta, lse_log2, row_ok, col_ok, w, wk, scale_log2, PRECISION)
    first_window = group * wpp
    dv += _product(tl.trans(mma_operand(p.to(dtype))), do_op, wk, w, first_window, wpp, MIXED, PRECISION)
    ds_op = mma_operand(ds.to(dtype))
    dk += _product(tl.trans(ds_op), q_op, wk, w, first_window, wpp, MIXED, PRECISION)
    if fuse_dq:
        dq = _product(ds_op, mma_operand(k), w, wk, first_window, wpp, MIXED, PRECISION) * (scale_log2 / LOG2E)
        _store_routed_dq(grad_qkv, dq, arg, b, w, i, row_ok, h_col, d_ok, tokens, windows, queries, q_stride, 3 * dim)
    return dk, dv


@triton.jit
def _attention_backward_kv_kernel(
    grad_out, qkv, out, lse, q_argmax, grad_qkv,
    tokens, windows, queries, keys, q_stride, heads, head_dim, packed, q_pad, k_pad, q_shift, k_shift, scale_log2, fuse_dq,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per key block: dK and dV over all query tiles; dQ too when this block
    holds every key its queries see (``fuse_dq``), else _attention_backward_q_kernel does."""
    q_slot, k_slot, wpp, q_tiles = _tile_plan(packed, q_pad, k_pad, queries, BLOCK_M, BLOCK_N)
    b, h, group, key_block = _program(windows, wpp, tl.cdiv(keys, k_slot), heads)
    head_dim, h_col, d_ok = _head_columns(h, head_dim, HEAD_DIM, BLOCK_D)
    dim = heads * head_dim
    dtype = qkv.dtype.element_ty

    wk, j, col_ok = _slot_rows(group, key_block, k_slot, k_shift, wpp, keys, windows, BLOCK_N)
    k, v = _load_kv(qkv, b, wk, j, col_ok, h_col, d_ok, tokens, windows, dim, 3 * dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if wpp > 1:  # several windows in the tile: packed, so all their queries are in query tile 0
        dk, dv = _backward_kv_tile(grad_out, qkv, out, lse, q_argmax, grad_qkv, k, v, dk, dv, b, h, group, 0, wk, col_ok,
                                   h_col, d_ok, tokens, windows, queries, q_stride, heads, dim, q_slot, q_shift, wpp,
                                   scale_log2, fuse_dq, True, PRECISION, BLOCK_M)
    else:  # one window: the products never mix windows
        for tile in range(0, q_tiles):
            dk, dv = _backward_kv_tile(grad_out, qkv, out, lse, q_argmax, grad_qkv, k, v, dk, dv, b, h, group, tile, wk,
                                       col_ok, h_col, d_ok, tokens, windows, queries, q_stride, heads, dim, q_slot, q_shift,
                                       wpp, scale_log2, fuse_dq, False, PRECISION, BLOCK_M)
    rows = _token_rows(b, j, wk, tokens, windows)[:, None] * (3 * dim) + h_col[None, :]
    mask = col_ok[:, None] & d_ok[None, :]
    tl.store(grad_qkv + rows + dim, (dk * (scale_log2 / LOG2E)).to(dtype), mask=mask)
    tl.store(grad_qkv + rows + 2 * dim, dv.to(dtype), mask=mask)


@triton.jit
def _attention_backward_q_kernel(
    grad_out, qkv, out, lse, q_argmax, grad_qkv,
    tokens, windows, queries, keys, q_stride, heads, head_dim, packed, q_pad, k_pad, q_shift, k_shift, scale_log2,
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
    q_op, do_op, delta, lse_log2, arg = _load_query_grads(
        qkv, out, grad_out, lse, q_argmax, b, h, w, i, row_ok, h_col, d_ok,
        tokens, windows, queries, q_stride, heads, dim)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_block in range(0, tl.cdiv(keys, k_slot)):
        wk, j, col_ok = _slot_rows(group, key_block, k_slot, k_shift, wpp, keys, windows, BLOCK_N)
        k, v = _load_kv(qkv, b, wk, j, col_ok, h_col, d_ok, tokens, windows, dim, 3 * dim)
        _, ds = _softmax_grads(q_op, k, v, do_op, delta, lse_log2, row_ok, col_ok, w, wk, scale_log2, PRECISION)
        dq += tl.dot(mma_operand(ds.to(qkv.dtype.element_ty)), mma_operand(k), input_precision=PRECISION)
    dq *= scale_log2 / LOG2E
    _store_routed_dq(grad_qkv, dq, arg, b, w, i, row_ok, h_col, d_ok, tokens, windows, queries, q_stride, 3 * dim)


def _benchmark(kernel_call, quantiles):
    """The active driver's benchmarker, looked up when autotuning first runs, as recent
    Triton does by default. Triton 3.2 looks it up when the kernel is decorated, which
    fails without a GPU driver: importing these kernels failed there (the CPU tests and
    the AOT compile check import them with no GPU)."""
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def _autotune(configs, kernel):
    """``triton.autotune(configs, key=_KEY)(kernel)`` with the lazy benchmarker; built
    through ``Autotuner`` because Triton 3.2's ``triton.autotune`` drops ``do_bench``."""
    return Autotuner(kernel, kernel.arg_names, configs, _KEY, None, None, do_bench=_benchmark)


_KEY = ["head_dim", "queries", "keys", "windows"]
_forward = _autotune(_configs(FORWARD_CONFIGS), _attention_forward_kernel)
# The backward kernels write every element of grad_qkv exactly once, so re-running
# them while autotuning is harmless.
_backward_kv = _autotune(_configs(BACKWARD_CONFIGS), _attention_backward_kv_kernel)
_backward_q = _autotune(_configs(BACKWARD_CONFIGS), _attention_backward_q_kernel)
KERNELS = (_forward, _backward_kv, _backward_q)


class Geometry:
    """The sizes of one call, checked (the checks of attention_layout's users in csrc)."""

    def __init__(self, op: str, qkv: torch.Tensor, heads: int, q_stride: int, windows: int):
        check_triton_main_tensor(op, qkv)
        self.batch, self.tokens, width = qkv.shape
        check_attention_args(op, self.tokens, width, heads, q_stride, windows)
        self.heads, self.q_stride, self.windows = heads, q_stride, windows
        self.dim = width // 3
        self.head_dim = self.dim // heads
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{op}: head_dim {self.head_dim} exceeds the Triton kernels' {MAX_HEAD_DIM}")
        self.keys = self.tokens // windows
        self.queries = self.keys // q_stride
        self.block_d = max(32, next_power_of_2(self.head_dim))

    def scalars(self, block_m: int, block_n: int):
        """The kernels' runtime arguments after the tensors (without fuse_dq)."""
        return (self.tokens,) + self.tile_scalars(block_m, block_n)

    def tile_scalars(self, block_m: int, block_n: int):
        """The attention arguments every attention kernel here takes after its layout's
        own (the window attention kernels share them): sizes, tile plan and scale."""
        packed, q_pad, k_pad, _, _ = tiling(self.queries, self.keys, self.windows, block_m, block_n)
        q_shift, k_shift = (q_pad.bit_length() - 1, k_pad.bit_length() - 1) if packed else (TILED_SHIFT, TILED_SHIFT)
        scale_log2 = self.head_dim ** -0.5 * LOG2E.value
        return (self.windows, self.queries, self.keys, self.q_stride, self.heads, self.head_dim,
                packed, q_pad, k_pad, q_shift, k_shift, scale_log2)

    def grid(self, tiles_of):
        """Grid over (batch, head, window group, tile) for a config's BLOCK_M/BLOCK_N."""
        def grid(meta):
            _, _, _, groups, q_tiles = tiling(self.queries, self.keys, self.windows, meta["BLOCK_M"], meta["BLOCK_N"])
            return (self.batch * self.heads * groups * tiles_of(meta, q_tiles),)
        return grid

    def constexprs(self):
        head_dim = self.head_dim if self.head_dim in SPECIALIZED_HEAD_DIMS else 0
        return {"BLOCK_D": self.block_d, "HEAD_DIM": head_dim, "PRECISION": "ieee"}


def forward(qkv: torch.Tensor, heads: int, q_stride: int, windows: int):
    g = Geometry("hiera_kernels::mask_unit_attention_triton", qkv, heads, q_stride, windows)
    qkv = qkv.contiguous()
    out = qkv.new_empty((g.batch, g.queries * windows, g.dim))
    lse = new_attention_lse(qkv, g)
    q_argmax = qkv.new_empty((g.batch, g.queries * windows, g.dim) if q_stride > 1 else (0,), dtype=torch.uint8)
    if out.numel() == 0:
        return out, lse, q_argmax
    # packed, q_pad and k_pad do not depend on the block sizes (the kernel derives the
    # rest from its own BLOCK_M/BLOCK_N), so any config's sizes give them.
    first = FORWARD_CONFIGS[0].kwargs
    launch(_forward, g.grid(lambda meta, q_tiles: q_tiles), qkv, out, lse, q_argmax,
           *g.scalars(first["BLOCK_M"], first["BLOCK_N"]), **g.constexprs())
    return out, lse, q_argmax


def backward(grad_out, qkv, out, lse, q_argmax, heads: int, q_stride: int, windows: int):
    op = "hiera_kernels::mask_unit_attention_backward_triton"
    g = Geometry(op, qkv, heads, q_stride, windows)
    # The saved tensors must be what the forward made of this qkv (see forward()).
    on = {"device": qkv.device, "device_of": "qkv"}
    out_shape = {"shape": (g.batch, g.queries * windows, g.dim), "shape_names": "B, queries * windows, dim_out"}
    check_tensor(op, "grad_out", grad_out, **on, dtype=qkv.dtype, dtype_of="qkv", **out_shape)
    check_tensor(op, "out", out, **on, dtype=qkv.dtype, dtype_of="qkv", **out_shape)
    check_tensor(op, "lse", lse, **on, dtype=torch.float32, shape=(g.batch, heads, windows, g.queries),
                 shape_names="B, heads, windows, queries")
    if q_stride == 1:  # no pooling: the forward returns an empty argmax
        out_shape = {"shape": (0,), "shape_names": "0 (q_stride 1)"}
    check_tensor(op, "q_argmax", q_argmax, **on, dtype=torch.uint8, **out_shape)
    qkv, out, grad_out, lse, q_argmax = (t.contiguous() for t in (qkv, out, grad_out, lse, q_argmax))
    grad_qkv = torch.empty_like(qkv)
    if grad_qkv.numel() == 0:
        return grad_qkv
    scalars = g.scalars(BACKWARD_BLOCK_M, BACKWARD_BLOCK_N)
    blocks = {"BLOCK_M": BACKWARD_BLOCK_M, "BLOCK_N": BACKWARD_BLOCK_N}
    packed = scalars[7]
    key_tiles = 1 if packed else triton.cdiv(g.keys, BACKWARD_BLOCK_N)
    fuse_dq = int(key_tiles == 1)  # one key block holds every key these queries see
    launch(_backward_kv, g.grid(lambda meta, q_tiles: key_tiles), grad_out, qkv, out, lse, q_argmax, grad_qkv,
           *scalars, fuse_dq, **g.constexprs(), **blocks)
    if not fuse_dq:
        launch(_backward_q, g.grid(lambda meta, q_tiles: q_tiles), grad_out, qkv, out, lse, q_argmax, grad_qkv,
               *scalars, **g.constexprs(), **blocks)
    return grad_qkv
