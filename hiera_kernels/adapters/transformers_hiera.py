"""Adapter for Hugging Face transformers' Hiera (``HieraModel``, ``HieraForImageClassification``,
``HieraForPreTraining``, built on ``HieraModel`` and its encoder; ``HieraBackbone``, which
runs the embeddings and the encoder itself, with no unroll: transformers 5.24 feeds its
encoder raster-order tokens, and the patched model does the same).

==================================  ======================================================
``HieraModel.forward``              the same forward, with the module-level ``unroll``
                                    function as ops.unroll and the masked-token selection
                                    as a gather (the function cannot be swapped per
                                    instance, so the forward is)
``HieraEncoder.reroll``             ops.reroll with the stage's (schedule, size)
``HieraMaskUnitAttention.forward``  proj(ops.mask_unit_attention(qkv(x), ...)); with
                                    ``output_attentions=True`` the class's own eager
                                    forward, the one that has the weights to return
``HieraLayer.forward``              the residual's max-pool -> ops.query_pool; the
                                    LayerNorms on the C++ kernel (hiera_kernels.layer_norm);
                                    in training on a kernel backend, as the official
                                    adapter: qkv(layernorm_before(x)) (not in a stage's
                                    first layer) and the MLP (``hidden_act`` "gelu", or
                                    "gelu_pytorch_tanh" on F.gelu) as
                                    hiera_kernels.recompute's ops
==================================  ======================================================
"""

from __future__ import annotations

import sys
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .. import epilogues, ops, recompute
from ..layer_norm import layer_norm
from ..models.masking import keep_units
from ._common import (Binding, Rule, attend, attention, backend_of, check_attention, check_geometry, find, mlp_branch,
                      pool, runs_bound)

NAME = "transformers"
MODULE = "transformers.models.hiera.modeling_hiera"


def model_forward(
    self,
    pixel_values: torch.Tensor = None,
    noise: torch.Tensor = None,
    output_attentions: bool = None,
    output_hidden_states: bool = None,
    interpolate_pos_encoding: bool = None,
    return_dict: bool = None,
    **kwargs,
):
    config = self.config
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    return_dict = config.return_dict if return_dict is None else return_dict
    if pixel_values is None:
        raise ValueError("You have to specify pixel_values")

    # keep: bool [B, #units] (True = keep) in MAE mode, else None.
    embeddings, keep, ids_restore = self.embeddings(
        pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, noise=noise
    )
    size = [n // s for n, s in zip(pixel_values.shape[-2:], config.patch_stride)]
    hidden_states = ops.unroll(embeddings, size, self.unroll_schedule, backend=backend_of(self))
    if keep is not None:
        # random_masking keeps int(U * (1 - mask_ratio)) of U units in every sample: a
        # count known here, so the selection has a static shape.
        hidden_states = keep_units(hidden_states, keep, int(keep.shape[1] * (1 - config.mask_ratio)))

    encoder_outputs = self.encoder(
        hidden_states,
        bool_masked_pos=keep,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        return_dict=return_dict,
    )
    sequence_output = encoder_outputs[0]
    pooled_output = self.pooler(sequence_output) if self.pooler is not None else None

    if not return_dict:
        head = (sequence_output, pooled_output) if pooled_output is not None else (sequence_output,)
        if keep is not None:
            head = head + (keep, ids_restore)
        return head + tuple(encoder_outputs[1:])
    return sys.modules[MODULE].HieraModelOutput(
        last_hidden_state=sequence_output,
        pooler_output=pooled_output,
        bool_masked_pos=keep,
        ids_restore=ids_restore,
        hidden_states=encoder_outputs.hidden_states,
        attentions=encoder_outputs.attentions,
        reshaped_hidden_states=encoder_outputs.reshaped_hidden_states,
    )


def encoder_reroll(self, hidden_states: torch.Tensor, stage_idx: int, bool_masked_pos: torch.Tensor = None):
    schedule, size = self.schedule[stage_idx]
    return ops.reroll(hidden_states, size, schedule, bool_masked_pos, backend=backend_of(self))


def attention_forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
    if output_attentions:
        return type(self).forward(self, hidden_states, output_attentions=True)
    out = attention(self, hidden_states, self.num_heads, self.query_stride, self.window_size, self.use_mask_unit_attn)
    return out, None


def mlp_parts(mlp: nn.Module) -> Optional[Tuple[nn.Linear, str, nn.Linear]]:
    """(fc1, activation, fc2) when ``mlp`` is transformers' ``HieraMlp`` with an activation
    that :func:`hiera_kernels.epilogues.activation_name` knows, else None."""
    if type(mlp) is not sys.modules[MODULE].HieraMlp:
        return None
    activation = epilogues.activation_name(mlp.activation_fn)
    return None if activation is None else (mlp.fc1, activation, mlp.fc2)


def layer_forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
    backend = backend_of(self)
    attn = self.attn
    if (not output_attentions and runs_bound(attn, attention_forward) and self.hidden_size == self.hidden_size_output
            and recompute.applies(self.layernorm_before, (attn.qkv,), hidden_states, backend, attn)):
        # Training on a kernel backend: layernorm_before(x) is recomputed in the backward, not saved.
        qkv = recompute.layer_norm_linear(self.layernorm_before, attn.qkv, hidden_states)
        attn_out = attend(attn, qkv, attn.num_heads, attn.query_stride, attn.window_size, attn.use_mask_unit_attn)
        attn_weights = None
    else:
        x_norm = layer_norm(self.layernorm_before, hidden_states, backend)
        if self.hidden_size != self.hidden_size_output:
            hidden_states = pool(self, self.proj(x_norm), self.query_stride)
        attn_out, attn_weights = attn(x_norm, output_attentions=output_attentions)
    hidden_states = hidden_states + self.drop_path(attn_out)
    mlp_out = mlp_branch(self.layernorm_after, self.mlp, mlp_parts(self.mlp), hidden_states, backend)
    return hidden_states + self.drop_path(mlp_out), attn_weights


def _check_model(m: nn.Module, path: str) -> None:
    config = m.config
    if len(config.image_size) != 2:
        raise ValueError(f"patch: {path}: transformers' Hiera is 2-D, got image_size={config.image_size}")
    size = [n // s for n, s in zip(config.image_size, config.patch_stride)]
    check_geometry(path, size, m.unroll_schedule)


def _check_encoder(m: nn.Module, path: str) -> None:
    for schedule, size in m.schedule.values():
        check_geometry(path, size, schedule)


def _check_attention(m: nn.Module, path: str) -> None:
    check_attention(path, m.hidden_size_output, m.num_heads, m.query_stride, m.window_size, m.use_mask_unit_attn)


RULES = (
    Rule(MODULE, "HieraModel", "forward", model_forward, _check_model),
    Rule(MODULE, "HieraEncoder", "reroll", encoder_reroll, _check_encoder),
    Rule(MODULE, "HieraMaskUnitAttention", "forward", attention_forward, _check_attention),
    Rule(MODULE, "HieraLayer", "forward", layer_forward),
)
LOOKS_FOR = tuple(r.qualname for r in RULES)


def bindings(model: nn.Module) -> List[Binding]:
    return find(model, RULES, NAME)
