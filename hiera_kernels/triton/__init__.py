"""The ``"triton"`` backend's kernels, registered on the ``hiera_kernels::<op>_triton`` ops.

Layout: ``token_order.py`` (unroll/reroll), ``query_pool.py``, ``mask_unit_attention.py``,
``window_attention.py`` (SAM 2's, built from mask_unit_attention's tiles);
``common.py`` has what they share, ``aot.py`` compiles every specialization for
sm_80/sm_90 without a GPU. The ops are registered for CUDA tensors, and for CPU
tensors when the kernels were decorated under ``TRITON_INTERPRET=1`` (the backend
refuses CPU tensors otherwise, with that reason).
"""

from __future__ import annotations

import torch

from ..library import NAMESPACE, TRITON_SUFFIX
from . import common, mask_unit_attention, query_pool, token_order, window_attention
from .common import INTERPRETED

IMPLEMENTATIONS = {
    "unroll": token_order.unroll,
    "reroll": token_order.reroll,
    "query_pool": query_pool.query_pool,
    "query_pool_backward": query_pool.query_pool_backward,
    "mask_unit_attention": mask_unit_attention.forward,
    "mask_unit_attention_backward": mask_unit_attention.backward,
    "window_attention": window_attention.forward,
    "window_attention_backward": window_attention.backward,
}

# CPU tensors only in the interpreter: compiled kernels cannot read host memory.
DEVICE_TYPES = ("cuda", "cpu") if INTERPRETED else ("cuda",)
for _name, _impl in IMPLEMENTATIONS.items():
    torch.library.register_kernel(f"{NAMESPACE}::{_name}{TRITON_SUFFIX}", DEVICE_TYPES, _impl)

__all__ = ["INTERPRETED", "IMPLEMENTATIONS"]
