"""Adapter for SAM 2's Hiera (``sam2.modeling.backbones.hieradet.Hiera``, the trunk of a
SAM 2 image encoder: ``model.image_encoder.trunk``), and the block bodies timm's copy of
it (``timm.models.hieradet_sam2``: ``sam2_hiera_*``, ``hieradet_small``) shares, bound by
:mod:`.timm_hiera`.

The trunk works on channels-last maps [B, H, W, C]; its token ops are all in
``MultiScaleBlock.forward`` and ``MultiScaleAttention.forward``, so those two are bound,
its ``PatchEmbed.forward`` (sam2.modeling.backbones.utils) runs its own code on a
channels-last image on CPU (:func:`._common.patch_embed_forward`: the conv writes NHWC,
so the map it returns, and the pos-embed sum after it, are contiguous), and
the trunk's ``_get_pos_embed`` keeps its result between calls (:func:`pos_embed`; timm's
``_pos_embed`` too, bound by :mod:`.timm_hiera`):

=============================  =========================================================
``MultiScaleAttention``        forward(x [B, H, W, dim], window_size=0, residual=None):
                               ``residual + proj(ops.window_attention(qkv(x), ...))``,
                               [B, H/s, W/s, dim_out]. With the defaults it is the
                               class's own forward (global attention over whatever map it
                               is given, q max-pooled by its ``q_pool``)
``MultiScaleBlock``            forward(x): norm1; the transition residual
                               ``pool(proj(norm1(x)))``; the attention on the unpadded
                               normed map with the block's window (``window_partition``'s
                               zero padding, the q pool, ``window_unpartition`` and the
                               crop are one op, which gets the qkv bias as the padded
                               tokens' qkv); then norm2 and the MLP
=============================  =========================================================

For CPU inference on the ``"cpu"``/``"auto"`` backends the Linears run through
:mod:`hiera_kernels.epilogues` (bias, fc1's GELU and the skip connections of ``proj`` and
``fc2`` inside oneDNN's GEMM) wherever the block's own code would add them unchanged:
no LayerScale (timm's ``init_values``), no active drop path or dropout. In training on a
kernel backend norm1 and qkv, and norm2 with the MLP, run as :mod:`hiera_kernels.recompute`'s
ops (the MLP's skip connection in fc2's epilogue where nothing wraps the branch: no drop path
that may drop it, no LayerScale, no hook on either).
Everywhere else (other dtypes and devices, the ``"torch"`` backend, a hooked module) the
modules are called as they are, so hooks on them fire and autograd sees the package's own Linears.
"""

from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import backends, epilogues, ops, recompute
from ..layer_norm import layer_norm
from ._common import Binding, Rule, backend_of, find, fusable_skip, patch_embed_forward, runs_bound

NAME = "sam2"
MODULE = "sam2.modeling.backbones.hieradet"
UTILS_MODULE = "sam2.modeling.backbones.utils"  # PatchEmbed


def _linear(linear: nn.Linear, x: torch.Tensor, backend: Optional[str], residual: Optional[torch.Tensor] = None):
    """``residual + linear(x)`` (or ``linear(x)``): inside the GEMM where the epilogues
    allow, else the module itself (the block's own order of the sum)."""
    if epilogues.fuses(linear, x, residual, backend):
        return epilogues.fused_linear(linear, x, residual=residual)
    return linear(x) if residual is None else residual + linear(x)


# Trunk -> (key, copies of its two pos-embed parameters, its pos embed [1, H, W, C]);
# weak keys: the entry goes with its trunk.
_POS_EMBEDS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def keeps_pos_embed(trunk: nn.Module) -> bool:
    """Whether :func:`kept_pos_embed` may keep the pos embed of ``trunk`` now: not where its
    gradient may be needed (grad mode on and a parameter requiring it), under
    ``torch.compile`` or on the ``"torch"`` backend (the plain oracle)."""
    params = (trunk.pos_embed, trunk.pos_embed_window)
    return not (torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params))
                or (backend_of(trunk) or backends.get_backend()) == "torch")


def kept_pos_embed(trunk: nn.Module, hw: Tuple[int, int], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, the pos embed of ``trunk`` (sam2's or timm's) over the ``hw`` feature
    map, kept between calls where :func:`keeps_pos_embed`: both trunks upsample
    ``pos_embed`` bicubically to the map and add the tiled window embedding on every forward
    (Hiera-T at 1024 x 1024: a [1, 256, 256, 96] map, ~30 ms on 2 CPU cores). The kept map
    is recomputed when ``hw``, inference mode or either parameter's dtype, device or values
    change (the values compared with copies of the small parameters: [1, C, 7, 7] and [1,
    C, 8, 8] for Hiera-T, so no in-place update, reload or swapped tensor can leave it
    stale). Every call gets the same tensor: the trunks only add it. ``unpatch`` drops it."""
    params = (trunk.pos_embed, trunk.pos_embed_window)
    key = (tuple(hw), torch.is_inference_mode_enabled(), tuple((p.dtype, p.device, tuple(p.shape)) for p in params))
    cached = _POS_EMBEDS.get(trunk)
    if cached is None or cached[0] != key or not all(torch.equal(p, kept) for p, kept in zip(params, cached[1])):
        with torch.no_grad():
            cached = (key, tuple(p.detach().clone() for p in params), compute())
        _POS_EMBEDS[trunk] = cached
    return cached[2]


def pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
    """The trunk's own ``_get_pos_embed(hw)`` [1, H, W, C], kept where :func:`keeps_pos_embed`."""
    if not keeps_pos_embed(self):
        return type(self)._get_pos_embed(self, hw)
    return kept_pos_embed(self, hw, lambda: type(self)._get_pos_embed(self, hw))


def forget(module: nn.Module) -> None:
    """Drop the kept pos embed of ``module`` if it is a patched trunk (``unpatch``)."""
    _POS_EMBEDS.pop(module, None)


def pool_stride(pool: Optional[nn.Module], path: str) -> int:
    """The side s of a block's ``q_pool``/``pool`` (None: 1), which must be the square
    non-overlapping ``MaxPool2d(s, s)`` the ops compute."""
    if pool is None:
        return 1
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    if (type(pool) is not nn.MaxPool2d or pair(pool.kernel_size) != pair(pool.stride) or len(set(pair(pool.stride))) != 1
            or pair(pool.padding) != (0, 0) or pair(pool.dilation) != (1, 1) or pool.ceil_mode or pool.return_indices):
        raise ValueError(f"patch: {path}: the q pool must be a square MaxPool2d(kernel_size=stride, no padding, "
                         f"dilation 1, ceil_mode=False), got {pool!r}")
    return pair(pool.stride)[0]


def attention_forward(self, x: torch.Tensor, window_size: int = 0, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, H, W, dim], the block's normed map, unpadded -> [B, H // s, W // s, dim_out],
    plus ``residual`` (the block's skip connection) if given."""
    return attend(self, _linear(self.qkv, x, backend_of(self)), window_size, residual)


def attend(self, qkv: torch.Tensor, window_size: int = 0, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`attention_forward` from the qkv Linear's output [B, H, W, 3 * dim_out] on."""
    backend = backend_of(self)
    # SAM 2 pads the normed map with zeros before qkv: a padded token's qkv is the bias.
    out = ops.window_attention(qkv, self.num_heads, window_size, pool_stride(self.q_pool, "attn"), pad=self.qkv.bias,
                               backend=backend)
    return _linear(self.proj, out, backend, residual)


def block_body(self, x: torch.Tensor, window_size: int, mlp: Optional[Tuple[nn.Linear, str, nn.Linear]],
               ls1: nn.Module, drop_path1: nn.Module, ls2: nn.Module, drop_path2: nn.Module) -> torch.Tensor:
    """Both families' ``MultiScaleBlock.forward``: x [B, H, W, dim] -> [B, H/s, W/s, dim_out].
    ``mlp``: (fc1, activation, fc2) where the MLP is fc2(act(fc1)) and nothing else (None:
    call the MLP module); ls*/drop_path*: what wraps each branch (Identity where none)."""
    if not runs_bound(self.attn, attention_forward):
        # The attention runs a forward of its own (a subclass's, or a wrapper set on it
        # since patching), which takes only x: the block's own forward calls it so.
        return type(self).forward(self, x)
    backend = backend_of(self)
    if recompute.qkv_applies(self, x, backend):
        # Training on a kernel backend: norm1(x) is recomputed in the backward, not saved.
        x = x + drop_path1(ls1(attend(self.attn, recompute.layer_norm_linear(self.norm1, self.attn.qkv, x), window_size)))
    else:
        x_norm = layer_norm(self.norm1, x, backend)
        if self.dim != self.dim_out:
            # The residual of a stage's first block: proj of the *normed* map, max-pooled
            # like q (SAM 2's do_pool: NHWC -> NCHW view -> MaxPool2d -> NHWC view).
            x = _linear(self.proj, x_norm, backend)
            if self.pool is not None:
                x = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if fusable_skip(drop_path1, ls1):
            x = self.attn(x_norm, window_size, residual=x)  # the skip connection in proj's epilogue
        else:
            x = x + drop_path1(ls1(self.attn(x_norm, window_size)))
    skip_fusable = fusable_skip(drop_path2, ls2)
    if mlp is not None and recompute.applies(self.norm2, (mlp[0], mlp[2]), x, backend, self.mlp):
        # Likewise norm2(x) and the GELU's output; fc1's output is kept (and the skip
        # connection added in fc2's epilogue where nothing wraps the branch).
        fc1, activation, fc2 = mlp
        if skip_fusable:
            return recompute.layer_norm_mlp(self.norm2, fc1, activation, fc2, x, residual=True)
        return x + drop_path2(ls2(recompute.layer_norm_mlp(self.norm2, fc1, activation, fc2, x)))
    h = layer_norm(self.norm2, x, backend)
    if (mlp is not None and skip_fusable
            and epilogues.fuses(mlp[0], h, None, backend) and epilogues.fuses(mlp[2], h, x, backend)):
        fc1, activation, fc2 = mlp
        return epilogues.fused_mlp(fc1, activation, fc2, h, x)
    return x + drop_path2(ls2(self.mlp(h)))


def block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """sam2's MultiScaleBlock: ``window_size`` an int, one ``drop_path`` for both branches,
    ``mlp`` its ``MLP`` (``layers[0]``, ``act``, ``layers[1]``)."""
    m = self.mlp
    activation = epilogues.activation_name(m.act)
    plain = m.num_layers == 2 and not m.sigmoid_output and activation is not None
    mlp = (m.layers[0], activation, m.layers[1]) if plain else None
    return block_body(self, x, self.window_size, mlp, nn.Identity(), self.drop_path, nn.Identity(), self.drop_path)


def check_attention(m: nn.Module, path: str) -> None:
    """What ops.window_attention needs of an attention: heads that divide the width, a square q pool."""
    if m.num_heads < 1 or m.dim_out % m.num_heads:
        raise ValueError(f"patch: {path}: dim_out={m.dim_out} is not divisible by num_heads={m.num_heads}")
    pool_stride(m.q_pool, path)


def check_block(m: nn.Module, path: str, window_size: int) -> None:
    """What a block needs beyond its attention's checks: the block's and its attention's
    q pools alike, a window that whole pooling windows tile, a Linear proj where the width changes."""
    if window_size < 0:
        raise ValueError(f"patch: {path}: window_size={window_size} must be >= 0 (0: global attention)")
    s = pool_stride(m.attn.q_pool, f"{path}.attn")
    if s != pool_stride(m.pool, path):
        raise ValueError(f"patch: {path}: the residual's pool ({m.pool!r}) and q's ({m.attn.q_pool!r}) differ")
    if m.q_stride is not None and tuple(m.q_stride) != (s, s):
        raise ValueError(f"patch: {path}: q_stride={m.q_stride} but the q pool has stride {s}")
    if window_size and window_size % s:
        raise ValueError(f"patch: {path}: window_size={window_size} is not divisible by the q stride {s}: "
                         "the pooled windows would not tile the pooled map")
    if m.dim != m.dim_out and not isinstance(m.proj, nn.Linear):
        raise ValueError(f"patch: {path}: dim {m.dim} -> {m.dim_out} needs a Linear proj, got {type(m.proj).__name__}")


def _check_block(m: nn.Module, path: str) -> None:
    check_block(m, path, m.window_size)


RULES = (
    Rule(MODULE, "MultiScaleAttention", "forward", attention_forward, check_attention),
    Rule(MODULE, "MultiScaleBlock", "forward", block_forward, _check_block),
    Rule(UTILS_MODULE, "PatchEmbed", "forward", patch_embed_forward),
    Rule(MODULE, "Hiera", "_get_pos_embed", pos_embed),
)
LOOKS_FOR = tuple(r.qualname for r in RULES)


def bindings(model: nn.Module) -> List[Binding]:
    return find(model, RULES, NAME)
