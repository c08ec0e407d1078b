"""LayerNorm on the C++ CPU kernels (``hiera_kernels::layer_norm`` and
``hiera_kernels::layer_norm_backward``, csrc/cpu/layer_norm.cpp): the Hiera blocks' norm1
and norm2 (the drop-in model's and patched models'), and the recompute ops' LayerNorm.

ATen's CPU LayerNorm over Hiera's short rows (C = 96 .. 1024) runs a dependent chain of
adds per row; the kernel sums eight rows side by side and takes 0.5-0.6x ATen's time on
Hiera-B's bf16 rows (``bench/bench_ops.py``). The op has ATen's ``native_layer_norm``
contract over the last dim (mean and rstd in x's dtype, [..., 1]); its backward
(:func:`native_layer_norm_backward`, also the recompute ops') is the backward kernel
where :func:`cpu_kernel_takes` the tensors, ATen's ``native_layer_norm_backward``
elsewhere and under ``create_graph`` (the kernel is not differentiable).

:func:`runs_kernel` says where a model's LayerNorm module runs it: a plain LayerNorm
(:func:`plain_layer_norm`, no hooks) on CPU float tensors with its weight and bias in x's
dtype, backend ``"cpu"`` or ``"auto"`` with the extension built, not while
``torch.compile`` traces (inductor fuses LayerNorm itself) nor under CPU autocast (which
runs LayerNorm in float32). Everywhere else, ``"torch"`` always, the module itself runs.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

from . import backends
from ._extension import EXTENSION
from .epilogues import hooked
from .library import NAMESPACE, mark_extra_outputs, needs_first_gradient

KERNEL_BACKENDS = ("cpu", "auto")
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # layer_norm's autograd (its schema: library.py)


def plain_layer_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` computes ``F.layer_norm`` over the last dim: ``nn.LayerNorm``, or
    timm's ``LayerNorm`` (the official and timm Hieras' norm) with its fast-norm option off."""
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return False
    if type(norm) is nn.LayerNorm:
        return True
    timm_norm = sys.modules.get("timm.layers.norm")  # imported by timm if anything made one
    return timm_norm is not None and type(norm) is timm_norm.LayerNorm and not norm._fast_norm


def cpu_kernel_takes(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether a C++ CPU kernel (this module's LayerNorm, recompute's GELU) can take ``x``
    and its ``params`` (each None or of x's dtype and device): the extension is built, x is
    a CPU float tensor. Elsewhere ATen's op runs (it also takes mixed dtypes)."""
    if not EXTENSION.loaded or x.device.type != "cpu" or x.dtype not in backends.WITH_FLOAT64:
        return False
    return all(p is None or (p.dtype == x.dtype and p.device == x.device) for p in params)


def runs_kernel(norm: nn.Module, x: torch.Tensor, backend: Optional[str]) -> bool:
    """Whether :func:`layer_norm` runs ``norm`` on ``x`` with the C++ kernel (see the module docstring)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if (backend or backends.get_backend()) not in KERNEL_BACKENDS or not plain_layer_norm(norm) or hooked(norm):
        return False
    return cpu_kernel_takes(x, norm.weight, norm.bias)


def layer_norm(norm: nn.Module, x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    """``norm(x)``: on the C++ kernel where :func:`runs_kernel` says so, else the module."""
    if runs_kernel(norm, x, backend):
        return torch.ops.hiera_kernels.layer_norm(x, norm.weight, norm.bias, norm.eps)[0]
    return norm(x)


def native_layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
    """(y, mean, rstd) as ``aten::native_layer_norm`` over the last dim, on the kernel for
    CPU tensors where the extension is built (the recompute ops' forward and backward)."""
    if cpu_kernel_takes(x, weight, bias):
        return torch.ops.hiera_kernels.layer_norm(x, weight, bias, eps)
    return torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)


def native_layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], needs,
                               eps: Optional[float] = None, grad_skip: Optional[torch.Tensor] = None):
    """(grad_x, grad_weight, grad_bias, y, grad_skip_sum) of a LayerNorm over the last dim
    from its saved mean and rstd, as ``aten::native_layer_norm_backward``: the gradients
    each computed only where ``needs`` (three bools) says so, else None; where ``eps`` is
    given, ``y`` is the forward's output recomputed (:func:`native_layer_norm`'s bits);
    where ``grad_skip`` (x's shape; needs[0]) is given, ``grad_x`` includes it and
    ``grad_skip_sum`` is its column sums [C]; else None. On the kernel for CPU tensors where
    the extension is built, outside ``create_graph``: one pass over x for y and the
    backward, the skip gradient added before grad_x is rounded."""
    torch._check(grad_skip is None or bool(needs[0]),
                 lambda: "native_layer_norm_backward: grad_skip is added to grad_x, which needs[0] does not ask for")
    mask = [bool(needs[0]), weight is not None and bool(needs[1]), bias is not None and bool(needs[2])]
    if not torch.is_grad_enabled() and cpu_kernel_takes(x, grad_y, mean, rstd, weight, bias, grad_skip):
        grad_x, grad_weight, grad_bias, y, grad_skip_sum = torch.ops.hiera_kernels.layer_norm_backward(
            grad_y, x, mean, rstd, weight, mask, bias if eps is not None else None, eps, grad_skip)
        grads = tuple(grad if wanted else None for grad, wanted in zip((grad_x, grad_weight, grad_bias), mask))
        return *grads, y if eps is not None else None, grad_skip_sum if grad_skip is not None else None
    y = native_layer_norm(x, weight, bias, eps)[0] if eps is not None else None
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
        grad_y.contiguous(), x, [x.shape[-1]], mean, rstd, weight, bias, mask)
    grad_skip_sum = None
    if grad_skip is not None:
        grad_x = grad_x + grad_skip if torch.is_grad_enabled() else grad_x.add_(grad_skip)
        grad_skip_sum = grad_skip.reshape(-1, x.shape[-1]).sum(0)
    return grad_x, grad_weight, grad_bias, y, grad_skip_sum


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    mark_extra_outputs(ctx, mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)


@needs_first_gradient
def _layer_norm_autograd(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    return (*native_layer_norm_backward(grad_y, x, mean, rstd, weight, bias, ctx.needs_input_grad[:3])[:3], None)


torch.library.register_autograd(f"{NAMESPACE}::layer_norm", _layer_norm_autograd, setup_context=_setup_layer_norm, lib=_lib)


def status() -> str:
    """One line for ``info``: where the blocks' LayerNorms and the recompute ops' GELU
    backward run on the C++ kernels, or why they do not."""
    where = f"backends {'/'.join(KERNEL_BACKENDS)}, CPU tensors"
    if not EXTENSION.loaded:
        return f"LayerNorm and GELU-backward CPU kernels ({where}): unavailable, ATen's instead: the extension is not built"
    return (f"LayerNorm and GELU-backward CPU kernels ({where}): available (hiera_kernels::layer_norm and "
            "layer_norm_backward for the blocks' norm1/norm2 and training's recompute ops; "
            "hiera_kernels::gelu_recompute_backward_ in training's layer_norm_mlp)")
