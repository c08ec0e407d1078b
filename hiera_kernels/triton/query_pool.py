"""Triton query pooling: out[b, i, c] = max_s x[b, s * No + i, c], with a one-byte argmax.

In [B, N, C] with N = stride * No, an image's stride candidates are `stride`
contiguous slabs of No * C elements, so both kernels walk flat element indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..library import check_pool_stride, check_triton_main_tensor
from .common import check_tensor, launch

BLOCK = 1024


@triton.jit
def pool_takes(candidate, best):
    """PyTorch's max(dim): the first maximum wins ties, the first NaN wins over everything."""
    return (candidate > best) | ((candidate != candidate) & (best == best))


@triton.jit
def _query_pool_kernel(x, out, argmax, total, slab, stride, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat index into out [B, slab]
    ok = i < total
    slab = slab.to(tl.int64)  # s * slab passes 2^31 in images of more than 2^31 elements
    first = x + (i // slab) * (stride - 1) * slab + i  # image b's slab 0: b * stride * slab + (i - b * slab)
    best = tl.load(first, mask=ok).to(tl.float32)  # fp32 compares exactly for fp16/bf16
    arg = tl.zeros([BLOCK], tl.int32)
    for s in range(1, stride):
        candidate = tl.load(first + s * slab, mask=ok).to(tl.float32)
        take = pool_takes(candidate, best)
        best = tl.where(take, candidate, best)
        arg = tl.where(take, s, arg)
    tl.store(out + i, best.to(out.dtype.element_ty), mask=ok)  # exact: best is one of the inputs
    tl.store(argmax + i, arg.to(tl.uint8), mask=ok)


@triton.jit
def _query_pool_backward_kernel(grad_out, argmax, grad_in, total, slab, stride, BLOCK: tl.constexpr):
    # Every grad_in element is written once: the routed gradient or zero (no zero-fill pass).
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    slab = slab.to(tl.int64)  # s * slab passes 2^31 in images of more than 2^31 elements
    grad = tl.load(grad_out + i, mask=ok)
    arg = tl.load(argmax + i, mask=ok).to(tl.int32)
    first = grad_in + (i // slab) * (stride - 1) * slab + i
    for s in range(0, stride):
        tl.store(first + s * slab, tl.where(arg == s, grad, tl.zeros_like(grad)), mask=ok)


def _check(op: str, x: torch.Tensor, stride: int) -> None:
    check_triton_main_tensor(op, x)  # the max runs in fp32
    check_pool_stride(op, stride)


def query_pool(x, stride):
    op = "hiera_kernels::query_pool_triton"
    _check(op, x, stride)
    if x.shape[1] % stride:
        raise ValueError(f"{op}: N={x.shape[1]} is not divisible by stride={stride}")
    x = x.contiguous()
    B, N, C = x.shape
    out = x.new_empty((B, N // stride, C))
    argmax = x.new_empty((B, N // stride, C), dtype=torch.uint8)
    if out.numel():
        launch(_query_pool_kernel, (triton.cdiv(out.numel(), BLOCK),),
               x, out, argmax, out.numel(), (N // stride) * C, stride, BLOCK=BLOCK)
    return out, argmax


def query_pool_backward(grad_out, argmax, stride):
    op = "hiera_kernels::query_pool_backward_triton"
    _check(op, grad_out, stride)
    check_tensor(op, "argmax", argmax, device=grad_out.device, device_of="grad_out", dtype=torch.uint8,
                 shape=grad_out.shape, shape_names="B, N / stride, C of grad_out")
    grad_out, argmax = grad_out.contiguous(), argmax.contiguous()
    B, No, C = grad_out.shape
    grad_in = grad_out.new_empty((B, No * stride, C))
    if grad_out.numel():
        launch(_query_pool_backward_kernel, (triton.cdiv(grad_out.numel(), BLOCK),),
               grad_out, argmax, grad_in, grad_out.numel(), No * C, stride, BLOCK=BLOCK)
    return grad_in
