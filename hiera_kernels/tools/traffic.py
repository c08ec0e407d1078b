"""Device-independent figures of one model step.

* :func:`bytes_moved`: bytes read and written by every op of one forward except the
  GEMMs and convolutions, counted by a ``TorchDispatchMode`` (so custom ops count
  their real inputs and outputs, and views count nothing). It predicts the
  memory-bound part of the time on a GPU.
* :func:`saved_activation_bytes`: bytes the autograd graph keeps for the backward
  (parameters excluded), summed through ``saved_tensors_hooks`` at the end of the
  forward, when they are all alive: the training step's activation peak.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .. import epilogues

aten = torch.ops.aten
GEMM_AND_CONV = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.convolution.default,
    aten.mkldnn_convolution.default,
}
# The GEMM with bias/GELU epilogue of hiera_kernels.epilogues (a private op: only where it was probed usable).
# Its skip-connection overload is a GEMM too, plus one read beyond it: the residual (argument 1).
GEMM_WITH_RESIDUAL = set()
if epilogues.UNAVAILABLE is None:
    GEMM_AND_CONV.add(torch.ops.mkldnn._linear_pointwise.default)
    GEMM_WITH_RESIDUAL.add(torch.ops.mkldnn._linear_pointwise.binary)
# Ops that allocate or relabel memory without reading or writing the elements.
NO_TRAFFIC = {
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.empty_strided.default,
    aten.new_empty.default,
    aten._unsafe_view.default,
    aten.detach.default,
    aten.lift_fresh.default,
}


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (broadcast dims count once)."""
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return distinct * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Sums, per op, the footprint of its tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.by_op: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in GEMM_AND_CONV or func in NO_TRAFFIC or func.is_view:
            return out
        if func in GEMM_WITH_RESIDUAL:
            moved = footprint(args[1])
        else:
            moved = sum(footprint(t) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
        name = str(func.overloadpacket)
        self.by_op[name] = self.by_op.get(name, 0) + moved
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def bytes_moved(step: Callable[[], object]) -> ByteCounter:
    """Run ``step`` (one forward) under a :class:`ByteCounter` and return it."""
    with torch.no_grad(), ByteCounter() as counter:
        step()
    return counter


def saved_activation_bytes(model: torch.nn.Module, step: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves during ``step`` (one forward with
    grad), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(saved.values())
