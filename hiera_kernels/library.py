"""The kernel ops: schemas defined once with ``torch.library``, plus fake and autograd.

Every backend except ``"torch"`` runs these ops. Their C++ kernels register per
dispatch key when ``hiera_kernels._C`` loads: ``csrc/cpu/*.cpp`` for CPU, and (planned)
``csrc/cuda/*.cu`` for CUDA. Triton kernels (planned) will get ops of their own
(``*_triton``), since they share the CUDA dispatch key with the CUDA C++ kernels.

The schemas speak in flat integer lists: an unroll schedule ``[(2, 2), (2, 2)]``
travels as ``strides=[2, 2, 2, 2]`` with ``len(size)`` telling the dims apart.
The permutation ops keep the [B, N, C] shape; :mod:`hiera_kernels.ops` adds the
views that give reroll its spatial shape.

    unroll(x, size, strides, windowed)   [B, N, C] raster (or windowed) -> unrolled
    reroll(x, size, strides, windowed)   [B, N, C] unrolled -> raster (or windowed)
    query_pool(x, stride)                [B, N, C] -> ([B, N/stride, C], uint8 argmax)
    query_pool_backward(grad, argmax, stride) -> [B, N, C]

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

OPS = {
    "unroll": torch.ops.hiera_kernels.unroll.default,
    "reroll": torch.ops.hiera_kernels.reroll.default,
    "query_pool": torch.ops.hiera_kernels.query_pool.default,
    "query_pool_backward": torch.ops.hiera_kernels.query_pool_backward.default,
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
