"""Adapter for timm's ``timm.models.hiera.Hiera`` (every ``hiera_*`` model, the ``abswin``
ones, ``forward_intermediates`` and ``features_only``, which wraps the same modules).

timm's classes follow the official ones (same attribute names), with these differences:
its attention keeps windowed attention 5-D and global attention 4-D (the same math:
``ops.mask_unit_attention`` covers both), and its ``HieraBlock`` has ``drop_path1/2``,
``ls1/ls2`` (LayerScale or Identity) and, with ``use_expand_proj=False`` (the abswin
models), no ``proj``: the residual is then the max-pool and the mean-pool of the
unprojected input side by side ([B, N, C] -> [B, N // stride, 2C]).

timm's copy of SAM 2's Hiera (``timm.models.hieradet_sam2.HieraDet``: ``sam2_hiera_*``,
``hieradet_small``) runs :mod:`.sam2_hieradet`'s bodies and keeps its pos embed between
inference calls as sam2's trunk does (:func:`sam2_pos_embed`). Its ``MultiScaleAttention`` has
sam2's attributes; its ``MultiScaleBlock`` differs from sam2's in a square
``window_size`` pair, ``proj`` an Identity where the width stays, ``ls1/ls2``
(LayerScale: ``hieradet_small``) and ``drop_path1/2``, and timm's ``Mlp`` (``fc1``,
``act``, ``drop1``, ``norm``, ``fc2``, ``drop2``).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .. import recompute
from ..layer_norm import layer_norm
from . import official, sam2_hieradet
from ._common import (Binding, Rule, backend_of, find, fusable_skip, mlp_branch, patch_embed_forward, pool,
                      runs_bound, timm_mlp_parts)

NAME = "timm"
MODULE = "timm.models.hiera"
SAM2_MODULE = "timm.models.hieradet_sam2"


def block_forward(self, x: torch.Tensor) -> torch.Tensor:
    backend = backend_of(self)
    if official.attention_branch_applies(self, x, backend, fusable_skip(self.drop_path1, self.ls1)):
        # Training on the C++ kernels: the whole attention branch, skip connection included, is one op.
        x = recompute.layer_norm_attention(self.norm1, self.attn, x)
    else:
        if recompute.qkv_applies(self, x, backend) and runs_bound(self.attn, official.attention_forward):
            # Training on a kernel backend: norm1(x) is recomputed in the backward, not saved.
            branch = official.attend_qkv(self.attn, recompute.layer_norm_linear(self.norm1, self.attn.qkv, x))
        else:
            x_norm = layer_norm(self.norm1, x, backend)
            if self.do_expand:
                stride = self.attn.q_stride
                if self.proj is not None:
                    x = pool(self, self.proj(x_norm), stride)
                else:
                    # Un-normed x [B, stride * M, C] -> [B, M, 2C]: max and mean over the stride digit.
                    mean = x.view(x.shape[0], stride, -1, x.shape[-1]).mean(dim=1)
                    x = torch.cat([pool(self, x, stride), mean], dim=-1)
            branch = self.attn(x_norm)
        x = x + self.drop_path1(self.ls1(branch))
    parts = timm_mlp_parts(self.mlp)
    if fusable_skip(self.drop_path2, self.ls2):
        return mlp_branch(self.norm2, self.mlp, parts, x, backend, residual=True)
    return x + self.drop_path2(self.ls2(mlp_branch(self.norm2, self.mlp, parts, x, backend)))


def sam2_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's MultiScaleBlock (SAM 2's, with LayerScale, two drop paths and timm's Mlp)."""
    mlp = timm_mlp_parts(self.mlp)
    return sam2_hieradet.block_body(self, x, self.window_size[0], mlp, self.ls1, self.drop_path1, self.ls2, self.drop_path2)


def sam2_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ``HieraDet._pos_embed(x)``: x [B, H, W, C] plus the trunk's pos embed, whose map
    is kept between calls where :func:`.sam2_hieradet.keeps_pos_embed`. The map is the class's own
    ``_pos_embed`` of a -0.0 map in the parameters' dtype: -0.0 is the additive identity
    (-0.0 + p is p, bit for bit, signed zeros and infinities included), so adding the kept
    map to x gives the values the class's own x + map gives, bit for bit but for NaN
    payloads (ATen's bfloat16 add may give a NaN other bits on the contiguous kept map than
    on the class's permuted one; NaN stays NaN)."""
    if not sam2_hieradet.keeps_pos_embed(self):
        return type(self)._pos_embed(self, x)
    height, width = x.shape[1:3]
    p = self.pos_embed

    def compute():
        return type(self)._pos_embed(self, p.new_full((1, height, width, p.shape[1]), -0.0))

    return x + sam2_hieradet.kept_pos_embed(self, (height, width), compute)


def _check_sam2_block(m: nn.Module, path: str) -> None:
    if m.window_size[0] != m.window_size[1]:
        raise ValueError(f"patch: {path}: window_size={m.window_size} is not square")
    sam2_hieradet.check_block(m, path, m.window_size[0])


# Unroll, Reroll and the attention have the official attributes and semantics.
RULES = (
    Rule(MODULE, "Unroll", "forward", official.unroll_forward, official._check_unroll),
    Rule(MODULE, "Reroll", "forward", official.reroll_forward, official._check_reroll),
    Rule(MODULE, "MaskUnitAttention", "forward", official.attention_forward, official._check_attention),
    Rule(MODULE, "HieraBlock", "forward", block_forward),
    Rule(MODULE, "PatchEmbed", "forward", patch_embed_forward),
    Rule(SAM2_MODULE, "MultiScaleAttention", "forward", sam2_hieradet.attention_forward, sam2_hieradet.check_attention),
    Rule(SAM2_MODULE, "MultiScaleBlock", "forward", sam2_block_forward, _check_sam2_block),
    Rule(SAM2_MODULE, "HieraDet", "_pos_embed", sam2_pos_embed),
)
LOOKS_FOR = tuple(r.qualname for r in RULES)


def bindings(model: nn.Module) -> List[Binding]:
    return find(model, RULES, NAME)
