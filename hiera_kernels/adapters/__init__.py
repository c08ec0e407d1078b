"""``patch(model)`` / ``unpatch(model)``: run an existing Hiera (official package, timm,
Hugging Face transformers, or SAM 2's) on :mod:`hiera_kernels.ops`, in place.

Per instance only. Each family's adapter (one module each: :mod:`.official`,
:mod:`.timm_hiera`, :mod:`.transformers_hiera`, :mod:`.sam2_hieradet`) lists the modules it recognises and, for
each, a function to bind on that one instance (``types.MethodType``) in place of a method
of its class (``forward``, or HF's ``HieraEncoder.reroll``). Nothing else changes: the
model keeps its class, parameters, buffers, hooks and ``state_dict`` keys, and no class or
function of another package is touched, so other instances of the same classes run as
before. A record on each patched instance (``_hiera_kernels_patch``) holds the backend and
the names bound; :func:`unpatch` deletes exactly those instance attributes, which brings
back the class's own methods.

Every adapter plans (and validates) first; only then is anything bound, and a failure
while binding unbinds what was bound, so a model is never left half patched.
"""

from __future__ import annotations

import types
from typing import List, Optional, Tuple

import torch.nn as nn

from .. import epilogues
from ..backends import check_name
from . import official, sam2_hieradet, timm_hiera, transformers_hiera
from ._common import RECORD, Binding, PatchRecord, backend_of

ADAPTERS = (official, timm_hiera, transformers_hiera, sam2_hieradet)


def is_patched(model: nn.Module) -> bool:
    return any(RECORD in vars(m) for m in model.modules())


def _plan(model: nn.Module) -> List[Tuple[str, Binding]]:
    """(adapter name, binding) for every module any adapter recognises in ``model`` (a
    model may hold Hiera backbones of several families)."""
    plan = [(adapter.NAME, b) for adapter in ADAPTERS for b in adapter.bindings(model)]
    if plan:
        return plan
    from ..models.hiera import UsesBackend  # the drop-in models already run on the ops

    if any(isinstance(m, UsesBackend) for m in model.modules()):
        raise TypeError(
            f"patch: {type(model).__name__} is a hiera_kernels model; it already runs on hiera_kernels.ops "
            "(choose its backend with set_backend)"
        )
    looked_for = "; ".join(f"{a.NAME}: {', '.join(a.LOOKS_FOR)}" for a in ADAPTERS)
    raise TypeError(f"patch: found no Hiera modules in {type(model).__name__}; looked for {looked_for}")


def patch(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Route ``model``'s unroll, reroll, query pooling and mask-unit attention (SAM 2's
    Hiera: its windowed attention) through :mod:`hiera_kernels.ops` on ``backend`` (None: the library default, ``"auto"`` unless
    set). ``model`` may be a whole Hiera or any module holding one (a backbone inside a
    bigger model, a DDP wrapper). Patches in place and returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        check_name(backend, "patch")
    if is_patched(model):
        raise ValueError(f"patch: {type(model).__name__} is already patched; call hiera_kernels.unpatch(model) first")
    plan = _plan(model)
    for _, b in plan:
        # An instance attribute of that name is someone else's per-instance patch (e.g.
        # hiera-optim's): binding over it would silently drop what it does.
        if b.name in vars(b.module):
            raise ValueError(
                f"patch: {b.path or type(model).__name__} ({type(b.module).__name__}) already has its own "
                f"instance attribute {b.name!r} (patched by something else?); refusing to replace it"
            )

    records = {}
    try:
        for adapter, b in plan:
            setattr(b.module, b.name, types.MethodType(b.function, b.module))
            records.setdefault(id(b.module), (b.module, adapter, []))[2].append(b.name)
        for module, adapter, names in records.values():
            setattr(module, RECORD, PatchRecord(backend, adapter, tuple(names)))
    except BaseException:
        for module, _, names in records.values():
            for name in names:
                vars(module).pop(name, None)
            vars(module).pop(RECORD, None)
        raise
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every patched module gets its class's own methods back."""
    patched = [m for m in model.modules() if RECORD in vars(m)]
    if not patched:
        raise ValueError(f"unpatch: {type(model).__name__} has no module patched by hiera_kernels.patch")
    for module in patched:
        for name in vars(module)[RECORD].names:
            vars(module).pop(name, None)
        del vars(module)[RECORD]
        epilogues.forget(module)  # packed weights of the Linears the bound code ran fused (SAM 2's)
        sam2_hieradet.forget(module)  # a SAM 2 trunk's kept pos embed
    return model


__all__ = ["patch", "unpatch", "is_patched", "backend_of", "PatchRecord", "ADAPTERS"]
