"""LayerNorm on the C++ CPU kernel (``hiera_kernels::layer_norm``, csrc/cpu/layer_norm.cpp):
the Hiera blocks' norm1 and norm2 (the drop-in model's and patched models').

ATen's CPU LayerNorm over Hiera's short rows (C = 96 .. 1024) runs a dependent chain of
adds per row; the kernel sums eight rows side by side and takes 0.5-0.6x ATen's time on
Hiera-B's bf16 rows (``bench/bench_ops.py``). The op has ATen's ``native_layer_norm``
contract over the last dim (mean and rstd in x's dtype, [..., 1]), so its backward is
ATen's ``native_layer_norm_backward``.

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

KERNEL_BACKENDS = ("cpu", "auto")


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


def status() -> str:
    """One line for ``info``: where the blocks' LayerNorms and the recompute ops' GELU
    backward run on the C++ kernels, or why they do not."""
    where = f"backends {'/'.join(KERNEL_BACKENDS)}, CPU tensors"
    if not EXTENSION.loaded:
        return f"LayerNorm and GELU-backward CPU kernels ({where}): unavailable, ATen's instead: the extension is not built"
    return (f"LayerNorm and GELU-backward CPU kernels ({where}): available (hiera_kernels::layer_norm for the "
            "blocks' norm1/norm2; hiera_kernels::gelu_recompute_backward in training's layer_norm_mlp)")
