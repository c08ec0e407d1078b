"""Drop-in ``Hiera``: the official model (facebookresearch/hiera 0.1.4, ``hiera/hiera.py``)
with its token ops routed through :mod:`hiera_kernels.ops`.

Same constructor arguments, forward signature, factory names and ``state_dict``
keys as the official package, so official checkpoints load with ``strict=True``.
Additions: a ``backend=`` constructor argument and :meth:`Hiera.set_backend`; the Linears
are :class:`hiera_kernels.epilogues.Linear` (bias and fc1's GELU inside the GEMM for CPU
inference on "cpu"/"auto").
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import epilogues, ops, recompute
from ..backends import check_name, get_backend
from .masking import check_mask, keep_units
from ..epilogues import Linear
from ..layer_norm import layer_norm
from .pretrained import pretrained_model


class UsesBackend(nn.Module):
    """A module whose ops run on ``self.backend`` (None: the global default)."""

    backend: Optional[str] = None

    def set_backend(self, backend: Optional[str]) -> "UsesBackend":
        """Run every op of this module and its children on ``backend`` (None: the default)."""
        if backend is not None:
            check_name(backend, f"{type(self).__name__}.set_backend")
        for module in self.modules():
            if isinstance(module, (UsesBackend, Linear)):
                module.backend = backend
        return self


def conv_nd(n: int) -> type:
    """Conv1d/2d/3d for n = 1/2/3 (official ``conv_nd``)."""
    return [nn.Identity, nn.Conv1d, nn.Conv2d, nn.Conv3d][n]


def do_masked_conv(x: torch.Tensor, conv: nn.Module, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero the masked pixels before the (overlapping) patch conv, so nothing leaks.
    The mask [B, 1, *mask_spatial] is resized to pixels by nearest interpolation."""
    if mask is None:
        return conv(x)
    if mask.shape[2:] != x.shape[2:]:
        mask = F.interpolate(mask.float(), size=x.shape[2:])
    return conv(x * mask.bool())


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath`` with ``scale_by_keep=True``)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        noise = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0:
            noise.div_(keep)
        return x * noise


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm ``Mlp`` at dropout 0; keys ``fc1``, ``fc2``).
    Where fc1 fuses (CPU inference on "cpu"/"auto"), the GELU runs inside fc1's GEMM, and
    where fc2 fuses too, the two run in chunks of rows (:func:`~hiera_kernels.epilogues.fused_mlp`)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fc2(act(fc1(x))), plus ``residual`` if given (added in fc2's epilogue where it fuses)."""
        activation = epilogues.activation_name(self.act)
        if activation is not None and self.fc1.fuses(x):
            if self.fc2.fuses(x, residual):  # (fc2's input has x's dtype, device and grad mode)
                return epilogues.fused_mlp(self.fc1, activation, self.fc2, x, residual)
            return self.fc2(self.fc1(x, activation), residual=residual)
        return self.fc2(self.act(self.fc1(x)), residual=residual)


class MaskUnitAttention(UsesBackend):
    """Mask-unit (windowed) or global attention with optional query pooling.

    Input [B, N, dim] in unrolled order; output [B, N // q_stride, dim_out]. Between
    the two Linears everything is one :func:`hiera_kernels.ops.mask_unit_attention`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        heads: int,
        q_stride: int = 1,
        window_size: int = 0,
        use_mask_unit_attn: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.heads = heads
        self.q_stride = q_stride
        self.head_dim = dim_out // heads
        self.scale = self.head_dim**-0.5  # unused (SDPA's default scale); kept as an official attribute
        self.qkv = Linear(dim, 3 * dim_out)
        self.proj = Linear(dim_out, dim_out)
        self.window_size = window_size
        self.use_mask_unit_attn = use_mask_unit_attn

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention's output projection, plus ``residual`` [B, N // q_stride, dim_out] if given.
        Where qkv fuses (CPU inference on "cpu"/"auto"), qkv and the attention run in chunks
        of images whose qkv [b, N, 3 * dim_out] is at most epilogues.CHUNK_BYTES."""
        B, N = x.shape[0], x.shape[1]
        chunks = epilogues.chunk_count(B, N * 3 * self.dim_out, x.dtype) if self.qkv.fuses(x) else 1
        if chunks == 1:
            return self.attend(self.qkv(x), residual)
        out = epilogues.run_in_chunks(lambda images: self.attention(self.qkv(x[images])), B, chunks,
                                      x.new_empty(B, N // self.q_stride, self.dim_out))
        return self.proj(out, residual=residual)

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """The qkv Linear's output [B, N, 3 * dim_out] -> the attention's [B, N // q_stride, dim_out]."""
        return ops.mask_unit_attention(qkv, self.heads, self.q_stride, self.window_size, self.use_mask_unit_attn, backend=self.backend)

    def attend(self, qkv: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward` from the qkv Linear's output [B, N, 3 * dim_out] on."""
        return self.proj(self.attention(qkv), residual=residual)


class HieraBlock(UsesBackend):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        q_stride: int = 1,
        window_size: int = 0,
        use_mask_unit_attn: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.norm1 = norm_layer(dim)
        self.attn = MaskUnitAttention(dim, dim_out, heads, q_stride, window_size, use_mask_unit_attn)
        self.norm2 = norm_layer(dim_out)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if dim != dim_out:
            self.proj = Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without stochastic depth the skip connections go into proj's and fc2's epilogues
        # (added after the GEMM on the plain path, as officially).
        skip_in_epilogue = isinstance(self.drop_path, nn.Identity) or not self.training
        if skip_in_epilogue and type(self.attn) is MaskUnitAttention and recompute.attention_applies(self, x, self.backend):
            # Training on the C++ kernels: the whole branch, skip connection included, is one op.
            x = recompute.layer_norm_attention(self.norm1, self.attn, x)
        elif recompute.qkv_applies(self, x, self.backend):
            # Training on a kernel backend: norm1(x) is recomputed in the backward, not saved.
            qkv = recompute.layer_norm_linear(self.norm1, self.attn.qkv, x)
            x = self.attn.attend(qkv, residual=x) if skip_in_epilogue else x + self.drop_path(self.attn.attend(qkv))
        else:
            x_norm = layer_norm(self.norm1, x, self.backend)
            if self.dim != self.dim_out:
                # Residual of a transition block: max-pool of proj(norm1(x)), not of x.
                x = ops.query_pool(self.proj(x_norm), self.attn.q_stride, backend=self.backend)
            x = self.attn(x_norm, residual=x) if skip_in_epilogue else x + self.drop_path(self.attn(x_norm))
        mlp, activation = self.mlp, epilogues.activation_name(self.mlp.act)
        if activation is not None and recompute.applies(self.norm2, (mlp.fc1, mlp.fc2), x, self.backend, mlp):
            # Likewise norm2(x) and the GELU's output; fc1's output is kept.
            if skip_in_epilogue:
                return recompute.layer_norm_mlp(self.norm2, mlp.fc1, activation, mlp.fc2, x, residual=True)
            return x + self.drop_path(recompute.layer_norm_mlp(self.norm2, mlp.fc1, activation, mlp.fc2, x))
        if skip_in_epilogue:
            return mlp(layer_norm(self.norm2, x, self.backend), residual=x)
        return x + self.drop_path(mlp(layer_norm(self.norm2, x, self.backend)))


class Head(nn.Module):
    """Dropout -> Linear, then softmax in eval mode (the official model returns probabilities)."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        dropout_rate: float = 0.0,
        act_func: Callable[[torch.Tensor], torch.Tensor] = lambda x: x.softmax(dim=-1),
    ):
        super().__init__()
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.projection = Linear(dim, num_classes)
        self.act_func = act_func

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection(self.dropout(x))
        return x if self.training else self.act_func(x)


def patch_conv_input(x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    """The image for the patch conv: on CPU, for the kernel backends, channels-last. oneDNN
    then writes the conv's output channels-last too, so the [B, N, C] tokens come out
    contiguous and the pos-embed add and unroll read whole rows instead of a transposed
    map (Hiera-B/224 bf16 batch 8: conv, add and unroll 3.4 -> 1.8 ms, with their backward
    15.7 -> 9.4 ms). The ``"torch"`` backend keeps official's NCHW conv."""
    if x.dim() == 4 and x.device.type == "cpu" and (backend or get_backend()) != "torch":
        return x.contiguous(memory_format=torch.channels_last)
    return x


class PatchEmbed(UsesBackend):
    """Strided conv over 1, 2 or 3 spatial dims; returns [B, N, C] in raster order."""

    def __init__(self, dim_in: int, dim_out: int, kernel: Tuple[int, ...], stride: Tuple[int, ...], padding: Tuple[int, ...]):
        super().__init__()
        self.spatial_dims = len(kernel)
        self.proj = conv_nd(self.spatial_dims)(dim_in, dim_out, kernel_size=kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = do_masked_conv(patch_conv_input(x, self.backend), self.proj, mask)
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(2, 1)


class Unroll(UsesBackend):
    """Official ``Unroll``: raster tokens [B, N, C] -> unrolled order (one op call)."""

    def __init__(self, input_size: Tuple[int, ...], patch_stride: Tuple[int, ...], unroll_schedule: List[Tuple[int, ...]]):
        super().__init__()
        self.size = [i // s for i, s in zip(input_size, patch_stride)]
        self.schedule = unroll_schedule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.unroll(x, self.size, self.schedule, backend=self.backend)


class Reroll(UsesBackend):
    """Official ``Reroll``: a block's tokens back to [B, *size, C] (or [B, K, *mu, C] with a mask)."""

    def __init__(
        self,
        input_size: Tuple[int, ...],
        patch_stride: Tuple[int, ...],
        unroll_schedule: List[Tuple[int, ...]],
        stage_ends: List[int],
        q_pool: int,
    ):
        super().__init__()
        self.size = [i // s for i, s in zip(input_size, patch_stride)]
        # Blocks of stage s have consumed the first min(s, q_pool) unroll steps.
        self.schedule = {}
        size = self.size
        for i in range(stage_ends[-1] + 1):
            self.schedule[i] = unroll_schedule, size
            if i in stage_ends[:q_pool]:
                if len(unroll_schedule) > 0:
                    size = [n // s for n, s in zip(size, unroll_schedule[0])]
                unroll_schedule = unroll_schedule[1:]

    def forward(self, x: torch.Tensor, block_idx: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        schedule, size = self.schedule[block_idx]
        return ops.reroll(x, size, schedule, mask, backend=self.backend)


class Hiera(UsesBackend):
    def __init__(
        self,
        input_size: Tuple[int, ...] = (224, 224),
        in_chans: int = 3,
        embed_dim: int = 96,  # initial embed dim
        num_heads: int = 1,  # initial number of heads
        num_classes: int = 1000,
        stages: Tuple[int, ...] = (2, 3, 16, 3),
        q_pool: int = 3,  # number of q_pool stages
        q_stride: Tuple[int, ...] = (2, 2),
        mask_unit_size: Tuple[int, ...] = (8, 8),  # must divide q_stride ** (#stages-1)
        mask_unit_attn: Tuple[bool, ...] = (True, True, False, False),  # which stages use mask unit attention
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        patch_kernel: Tuple[int, ...] = (7, 7),
        patch_stride: Tuple[int, ...] = (4, 4),
        patch_padding: Tuple[int, ...] = (3, 3),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        norm_layer: Union[str, Callable[[int], nn.Module]] = "LayerNorm",
        head_dropout: float = 0.0,
        head_init_scale: float = 0.001,
        sep_pos_embed: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if isinstance(norm_layer, str):
            norm_layer = partial(getattr(nn, norm_layer), eps=1e-6)

        depth = sum(stages)
        self.patch_stride = patch_stride
        self.tokens_spatial_shape = [i // s for i, s in zip(input_size, patch_stride)]
        num_tokens = math.prod(self.tokens_spatial_shape)
        flat_mu_size = math.prod(mask_unit_size)
        flat_q_stride = math.prod(q_stride)

        if not q_pool < len(stages):
            raise ValueError(f"Hiera: q_pool={q_pool} must be less than the number of stages ({len(stages)})")
        self.q_pool, self.q_stride = q_pool, q_stride
        self.mu_size, self.mask_unit_size = flat_mu_size, mask_unit_size
        self.mask_spatial_shape = [i // s for i, s in zip(self.tokens_spatial_shape, self.mask_unit_size)]
        self.stage_ends = [sum(stages[:i]) - 1 for i in range(1, len(stages) + 1)]

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_kernel, patch_stride, patch_padding)

        self.sep_pos_embed = sep_pos_embed
        if sep_pos_embed:
            spatial = self.tokens_spatial_shape[1] * self.tokens_spatial_shape[2]
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, spatial, embed_dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, self.tokens_spatial_shape[0], embed_dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))

        schedule = [q_stride] * len(self.stage_ends[:-1])
        self.unroll = Unroll(input_size, patch_stride, schedule)
        self.reroll = Reroll(input_size, patch_stride, schedule, self.stage_ends, q_pool)
        q_pool_blocks = [x + 1 for x in self.stage_ends[:q_pool]]
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # stochastic depth decay

        cur_stage = 0
        self.blocks = nn.ModuleList()
        for i in range(depth):
            dim_out = embed_dim
            # Lag by one block: a stage's first (pooling) block keeps the previous
            # stage's mask-unit/global choice.
            use_mask_unit_attn = mask_unit_attn[cur_stage]
            if i - 1 in self.stage_ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                cur_stage += 1
                if i in q_pool_blocks:
                    flat_mu_size //= flat_q_stride
            self.blocks.append(
                HieraBlock(
                    dim=embed_dim,
                    dim_out=dim_out,
                    heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    q_stride=(flat_q_stride if i in q_pool_blocks else 1),
                    window_size=flat_mu_size,
                    use_mask_unit_attn=use_mask_unit_attn,
                )
            )
            embed_dim = dim_out

        self.norm = norm_layer(embed_dim)
        self.head = Head(embed_dim, num_classes, dropout_rate=head_dropout)

        if sep_pos_embed:
            nn.init.trunc_normal_(self.pos_embed_spatial, std=0.02)
            nn.init.trunc_normal_(self.pos_embed_temporal, std=0.02)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)
        self.head.projection.weight.data.mul_(head_init_scale)
        self.head.projection.bias.data.mul_(head_init_scale)
        self.set_backend(backend)

    def _init_weights(self, m, init_bias=0.02):
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, init_bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, init_bias)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self):
        return ["pos_embed_spatial", "pos_embed_temporal"] if self.sep_pos_embed else ["pos_embed"]

    def get_random_mask(self, x: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        """A random keep-mask [B, num_mask_units]: True is *keep* (opposite of the original MAE);
        every sample keeps ``int(num_units * (1 - mask_ratio))`` units."""
        B = x.shape[0]
        num_windows = math.prod(self.mask_spatial_shape)
        len_keep = int(num_windows * (1 - mask_ratio))
        noise = torch.rand(B, num_windows, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.zeros([B, num_windows], device=x.device)
        mask[:, :len_keep] = 1
        return torch.gather(mask, dim=1, index=ids_restore).bool()

    def get_pos_embed(self) -> torch.Tensor:
        if self.sep_pos_embed:
            spatial = self.tokens_spatial_shape[1] * self.tokens_spatial_shape[2]
            return self.pos_embed_spatial.repeat(1, self.tokens_spatial_shape[0], 1) + torch.repeat_interleave(
                self.pos_embed_temporal, spatial, dim=1
            )
        return self.pos_embed

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, return_intermediates: bool = False):
        """x: [B, C, H, W] (or [B, C, T, H, W]); mask: bool [B, num_mask_units], True is *keep*,
        the same count for every sample. With a mask, returns the kept tokens (no head)."""
        x, intermediates = encode(self, x, mask, return_intermediates)
        if mask is None:
            x = self.head(self.norm(x.mean(dim=1)))
        return (x, intermediates) if return_intermediates else x

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


# Image models

_DL = "https://dl.fbaipublicfiles.com/hiera/"


def encode(model: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None, return_intermediates: bool = False,
           kept: Optional[int] = None):
    """The encoder of ``Hiera.forward``: patch embed, pos embed, unroll, drop the masked
    units, blocks. Returns (tokens [B, N', C'], stage-end intermediates). Shared with the
    patched official MAE (adapters/official.py), hence a function of any model with the
    official attributes.

    ``kept``: units each sample keeps, when known on the host (an MAE mask ratio); then no
    step syncs with the device or has a shape that depends on the mask. None reads the
    count from the mask (one sync)."""
    if isinstance(x, list):  # SlowFast-style loaders pass a list
        x = x[0]
    B = x.shape[0]
    if mask is not None:
        kept = check_mask(mask, B, math.prod(model.mask_spatial_shape), kept, f"{type(model).__name__}.forward")
    x = model.patch_embed(x, mask=mask.view(B, 1, *model.mask_spatial_shape) if mask is not None else None)
    x = x + model.get_pos_embed()
    x = model.unroll(x)
    if mask is not None:
        x = keep_units(x, mask, kept)
    intermediates = []
    for i, blk in enumerate(model.blocks):
        x = blk(x)
        if return_intermediates and i in model.stage_ends:
            intermediates.append(model.reroll(x, i, mask=mask))
    return x, intermediates


def _image_checkpoints(name: str):
    return {"mae_in1k_ft_in1k": f"{_DL}{name}.pth", "mae_in1k": f"{_DL}mae_{name}.pth"}


def _video_checkpoints(name: str):
    return {"mae_k400_ft_k400": f"{_DL}{name}.pth", "mae_k400": f"{_DL}mae_{name}.pth"}


@pretrained_model(_image_checkpoints("hiera_tiny_224"), default="mae_in1k_ft_in1k")
def hiera_tiny_224(**kwdargs):
    return Hiera(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), **kwdargs)


@pretrained_model(_image_checkpoints("hiera_small_224"), default="mae_in1k_ft_in1k")
def hiera_small_224(**kwdargs):
    return Hiera(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), **kwdargs)


@pretrained_model(_image_checkpoints("hiera_base_224"), default="mae_in1k_ft_in1k")
def hiera_base_224(**kwdargs):
    return Hiera(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3), **kwdargs)


@pretrained_model(_image_checkpoints("hiera_base_plus_224"), default="mae_in1k_ft_in1k")
def hiera_base_plus_224(**kwdargs):
    return Hiera(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), **kwdargs)


@pretrained_model(_image_checkpoints("hiera_large_224"), default="mae_in1k_ft_in1k")
def hiera_large_224(**kwdargs):
    return Hiera(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), **kwdargs)


@pretrained_model(_image_checkpoints("hiera_huge_224"), default="mae_in1k_ft_in1k")
def hiera_huge_224(**kwdargs):
    return Hiera(embed_dim=256, num_heads=4, stages=(2, 6, 36, 4), **kwdargs)


# Video models

VIDEO_ARGS = dict(
    input_size=(16, 224, 224),
    q_stride=(1, 2, 2),
    mask_unit_size=(1, 8, 8),
    patch_kernel=(3, 7, 7),
    patch_stride=(2, 4, 4),
    patch_padding=(1, 3, 3),
    sep_pos_embed=True,
)


@pretrained_model(_video_checkpoints("hiera_base_16x224"), default="mae_k400_ft_k400")
def hiera_base_16x224(num_classes: int = 400, **kwdargs):
    return Hiera(num_classes=num_classes, **{**VIDEO_ARGS, **kwdargs})  # K400 has 400 classes


@pretrained_model(_video_checkpoints("hiera_base_plus_16x224"), default="mae_k400_ft_k400")
def hiera_base_plus_16x224(**kwdargs):
    return hiera_base_16x224(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), **kwdargs)


@pretrained_model(_video_checkpoints("hiera_large_16x224"), default="mae_k400_ft_k400")
def hiera_large_16x224(**kwdargs):
    return hiera_base_16x224(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), **kwdargs)


@pretrained_model(_video_checkpoints("hiera_huge_16x224"), default="mae_k400_ft_k400")
def hiera_huge_16x224(**kwdargs):
    return hiera_base_16x224(embed_dim=256, num_heads=4, stages=(2, 6, 36, 4), **kwdargs)
