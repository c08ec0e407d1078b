"""Adapter for the official package (``hiera-transformer``: ``hiera.Hiera``,
``hiera.MaskedAutoencoderHiera``, image and video).

Its token ops live in four module classes, so binding their forwards is enough for the
classifier: its own forward (masking, intermediates) calls them. The MAE also gets the
drop-in MAE's graph-safe forward, encoder, decoder and loss (models/hiera_mae.py: index
gathers with static counts instead of boolean indexing; they use only attributes the
official MAE has), so its training step compiles with ``fullgraph=True``.

=========================  ==============================================================
``hiera.PatchEmbed``       forward(x, mask): its own, on a channels-last image on CPU
                           (contiguous tokens for the pos-embed add and unroll)
``hiera_utils.Unroll``     forward(x [B, N, C]) -> ops.unroll(x, size, schedule)
``hiera_utils.Reroll``     forward(x, block_idx, mask) -> ops.reroll with the block's
                           (schedule, size); [B, *size, C], or [B, K, *mu, C] with a mask
``hiera.MaskUnitAttention`` forward(x) -> proj(ops.mask_unit_attention(qkv(x), ...))
``hiera.HieraBlock``       forward(x): the residual's ``do_pool`` -> ops.query_pool; in
                           training on a kernel backend the recompute ops; where no drop
                           path that may drop a branch (nor a hook on it) wraps it, the
                           skip connection inside: the attention branch as
                           layer_norm_attention (C++ attention kernels, no query pooling),
                           the MLP's skip in fc2's epilogue
=========================  ==============================================================
"""

from __future__ import annotations

import sys
from typing import List

import torch
import torch.nn as nn

from .. import ops, recompute
from ..layer_norm import layer_norm
from ..models.hiera_mae import MaskedAutoencoderHiera as GraphSafeMAE
from ._common import (Binding, Rule, attend, attention, backend_of, check_attention, check_geometry, find,
                      fusable_skip, mlp_branch, patch_embed_forward, pool, runs_bound, timm_mlp_parts)

NAME = "official hiera"


def unroll_forward(self, x: torch.Tensor) -> torch.Tensor:
    return ops.unroll(x, self.size, self.schedule, backend=backend_of(self))


def reroll_forward(self, x: torch.Tensor, block_idx: int, mask: torch.Tensor = None) -> torch.Tensor:
    schedule, size = self.schedule[block_idx]
    return ops.reroll(x, size, schedule, mask, backend=backend_of(self))


def attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    return attention(self, x, self.heads, self.q_stride, self.window_size, self.use_mask_unit_attn)


def attend_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
    """:func:`attention_forward` from the qkv Linear's output on."""
    return attend(self, qkv, self.heads, self.q_stride, self.window_size, self.use_mask_unit_attn)


def attention_branch_applies(block: nn.Module, x: torch.Tensor, backend, skip_fusable: bool) -> bool:
    """Whether an official or timm ``block`` runs ``x + attn.proj(attention(attn.qkv(norm1(x))))``
    as :func:`hiera_kernels.recompute.layer_norm_attention` (training on the C++ kernels, no
    query pooling): where its skip connection is fusable (``skip_fusable``), its attention runs
    the bound :func:`attention_forward` (not a subclass's own nor a wrapper set since: that
    call is kept) and :func:`~hiera_kernels.recompute.attention_applies`."""
    return skip_fusable and runs_bound(block.attn, attention_forward) and recompute.attention_applies(block, x, backend)


def block_forward(self, x: torch.Tensor) -> torch.Tensor:
    backend = backend_of(self)
    skip_fusable = fusable_skip(self.drop_path)
    if attention_branch_applies(self, x, backend, skip_fusable):
        # Training on the C++ kernels: the whole attention branch, skip connection included, is one op.
        x = recompute.layer_norm_attention(self.norm1, self.attn, x)
    else:
        if recompute.qkv_applies(self, x, backend) and runs_bound(self.attn, attention_forward):
            # Training on a kernel backend: norm1(x) is recomputed in the backward, not saved.
            branch = attend_qkv(self.attn, recompute.layer_norm_linear(self.norm1, self.attn.qkv, x))
        else:
            x_norm = layer_norm(self.norm1, x, backend)
            if self.dim != self.dim_out:
                # The residual is projected on the normed input, then pooled like q.
                x = pool(self, self.proj(x_norm), self.attn.q_stride)
            branch = self.attn(x_norm)
        x = x + self.drop_path(branch)
    parts = timm_mlp_parts(self.mlp)
    if skip_fusable:
        return mlp_branch(self.norm2, self.mlp, parts, x, backend, residual=True)
    return x + self.drop_path(mlp_branch(self.norm2, self.mlp, parts, x, backend))


def _check_unroll(m: nn.Module, path: str) -> None:
    check_geometry(path, m.size, m.schedule)


def _check_reroll(m: nn.Module, path: str) -> None:
    for schedule, size in m.schedule.values():
        check_geometry(path, size, schedule)


def _check_attention(m: nn.Module, path: str) -> None:
    check_attention(path, m.dim_out, m.heads, m.q_stride, m.window_size, m.use_mask_unit_attn)


MAE_METHODS = ("forward", "forward_encoder", "forward_decoder", "forward_loss", "get_pixel_label_2d", "get_pixel_label_3d")


def _check_mae(m: nn.Module, path: str) -> None:
    """The graph-safe forward passes a static count on to forward_loss, and forward_loss
    to get_pixel_label_*: a subclass's own versions of those would not take it."""
    base = sys.modules["hiera.hiera_mae"].MaskedAutoencoderHiera
    for name in ("forward_loss", "get_pixel_label_2d", "get_pixel_label_3d"):
        if getattr(type(m), name) is not getattr(base, name):
            raise ValueError(
                f"patch: {path} ({type(m).__qualname__}) overrides MaskedAutoencoderHiera.{name}, which the "
                "graph-safe MAE forward calls with a static count; cannot patch it"
            )


RULES = tuple(
    Rule("hiera.hiera_mae", "MaskedAutoencoderHiera", name, getattr(GraphSafeMAE, name),
         _check_mae if name in ("forward", "forward_loss") else None)
    for name in MAE_METHODS
) + (
    Rule("hiera.hiera_utils", "Unroll", "forward", unroll_forward, _check_unroll),
    Rule("hiera.hiera_utils", "Reroll", "forward", reroll_forward, _check_reroll),
    Rule("hiera.hiera", "MaskUnitAttention", "forward", attention_forward, _check_attention),
    Rule("hiera.hiera", "HieraBlock", "forward", block_forward),
    Rule("hiera.hiera", "PatchEmbed", "forward", patch_embed_forward),
)
LOOKS_FOR = tuple(dict.fromkeys(r.qualname for r in RULES))


def bindings(model: nn.Module) -> List[Binding]:
    return find(model, RULES, NAME)
