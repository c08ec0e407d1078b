"""What every adapter shares: the binding plan, the patch record, the one way to find a
family's modules, and the op calls its bound functions make."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import epilogues, ops, recompute
from ..layer_norm import layer_norm
from ..models.hiera import patch_conv_input

RECORD = "_hiera_kernels_patch"


@dataclass
class Binding:
    """Bind ``function`` (taking the module as ``self``) as ``module.<name>``."""

    path: str
    module: nn.Module
    name: str
    function: Callable


@dataclass
class PatchRecord:
    backend: Optional[str]  # what the bound functions pass to hiera_kernels.ops (None: the default)
    adapter: str            # the family that recognised the module
    names: Tuple[str, ...]  # the instance attributes patch() added; unpatch() deletes them


@dataclass
class Rule:
    """Instances of ``module_name.class_name`` get ``function`` as ``name``, after
    ``validate(module, path)`` (which raises ValueError for what the ops cannot run)."""

    module_name: str
    class_name: str
    name: str
    function: Callable
    validate: Optional[Callable[[nn.Module, str], None]] = None

    @property
    def qualname(self) -> str:
        return f"{self.module_name}.{self.class_name}"


def backend_of(module: nn.Module) -> Optional[str]:
    """The backend a patched module's ops run on."""
    return getattr(module, RECORD).backend


def patch_embed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A patch embedding's own forward (official's and timm's take a mask, SAM 2's does
    not) on :func:`patch_conv_input`'s image: channels-last on CPU, so the conv writes
    NHWC and the tokens or map it returns are contiguous."""
    return type(self).forward(self, patch_conv_input(x, backend_of(self)), *args, **kwargs)


def find(model: nn.Module, rules: Sequence[Rule], family: str) -> List[Binding]:
    """One binding per module of ``model`` that an instance of a rule's class is.

    The classes are looked up in ``sys.modules`` only: if the family's package was never
    imported, no instance of its classes can exist, and importing it here would cost
    seconds for nothing. A subclass that overrides the method we would replace computes
    something we do not know: it keeps its own (with a warning)."""
    classes = []
    for rule in rules:
        module = sys.modules.get(rule.module_name)
        cls = getattr(module, rule.class_name, None) if module is not None else None
        if cls is not None:
            classes.append((rule, cls))
    bindings = []
    for path, module in model.named_modules():
        bound = set()
        for rule, cls in classes:
            # Rules are most specific first: a subclass's rule (the MAE's forward) wins
            # over its base class's for the same name.
            if not isinstance(module, cls) or rule.name in bound:
                continue
            bound.add(rule.name)
            if getattr(type(module), rule.name) is not getattr(cls, rule.name):
                warnings.warn(
                    f"hiera_kernels.patch: left {path or '<root>'} ({type(module).__qualname__}) unpatched: it "
                    f"overrides {family} {rule.qualname}.{rule.name}",
                    stacklevel=4,
                )
                continue
            if rule.validate is not None:
                rule.validate(module, path or "<root>")
            bindings.append(Binding(path or "<root>", module, rule.name, rule.function))
    return bindings


def check_geometry(path: str, size: Sequence[int], schedule: Sequence[Sequence[int]]) -> None:
    """The token grid must split into whole mask units (as the ops require)."""
    ops._check_geometry(f"patch: {path}", list(size), [tuple(s) for s in schedule])


def check_attention(path: str, dim_out: int, heads: int, q_stride: int, window_size: int, use_mask_unit_attn: bool) -> None:
    if heads < 1 or dim_out % heads:
        raise ValueError(f"patch: {path}: dim_out={dim_out} is not divisible by heads={heads}")
    if q_stride < 1:
        raise ValueError(f"patch: {path}: q_stride={q_stride} must be >= 1")
    if use_mask_unit_attn and window_size < 1:
        raise ValueError(f"patch: {path}: mask-unit attention with window_size={window_size}")


def attention(module: nn.Module, x: torch.Tensor, heads: int, q_stride: int, window_size: int, use_mask_unit_attn: bool):
    """Every family's MaskUnitAttention body: ``proj(attention(qkv(x)))``,
    x [B, N, dim] -> [B, N // q_stride, dim_out], with the attention between the two
    Linears (q pooling, windows, SDPA, head merge) one op."""
    return attend(module, module.qkv(x), heads, q_stride, window_size, use_mask_unit_attn)


def attend(module: nn.Module, qkv: torch.Tensor, heads: int, q_stride: int, window_size: int, use_mask_unit_attn: bool):
    """:func:`attention` from the qkv Linear's output [B, N, 3 * dim_out] on."""
    out = ops.mask_unit_attention(qkv, heads, q_stride, window_size, use_mask_unit_attn, backend=backend_of(module))
    return module.proj(out)


def runs_bound(module: nn.Module, function) -> bool:
    """Whether ``module.forward`` is ``function`` as :func:`hiera_kernels.patch` bound it:
    not a subclass's own forward (left unpatched) nor a wrapper set on the instance since.
    Only then may a patched block do that forward's work itself (from the qkv on, in
    training) or pass it arguments only the bound forward takes (SAM 2's ``residual``)."""
    return getattr(module.forward, "__func__", None) is function


def inactive(module: nn.Module) -> bool:
    """An ``Identity``, or a drop path / dropout that is off (eval mode, or probability 0)."""
    return isinstance(module, nn.Identity) or not module.training or getattr(module, "drop_prob", getattr(module, "p", None)) == 0


def timm_mlp_parts(mlp: nn.Module) -> Optional[Tuple[nn.Linear, str, nn.Linear]]:
    """(fc1, activation, fc2) when ``mlp`` is timm's ``Mlp`` computing ``fc2(act(fc1(x)))``
    and nothing else (no norm, dropouts off, a GELU; as the official and timm Hieras
    build it), else None. Its Linears then run fused (epilogues, recompute)."""
    timm_mlp = sys.modules.get("timm.layers.mlp")
    if timm_mlp is None or type(mlp) is not timm_mlp.Mlp:
        return None
    activation = epilogues.activation_name(mlp.act)
    if activation is None or not isinstance(mlp.norm, nn.Identity) or not (inactive(mlp.drop1) and inactive(mlp.drop2)):
        return None
    return mlp.fc1, activation, mlp.fc2


def fusable_skip(drop_path: nn.Module, scale: Optional[nn.Module] = None) -> bool:
    """Whether a block may add a branch's skip connection inside the branch's own op
    (fc2's epilogue, :func:`hiera_kernels.recompute.layer_norm_attention`): what wraps the
    branch computes nothing now (``drop_path`` :func:`inactive`; ``scale``, timm's
    LayerScale slot, absent or an Identity) and runs no hook."""
    wrappers = (drop_path,) if scale is None else (drop_path, scale)
    return (inactive(drop_path) and (scale is None or isinstance(scale, nn.Identity))
            and not any(epilogues.hooked(m) for m in wrappers))


def mlp_branch(norm: nn.Module, mlp: nn.Module, parts: Optional[Tuple[nn.Linear, str, nn.Linear]],
               x: torch.Tensor, backend: Optional[str], residual: bool = False) -> torch.Tensor:
    """``mlp(norm(x))``, or ``x + mlp(norm(x))`` with ``residual`` (the block's skip
    connection, where :func:`fusable_skip`); in training on a kernel backend with ``parts`` =
    (fc1, activation, fc2), the :mod:`hiera_kernels.recompute` op (norm(x) and the GELU
    recomputed in the backward; the skip connection added in fc2's epilogue, its gradient
    joined in the LayerNorm's backward)."""
    if parts is not None and recompute.applies(norm, (parts[0], parts[2]), x, backend, mlp):
        fc1, activation, fc2 = parts
        return recompute.layer_norm_mlp(norm, fc1, activation, fc2, x, residual=residual)
    out = mlp(layer_norm(norm, x, backend))
    return x + out if residual else out


def pool(module: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Every family's residual ``do_pool``: [B, N, C] -> [B, N // stride, C], the max over
    the leading stride digit of the unrolled order (a 2x2 max-pool of the grid)."""
    return ops.query_pool(x, stride, backend=backend_of(module))

