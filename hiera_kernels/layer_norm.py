"""LayerNorm on the C++ CPU kernel (``hiera_kernels::layer_norm``, csrc/cpu/layer_norm.cpp).

ATen's CPU LayerNorm over Hiera's short rows (C = 96 .. 1024) runs a dependent chain of
adds per row; the kernel sums eight rows side by side and takes 0.5-0.6x ATen's time on
Hiera-B's bf16 rows (``bench/bench_ops.py``). The op has ATen's ``native_layer_norm``
contract over the last dim (mean and rstd in x's dtype, [..., 1]), so its backward is
ATen's ``native_layer_norm_backward``.

:func:`runs_kernel` says where a model's LayerNorm module runs it: a plain LayerNorm
(:func:`plain_layer_norm`, no hooks) on CPU float tensors, backend ``"cpu"`` or
``"auto"`` with the extension built, not while ``torch.compile`` traces (inductor fuses
LayerNorm itself) nor under CPU autocast (which runs LayerNorm in float32). Everywhere
else, ``"torch"`` always, the module itself runs.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

from . import backends
from ._extension import EXTENSION

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


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks (which must see its call: then it runs as a module)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def runs_kernel(norm: nn.Module, x: torch.Tensor, backend: Optional[str]) -> bool:
    """Whether :func:`layer_norm` runs ``norm`` on ``x`` with the C++ kernel (see the module docstring)."""
    if not EXTENSION.loaded or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if (backend or backends.get_backend()) not in KERNEL_BACKENDS or x.device.type != "cpu":
        return False
    if not plain_layer_norm(norm) or hooked(norm) or x.dtype not in backends.WITH_FLOAT64:
        return False
    return all(p.dtype == x.dtype and p.device == x.device for p in (norm.weight, norm.bias) if p is not None)


def layer_norm(norm: nn.Module, x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    """``norm(x)``: on the C++ kernel where :func:`runs_kernel` says so, else the module."""
    if runs_kernel(norm, x, backend):
        return torch.ops.hiera_kernels.layer_norm(x, norm.weight, norm.bias, norm.eps)[0]
    return norm(x)


def native_layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
    """(y, mean, rstd) as ``aten::native_layer_norm`` over the last dim, on the kernel for
    CPU tensors where the extension is built (the recompute ops' forward and backward)."""
    if EXTENSION.loaded and x.device.type == "cpu" and x.dtype in backends.WITH_FLOAT64:
        return torch.ops.hiera_kernels.layer_norm(x, weight, bias, eps)
    return torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
