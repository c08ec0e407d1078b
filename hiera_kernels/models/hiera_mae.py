"""Drop-in ``MaskedAutoencoderHiera`` (official ``hiera/hiera_mae.py``, 0.1.4) on the
drop-in :class:`~hiera_kernels.models.hiera.Hiera` encoder."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..reference import undo_windowing
from .hiera import VIDEO_ARGS, Hiera, HieraBlock, conv_nd, encode
from .masking import scatter_units, select_rows
from .pretrained import pretrained_model


def apply_fusion_head(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a fusion conv per mask unit: [B, #MUs, My, Mx, C] -> [B, #MUs, My', Mx', C']."""
    if isinstance(head, nn.Identity):
        return x
    B, num_mask_units = x.shape[0:2]
    permute = [0] + [len(x.shape) - 2] + list(range(1, len(x.shape) - 2))
    x = head(x.reshape(B * num_mask_units, *x.shape[2:]).permute(permute))
    permute = [0] + list(range(2, len(x.shape))) + [1]
    return x.permute(permute).reshape(B, num_mask_units, *x.shape[2:], x.shape[1])


def normalize_label(label: torch.Tensor, norm: bool) -> torch.Tensor:
    """Per-patch pixel normalisation of the MAE target (rows of label)."""
    if norm:
        mean = label.mean(dim=-1, keepdim=True)
        var = label.var(dim=-1, keepdim=True)
        label = (label - mean) / (var + 1.0e-6) ** 0.5
    return label


class MaskedAutoencoderHiera(Hiera):
    """Masked autoencoder with a Hiera backbone (official constructor and forward).

    Graph-safe: the masked forward and loss select units and tokens by index with counts
    known on the host (the mask ratio, tensor shapes) instead of boolean indexing, so the
    training step has no host sync and no data-dependent shape, and compiles with
    ``fullgraph=True``. The methods below use only attributes the official model has too:
    the patched official MAE runs them (adapters/official.py)."""

    def __init__(
        self,
        in_chans: int = 3,
        patch_stride: Tuple[int, ...] = (4, 4),
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_layer: nn.Module = partial(nn.LayerNorm, eps=1e-6),
        **kwdargs,
    ):
        super().__init__(in_chans=in_chans, patch_stride=patch_stride, mlp_ratio=mlp_ratio, norm_layer=norm_layer, **kwdargs)

        del self.norm, self.head
        encoder_dim_out = self.blocks[-1].dim_out
        self.encoder_norm = norm_layer(encoder_dim_out)
        self.mask_unit_spatial_shape_final = [i // s ** (self.q_pool) for i, s in zip(self.mask_unit_size, self.q_stride)]
        self.tokens_spatial_shape_final = [i // s ** (self.q_pool) for i, s in zip(self.tokens_spatial_shape, self.q_stride)]

        # Multi-scale fusion heads: stage features of the pooled stages are brought to
        # the final mask-unit resolution by a strided conv per unit.
        curr_mu_size = self.mask_unit_size
        self.multi_scale_fusion_heads = nn.ModuleList()
        for i in self.stage_ends[: self.q_pool]:  # resolution constant after q_pool
            kernel = [m // s for m, s in zip(curr_mu_size, self.mask_unit_spatial_shape_final)]
            curr_mu_size = [m // s for m, s in zip(curr_mu_size, self.q_stride)]
            self.multi_scale_fusion_heads.append(
                conv_nd(len(self.q_stride))(self.blocks[i].dim_out, encoder_dim_out, kernel_size=kernel, stride=kernel)
            )
        self.multi_scale_fusion_heads.append(nn.Identity())  # final stage, no transform

        # Decoder
        self.decoder_embed = nn.Linear(encoder_dim_out, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.tokens_spatial_shape_final), decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [
                HieraBlock(dim=decoder_embed_dim, dim_out=decoder_embed_dim, heads=decoder_num_heads, norm_layer=norm_layer, mlp_ratio=mlp_ratio)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.pred_stride = patch_stride[-1] * (self.q_stride[-1] ** self.q_pool)  # patch stride of prediction
        self.decoder_pred = nn.Linear(decoder_embed_dim, (self.pred_stride ** min(2, len(self.q_stride))) * in_chans)

        self.initialize_weights()
        self.set_backend(self.backend)  # reach the decoder blocks too

    def initialize_weights(self):
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        self.apply(self._mae_init_weights)
        w = self.patch_embed.proj.weight.data  # initialised like nn.Linear, not nn.Conv2d
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

    def _mae_init_weights(self, m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def get_pixel_label_2d(self, input_img: torch.Tensor, mask: torch.Tensor, norm: bool = True, count: Optional[int] = None):
        """Per-patch pixels flattened in (c, py, px) order of the masked patches (mask True =
        masked, ``count`` per sample; None: read from the mask) -> [B * count, D]."""
        input_img = input_img.permute(0, 2, 3, 1)
        size = self.pred_stride
        label = input_img.unfold(1, size, size).unfold(2, size, size)
        label = label.flatten(1, 2).flatten(2)  # [B, #patches, D]
        return normalize_label(select_rows(label, mask, count), norm)

    def get_pixel_label_3d(self, input_vid: torch.Tensor, mask: torch.Tensor, norm: bool = True, count: Optional[int] = None):
        """Time-strided labels (first frame of each token); mask True = masked."""
        input_vid = input_vid[:, :, :: self.patch_stride[0], :, :]
        size = self.pred_stride
        label = input_vid.unfold(3, size, size).unfold(4, size, size)
        label = label.permute(0, 2, 3, 4, 5, 6, 1)  # differs from 2-D: kept as trained
        label = label.flatten(1, 3).flatten(2)
        return normalize_label(select_rows(label, mask, count), norm)

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, mask: Optional[torch.Tensor] = None):
        """Multi-scale fused latent [B, K, *mask_unit_spatial_shape_final, C] and the keep-mask.

        A random mask keeps ``int(U * (1 - mask_ratio))`` units of U (``get_random_mask``),
        a count known here. A given mask: in eager mode its count is read (any count, as
        officially); under torch.compile it must keep that same count (an on-device assert
        checks it), so the compiled graph has static shapes."""
        kept = int(math.prod(self.mask_spatial_shape) * (1 - mask_ratio))
        if mask is None:
            mask = self.get_random_mask(x, mask_ratio)  # [B, #MUs_all]
        elif not torch.compiler.is_compiling():
            kept = None
        _, intermediates = encode(self, x, mask, True, kept)
        # Resolution is unchanged after the q_pool stages, so skip those features.
        intermediates = intermediates[: self.q_pool] + intermediates[-1:]
        x = 0.0
        for head, interm_x in zip(self.multi_scale_fusion_heads, intermediates):
            x += apply_fusion_head(head, interm_x)
        return self.encoder_norm(x), mask

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor):
        x = self.decoder_embed(x)  # [B, K, *mask_unit_spatial_shape_final, C]
        # Place the K kept units among U mask tokens: x_dec [B, U, *unit, C].
        x_dec = scatter_units(x, mask)
        mask_tokens = self.mask_token.view((1,) * (len(mask.shape) + len(x.shape[2:-1])) + (-1,))
        mask = mask.reshape(mask.shape + (1,) * len(x.shape[2:]))
        mask = mask.expand((-1,) * 2 + x.shape[2:]).bool()
        x_dec = ~mask * mask_tokens + mask * x_dec

        x = undo_windowing(x_dec, self.tokens_spatial_shape_final, self.mask_unit_spatial_shape_final)
        mask = undo_windowing(mask[..., 0:1], self.tokens_spatial_shape_final, self.mask_unit_spatial_shape_final)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        mask = mask.view(x.shape[0], -1)

        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x), mask

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, masked: Optional[int] = None):
        """Mean squared error on masked tokens (mask True = masked, ``masked`` of them per
        sample; None: read from the mask) against normalised pixels."""
        if len(self.q_stride) == 2:
            label = self.get_pixel_label_2d(x, mask, count=masked)
        elif len(self.q_stride) == 3:
            label = self.get_pixel_label_3d(x, mask, count=masked)
        else:
            raise NotImplementedError(f"MAE labels for {len(self.q_stride)}-D inputs")
        pred = select_rows(pred, mask, masked)
        loss = (pred - label) ** 2
        return loss.mean(), pred, label

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.6, mask: Optional[torch.Tensor] = None):
        """Returns ``(loss, pred[masked], label, mask)``; ``mask`` is the keep-mask used."""
        latent, mask = self.forward_encoder(x, mask_ratio, mask=mask)
        pred, pred_mask = self.forward_decoder(latent, mask)  # pred_mask at prediction resolution
        # Masked prediction tokens per sample: all of them but the kept units' (static).
        masked = pred.shape[1] - math.prod(latent.shape[1:-1])
        return *self.forward_loss(x, pred, ~pred_mask, masked), mask


# Image models

def _mae_checkpoint(name: str):
    return {"mae_in1k": f"https://dl.fbaipublicfiles.com/hiera/mae_{name}.pth"}


def _mae_video_checkpoint(name: str):
    return {"mae_k400": f"https://dl.fbaipublicfiles.com/hiera/mae_{name}.pth"}


@pretrained_model(_mae_checkpoint("hiera_tiny_224"), default="mae_in1k")
def mae_hiera_tiny_224(**kwargs):
    return MaskedAutoencoderHiera(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), q_pool=2, **kwargs)


@pretrained_model(_mae_checkpoint("hiera_small_224"), default="mae_in1k")
def mae_hiera_small_224(**kwargs):
    return MaskedAutoencoderHiera(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), q_pool=2, **kwargs)


@pretrained_model(_mae_checkpoint("hiera_base_224"), default="mae_in1k")
def mae_hiera_base_224(**kwargs):
    return MaskedAutoencoderHiera(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3), q_pool=2, **kwargs)


@pretrained_model(_mae_checkpoint("hiera_base_plus_224"), default="mae_in1k")
def mae_hiera_base_plus_224(**kwargs):
    return MaskedAutoencoderHiera(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), q_pool=2, **kwargs)


@pretrained_model(_mae_checkpoint("hiera_large_224"), default="mae_in1k")
def mae_hiera_large_224(**kwargs):
    return MaskedAutoencoderHiera(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), q_pool=2, **kwargs)


@pretrained_model(_mae_checkpoint("hiera_huge_224"), default="mae_in1k")
def mae_hiera_huge_224(**kwargs):
    return MaskedAutoencoderHiera(embed_dim=256, num_heads=4, stages=(2, 6, 36, 4), q_pool=2, **kwargs)


# Video models

@pretrained_model(_mae_video_checkpoint("hiera_base_16x224"), default="mae_k400")
def mae_hiera_base_16x224(num_classes: int = 400, **kwdargs):
    return MaskedAutoencoderHiera(num_classes=num_classes, q_pool=2, **{**VIDEO_ARGS, **kwdargs})


@pretrained_model(_mae_video_checkpoint("hiera_base_plus_16x224"), default="mae_k400")
def mae_hiera_base_plus_16x224(**kwdargs):
    return mae_hiera_base_16x224(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), **kwdargs)


@pretrained_model(_mae_video_checkpoint("hiera_large_16x224"), default="mae_k400")
def mae_hiera_large_16x224(**kwdargs):
    return mae_hiera_base_16x224(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), **kwdargs)


@pretrained_model(_mae_video_checkpoint("hiera_huge_16x224"), default="mae_k400")
def mae_hiera_huge_16x224(**kwdargs):
    return mae_hiera_base_16x224(embed_dim=256, num_heads=4, stages=(2, 6, 36, 4), **kwdargs)
