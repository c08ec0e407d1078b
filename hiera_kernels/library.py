"""The kernel ops: schemas defined once with ``torch.library``, plus fake and autograd.

Every backend except ``"torch"`` runs these ops. Their C++ kernels register per
dispatch key when ``hiera_kernels._C`` loads: ``csrc/cpu/*.cpp`` for CPU, and
``csrc/cuda/*.cpp`` for CUDA (entry points; their kernels are in ``csrc/cuda/*.cu``),
compiled in when torch has CUDA and nvcc is found. Triton kernels (planned) will get
ops of their own (``*_triton``), since they share the CUDA dispatch key with the CUDA
C++ kernels.

The schemas speak in flat integer lists: an unroll schedule ``[(2, 2), (2, 2)]``
travels as ``strides=[2, 2, 2, 2]`` with ``len(size)`` telling the dims apart.
The permutation ops keep the [B, N, C] shape; :mod:`hiera_kernels.ops` adds the
views that give reroll its spatial shape.

    unroll(x, size, strides, windowed)   [B, N, C] raster (or windowed) -> unrolled
    reroll(x, size, strides, windowed)   [B, N, C] unrolled -> raster (or windowed)
    query_pool(x, stride)                [B, N, C] -> ([B, N/stride, C], uint8 argmax)
    query_pool_backward(grad, argmax, stride) -> [B, N, C]
    mask_unit_attention(qkv, heads, q_stride, windows)
        qkv [B, N, 3 * C] -> (out [B, N / q_stride, C], lse [B, heads, windows, N / (windows * q_stride)]
                              in float32 (float64 for float64 qkv),
                              q_argmax uint8 [B, N / q_stride, C], or [0] when q_stride == 1)
    mask_unit_attention_backward(grad_out, qkv, out, lse, q_argmax, heads, q_stride, windows) -> grad_qkv

``windowed`` order is Reroll-with-a-mask order: unit after unit, each unit's
tokens in raster order over the unit shape; ``size`` then only gives the number
of dims. unroll and reroll are each other's inverse and each other's backward.
"""

from __future__ import annotations

import torch

NAMESPACE = "hiera_kernels"

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define("unroll(Tensor x, int[] size, int[] strides, bool windowed) -> Tensor")
_lib.define("reroll(Tensor x, int[] size, int[] strides, bool windowed) -> Tensor")
_lib.define("query_pool(Tensor x, int stride) -> (Tensor, Tensor)")
_lib.define("query_pool_backward(Tensor grad_out, Tensor argmax, int stride) -> Tensor")
_lib.define("mask_unit_attention(Tensor qkv, int heads, int q_stride, int windows) -> (Tensor, Tensor, Tensor)")
_lib.define(
    "mask_unit_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor q_argmax, "
    "int heads, int q_stride, int windows) -> Tensor"
)

OPS = {
    "unroll": torch.ops.hiera_kernels.unroll.default,
    "reroll": torch.ops.hiera_kernels.reroll.default,
    "query_pool": torch.ops.hiera_kernels.query_pool.default,
    "query_pool_backward": torch.ops.hiera_kernels.query_pool_backward.default,
    "mask_unit_attention": torch.ops.hiera_kernels.mask_unit_attention.default,
    "mask_unit_attention_backward": torch.ops.hiera_kernels.mask_unit_attention_backward.default,
}


# ----------------------------------------------------------------------------- fake
@torch.library.register_fake("hiera_kernels::unroll")
def _unroll_fake(x, size, strides, windowed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("hiera_kernels::reroll")
def _reroll_fake(x, size, strides, windowed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("hiera_kernels::query_pool")
def _query_pool_fake(x, stride):
    B, N, C = x.shape
    torch._check(N % stride == 0, lambda: f"query_pool: N={N} is not divisible by stride={stride}")
    out = x.new_empty((B, N // stride, C))
    return out, x.new_empty((B, N // stride, C), dtype=torch.uint8)


@torch.library.register_fake("hiera_kernels::query_pool_backward")
def _query_pool_backward_fake(grad_out, argmax, stride):
    B, N, C = grad_out.shape
    return grad_out.new_empty((B, N * stride, C))


@torch.library.register_fake("hiera_kernels::mask_unit_attention")
def _mask_unit_attention_fake(qkv, heads, q_stride, windows):
    B, N, width = qkv.shape
    torch._check(width % (3 * heads) == 0, lambda: f"mask_unit_attention: qkv width {width} is not divisible by {3 * heads}")
    torch._check(N % (windows * q_stride) == 0, lambda: f"mask_unit_attention: N={N} does not split into {windows} windows")
    dim, queries = width // 3, N // (windows * q_stride)
    out = qkv.new_empty((B, queries * windows, dim))
    lse_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32  # the accumulation type
    lse = qkv.new_empty((B, heads, windows, queries), dtype=lse_dtype)
    argmax_shape = (B, queries * windows, dim) if q_stride > 1 else (0,)
    return out, lse, qkv.new_empty(argmax_shape, dtype=torch.uint8)


@torch.library.register_fake("hiera_kernels::mask_unit_attention_backward")
def _mask_unit_attention_backward_fake(grad_out, qkv, out, lse, q_argmax, heads, q_stride, windows):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------- autograd
def _setup_permutation(ctx, inputs, output):
    _, ctx.size, ctx.strides, ctx.windowed = inputs


def _unroll_backward(ctx, grad):
    return OPS["reroll"](grad, ctx.size, ctx.strides, ctx.windowed), None, None, None


def _reroll_backward(ctx, grad):
    return OPS["unroll"](grad, ctx.size, ctx.strides, ctx.windowed), None, None, None


torch.library.register_autograd("hiera_kernels::unroll", _unroll_backward, setup_context=_setup_permutation)
torch.library.register_autograd("hiera_kernels::reroll", _reroll_backward, setup_context=_setup_permutation)


def _setup_query_pool(ctx, inputs, output):
    _, ctx.stride = inputs
    argmax = output[1]
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(argmax)


def _query_pool_backward(ctx, grad, _grad_argmax):
    (argmax,) = ctx.saved_tensors
    return OPS["query_pool_backward"](grad.contiguous(), argmax, ctx.stride), None


torch.library.register_autograd("hiera_kernels::query_pool", _query_pool_backward, setup_context=_setup_query_pool)


def _setup_attention(ctx, inputs, output):
    qkv, ctx.heads, ctx.q_stride, ctx.windows = inputs
    out, lse, q_argmax = output
    ctx.mark_non_differentiable(lse, q_argmax)
    ctx.save_for_backward(qkv, out, lse, q_argmax)


def _attention_backward(ctx, grad_out, _grad_lse, _grad_argmax):
    qkv, out, lse, q_argmax = ctx.saved_tensors
    grad_qkv = OPS["mask_unit_attention_backward"](
        grad_out.contiguous(), qkv, out, lse, q_argmax, ctx.heads, ctx.q_stride, ctx.windows
    )
    return grad_qkv, None, None, None


torch.library.register_autograd(
    "hiera_kernels::mask_unit_attention", _attention_backward, setup_context=_setup_attention
)
