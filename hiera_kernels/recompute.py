"""Training: a block's LayerNorm and GELU outputs recomputed in the backward, not saved.

A Hiera block's plain autograd graph keeps, per token, the LayerNorm outputs that the
Linears after them read (``norm1(x)`` for qkv, ``norm2(x)`` for fc1: ``dim`` values
each) and both sides of the MLP's GELU (fc1's output ``h`` and ``gelu(h)``: ``4 * dim``
each). Two ops keep only what cannot be recomputed cheaply:

    layer_norm_linear(x, norm_weight, norm_bias, eps, weight, bias)
        x [..., C] -> (linear(layer_norm(x)) [..., out], mean [..., 1], rstd [..., 1])
        saves x, mean, rstd (x is the block's input, which the graph keeps anyway)
    layer_norm_mlp(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                   residual=False)
        x [..., C] -> (fc2(gelu(fc1(layer_norm(x)))) (+ x where residual) [..., C'], mean, rstd,
                       h = fc1(...) [..., hidden])
        saves x, mean, rstd and h; gelu(h) is recomputed once in the backward

``mean``, ``rstd`` and ``h`` are outputs only so that autograd can save them (not
differentiable; callers drop them; autograd materialises no zero gradients for them,
:func:`hiera_kernels.library.mark_extra_outputs`). The forward runs the plain modules'
ops in their order, the LayerNorm on :mod:`hiera_kernels.layer_norm`'s CPU kernel for CPU
tensors whose norm parameters share x's dtype (ATen's elsewhere) and the Linears with
their bias (and fc2 with the skip connection) in the GEMM's epilogue
(:func:`hiera_kernels.epilogues.linear_in_epilogue`; F.linear where that does not take
the tensors). The backward recomputes ``gelu(h)`` together with the GELU's backward (for
the exact GELU of CPU tensors, one pass of a C++ kernel,
``hiera_kernels::gelu_recompute_backward_``, whose erf is ATen's vectorised formula:
within an ulp or so of the forward's, where ATen runs two passes with an erf each; the
same pass sums fc1's bias gradient and writes grad_h over fc2's input gradient), then the
Linears' and LayerNorm's own backward formulas, for the inputs that need a gradient. The
Linear after the LayerNorm gives its input gradient first, so that the LayerNorm's
backward recomputes ``layer_norm(x)`` (with the forward's function: the same bits) for
the Linear's weight gradient; on the C++ kernel in the same pass over x, where
``layer_norm_mlp``'s skip gradient also joins grad_x (one rounding) and has its columns
summed: fc2's bias gradient (``hiera_kernels::layer_norm_backward``'s fusions).
Under ``create_graph`` the backward is itself differentiable (ATen's GELU, h recomputed
from x). The ops are composite: they run on every device, and only the memory they keep
differs from the plain modules.

The drop-in model and patched official, timm, transformers and SAM 2 blocks use them in
training on every backend but ``"torch"`` (the plain oracle), not under ``torch.compile`` (inductor's
partitioner already chooses what to recompute, and fuses these elementwise passes into
its own kernels) nor CPU autocast, and never past a hook; see :func:`applies`. With
``residual`` (the drop-in, official, timm and SAM 2 blocks where no drop path or LayerScale
wraps the MLP) the block's skip connection goes into fc2's epilogue.

A third op takes the whole attention branch of a drop-in, official or timm block where the
C++ kernels run its attention (:func:`attention_applies`):

    layer_norm_attention(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, windows)
        x [B, N, C] -> (x + proj(mask_unit_attention(qkv(layer_norm(x)))) [B, N, C], mean, rstd,
                        qkv [B, N, 3C], the attention's output [B, N, C], its lse and q_argmax)
        saves x, mean, rstd and the attention's tensors (what layer_norm_linear, the
        attention op and proj's linear_residual keep between them)

whose backward gives the skip connection's gradient to the LayerNorm backward kernel, which
adds it to grad_x and sums proj's bias gradient from it: no add where two ops read x
(the autograd engine's) and no separate bias sum. Without query pooling only (windows:
the attention op's, for q_stride 1). Its backward is not differentiable (nor is the
attention op's): under ``create_graph`` both raise instead of giving wrong second
derivatives.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, ops, reference
from .epilogues import Linear, hooked, linear_backward, linear_in_epilogue, plain_linear_residual
from .layer_norm import cpu_kernel_takes, native_layer_norm, native_layer_norm_backward, plain_layer_norm
from .library import NAMESPACE, OPS, mark_extra_outputs, needs_first_gradient, refuse_double_backward

SCHEMAS = {
    "layer_norm_linear": "(Tensor x, Tensor? norm_weight, Tensor? norm_bias, float eps, Tensor weight, Tensor? bias) "
    "-> (Tensor, Tensor, Tensor)",
    "layer_norm_mlp": "(Tensor x, Tensor? norm_weight, Tensor? norm_bias, float eps, Tensor fc1_weight, "
    "Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, str approximate, bool residual=False) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "layer_norm_attention": "(Tensor x, Tensor? norm_weight, Tensor? norm_bias, float eps, Tensor qkv_weight, "
    "Tensor? qkv_bias, Tensor proj_weight, Tensor? proj_bias, int heads, int windows) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
}
APPROXIMATIONS = ("none", "tanh")  # F.gelu's approximate=

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def _layer_norm_linear(x, norm_weight, norm_bias, eps, weight, bias, linear=linear_in_epilogue):
    y, mean, rstd = native_layer_norm(x, norm_weight, norm_bias, eps)
    return linear(y, weight, bias), mean, rstd


def _layer_norm_mlp(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                    residual=False, linear=linear_in_epilogue):
    torch._check(approximate in APPROXIMATIONS, lambda: f"layer_norm_mlp: approximate must be 'none' or 'tanh', got {approximate!r}")
    torch._check(not residual or fc2_weight.shape[0] == x.shape[-1],
                 lambda: f"layer_norm_mlp: residual=True needs fc2's output width {fc2_weight.shape[0]} == x's {x.shape[-1]}")
    y, mean, rstd = native_layer_norm(x, norm_weight, norm_bias, eps)
    h = linear(y, fc1_weight, fc1_bias)
    out = linear(F.gelu(h, approximate=approximate), fc2_weight, fc2_bias, x if residual else None)
    return out, mean, rstd, h


def _layer_norm_attention(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, windows,
                          linear=linear_in_epilogue):
    torch._check(proj_weight.shape[0] == x.shape[-1],
                 lambda: f"layer_norm_attention: the skip connection needs proj's output width {proj_weight.shape[0]} == x's {x.shape[-1]}")
    y, mean, rstd = native_layer_norm(x, norm_weight, norm_bias, eps)
    qkv = linear(y, qkv_weight, qkv_bias)
    attn, lse, q_argmax = OPS["mask_unit_attention"](qkv, heads, 1, windows)
    return linear(attn, proj_weight, proj_bias, x), mean, rstd, qkv, attn, lse, q_argmax


# The Linears run with their bias (and fc2 with the skip connection) in the GEMM's
# epilogue (epilogues.linear_in_epilogue); the fakes run the plain ops, whose meta kernels
# give the same shapes (and the attention's fake).
for _name, _fn in (("layer_norm_linear", _layer_norm_linear), ("layer_norm_mlp", _layer_norm_mlp),
                   ("layer_norm_attention", _layer_norm_attention)):
    torch.library.impl(f"{NAMESPACE}::{_name}", "CompositeExplicitAutograd", _fn, lib=_lib)
    torch.library.register_fake(f"{NAMESPACE}::{_name}", functools.partial(_fn, linear=plain_linear_residual), lib=_lib)


def _setup_layer_norm_linear(ctx, inputs, output):
    x, norm_weight, norm_bias, ctx.eps, weight, bias = inputs
    _, mean, rstd = output
    mark_extra_outputs(ctx, mean, rstd)
    ctx.save_for_backward(x, norm_weight, norm_bias, weight, mean, rstd)


def _norm_linear_backward(grad_out, x, mean, rstd, norm_weight, norm_bias, eps, weight, norm_needs, needs_w, needs_b,
                          grad_skip=None, y=None):
    """(grad_x, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, grad_skip_sum) of
    ``linear(layer_norm(x), weight, bias)`` from the Linear's output gradient ``grad_out``
    [rows, out], each where its ``needs`` says so, else None. The Linear's input gradient
    first: the LayerNorm's backward then recomputes the forward's y for the weight
    gradient in its own pass over x (unless the caller passes ``y``), and adds
    ``grad_skip`` (a skip connection's gradient to x) to grad_x, returning its column
    sums. (grad_y, grad_x and y are alive together for a moment: one [rows, C] buffer
    more at the backward's peak than when y was recomputed after grad_y was freed, against
    one pass over x fewer.)"""
    grad_y, _, grad_bias = linear_backward(grad_out, None, weight, (any(norm_needs), False, needs_b))
    grad_x = grad_norm_weight = grad_norm_bias = grad_skip_sum = None
    needs_y = needs_w and y is None
    if any(norm_needs):
        grad_x, grad_norm_weight, grad_norm_bias, y_recomputed, grad_skip_sum = native_layer_norm_backward(
            grad_y.view(x.shape), x, mean, rstd, norm_weight, norm_bias, norm_needs, eps if needs_y else None, grad_skip)
        y = y_recomputed if needs_y else y
    elif needs_y:
        y = native_layer_norm(x, norm_weight, norm_bias, eps)[0]
    del grad_y
    _, grad_weight, _ = linear_backward(grad_out, y, weight, (False, needs_w, False))
    return grad_x, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, grad_skip_sum


def _backward_layer_norm_linear(ctx, grad_out, _grad_mean, _grad_rstd):
    x, norm_weight, norm_bias, weight, mean, rstd = ctx.saved_tensors
    needs_x, needs_nw, needs_nb, _, needs_w, needs_b = ctx.needs_input_grad
    grad_x, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, _ = _norm_linear_backward(
        grad_out.reshape(-1, grad_out.shape[-1]), x, mean, rstd, norm_weight, norm_bias, ctx.eps, weight,
        (needs_x, needs_nw, needs_nb), needs_w, needs_b)
    return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


def _setup_layer_norm_mlp(ctx, inputs, output):
    x, norm_weight, norm_bias, ctx.eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ctx.approximate, ctx.residual = inputs
    _, mean, rstd, h = output
    mark_extra_outputs(ctx, mean, rstd, h)
    ctx.save_for_backward(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, h)


def gelu_recompute_backward(grad_a: torch.Tensor, h: torch.Tensor, approximate: str, bias_grad: bool):
    """(gelu(h), grad_h = grad_a * gelu'(h), grad_h summed over all dims but the last where
    ``bias_grad``, else None): one pass on the C++ CPU kernel for the exact GELU of CPU
    tensors (where the extension is built), grad_h written over ``grad_a`` (a temporary
    of the caller's: one [rows, hidden] buffer fewer), else ATen's gelu, gelu_backward and sum."""
    # Under create_graph (double backward) ATen's ops, which are differentiable; the kernel is not.
    if approximate == "none" and not torch.is_grad_enabled() and cpu_kernel_takes(h, grad_a):
        grad_h = grad_a.contiguous()
        a, grad_bias = torch.ops.hiera_kernels.gelu_recompute_backward_(grad_h, h, bias_grad)
        return a, grad_h, grad_bias if bias_grad else None
    grad_h = torch.ops.aten.gelu_backward(grad_a, h, approximate=approximate)
    return F.gelu(h, approximate=approximate), grad_h, grad_h.reshape(-1, h.shape[-1]).sum(0) if bias_grad else None


def _backward_layer_norm_mlp(ctx, grad_out, _grad_mean, _grad_rstd, _grad_h):
    x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, h = ctx.saved_tensors
    # (needs_input_grad has no entry for ``residual`` where the caller left it out.)
    needs_x, needs_nw, needs_nb, _, needs_w1, needs_b1, needs_w2, needs_b2, _ = ctx.needs_input_grad[:9]
    norm_needs = (needs_x, needs_nw, needs_nb)
    y = None
    if torch.is_grad_enabled():
        # create_graph (double backward): h recomputed as a function of x and the weights;
        # the saved h is a non-differentiable output.
        y = native_layer_norm(x, norm_weight, norm_bias, ctx.eps)[0]
        h = F.linear(y, fc1_weight, fc1_bias)
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    # fc2 read gelu(h): recomputed with the GELU's backward ([rows, hidden], the block's
    # largest activations) and freed before fc1's backward allocates its own; fc1's bias
    # gradient is summed in the same pass.
    a, grad_h, grad_fc1_bias = gelu_recompute_backward((g2 @ fc2_weight).view(h.shape), h, ctx.approximate, needs_b1)
    # The skip connection's gradient (grad_out) joins grad_x in the LayerNorm's backward,
    # which sums its columns on the way: fc2's bias gradient.
    grad_skip = grad_out if ctx.residual and needs_x else None
    _, grad_fc2_weight, grad_fc2_bias = linear_backward(g2, a, fc2_weight, (False, needs_w2, needs_b2 and grad_skip is None))
    del a
    grad_x, grad_norm_weight, grad_norm_bias, grad_fc1_weight, _, grad_skip_sum = _norm_linear_backward(
        grad_h.reshape(-1, h.shape[-1]), x, mean, rstd, norm_weight, norm_bias, ctx.eps, fc1_weight, norm_needs, needs_w1,
        False, grad_skip, y)
    del grad_h
    if needs_b2 and grad_skip is not None:
        grad_fc2_bias = grad_skip_sum
    grads = (grad_x, grad_norm_weight, grad_norm_bias, None, grad_fc1_weight, grad_fc1_bias,
             grad_fc2_weight, grad_fc2_bias, None, None)
    return grads[:len(ctx.needs_input_grad)]


def _setup_layer_norm_attention(ctx, inputs, output):
    x, norm_weight, norm_bias, ctx.eps, qkv_weight, _, proj_weight, _, ctx.heads, ctx.windows = inputs
    _, mean, rstd, qkv, attn, lse, q_argmax = output
    mark_extra_outputs(ctx, mean, rstd, qkv, attn, lse, q_argmax)
    ctx.save_for_backward(x, norm_weight, norm_bias, qkv_weight, proj_weight, mean, rstd, qkv, attn, lse, q_argmax)


def _backward_layer_norm_attention(ctx, grad_out, *_extra_grads):
    refuse_double_backward("layer_norm_attention")
    x, norm_weight, norm_bias, qkv_weight, proj_weight, mean, rstd, qkv, attn, lse, q_argmax = ctx.saved_tensors
    needs_x, needs_nw, needs_nb, _, needs_wq, needs_bq, needs_wp, needs_bp, _, _ = ctx.needs_input_grad
    norm_needs = (needs_x, needs_nw, needs_nb)
    needs_qkv = any(norm_needs) or needs_wq or needs_bq
    # The skip connection's gradient (grad_out) joins grad_x in the LayerNorm's backward,
    # which sums its columns on the way: proj's bias gradient.
    grad_skip = grad_out if needs_x else None
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_attn, grad_proj_weight, grad_proj_bias = linear_backward(g2, attn, proj_weight,
                                                                   (needs_qkv, needs_wp, needs_bp and grad_skip is None))
    grad_x = grad_norm_weight = grad_norm_bias = grad_qkv_weight = grad_qkv_bias = None
    if needs_qkv:
        grad_qkv = OPS["mask_unit_attention_backward"](grad_attn.view(attn.shape), qkv, attn, lse, q_argmax, ctx.heads, 1,
                                                       ctx.windows)
        del grad_attn
        grad_x, grad_norm_weight, grad_norm_bias, grad_qkv_weight, grad_qkv_bias, grad_skip_sum = _norm_linear_backward(
            grad_qkv.reshape(-1, grad_qkv.shape[-1]), x, mean, rstd, norm_weight, norm_bias, ctx.eps, qkv_weight,
            norm_needs, needs_wq, needs_bq, grad_skip)
        if needs_bp and grad_skip is not None:
            grad_proj_bias = grad_skip_sum
    return (grad_x, grad_norm_weight, grad_norm_bias, None, grad_qkv_weight, grad_qkv_bias, grad_proj_weight,
            grad_proj_bias, None, None)


torch.library.register_autograd(f"{NAMESPACE}::layer_norm_linear", needs_first_gradient(_backward_layer_norm_linear),
                                setup_context=_setup_layer_norm_linear, lib=_lib)
torch.library.register_autograd(f"{NAMESPACE}::layer_norm_mlp", needs_first_gradient(_backward_layer_norm_mlp),
                                setup_context=_setup_layer_norm_mlp, lib=_lib)
torch.library.register_autograd(f"{NAMESPACE}::layer_norm_attention", needs_first_gradient(_backward_layer_norm_attention),
                                setup_context=_setup_layer_norm_attention, lib=_lib)


# ------------------------------------------------------------------ module-level API
def applies(norm: nn.Module, linears, x: torch.Tensor, backend: Optional[str], branch: Optional[nn.Module] = None) -> bool:
    """Whether ``norm`` followed by ``linears`` on ``x`` runs as one recompute op: a
    training forward that records a graph (grad mode on, something needs a gradient), a
    backend other than ``"torch"`` (``backend`` None: the global default), not under
    ``torch.compile`` (see the module docstring) nor autocast (whose casts the op would
    bypass), and the plain modules the op computes: a :func:`plain_layer_norm`,
    ``nn.Linear`` (or the drop-in :class:`~hiera_kernels.epilogues.Linear`), none of them
    hooked (:func:`~hiera_kernels.epilogues.hooked`: forward, backward or global hooks),
    nor any module of ``branch``, the module whose forward the op stands in for (an
    attention whose qkv it computes, an MLP: its activation, dropouts...)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return False
    if (backend or backends.get_backend()) == "torch":
        return False
    if not plain_layer_norm(norm):
        return False
    if any(type(m) not in (nn.Linear, Linear) for m in linears):
        return False
    if any(hooked(m) for m in (norm, *linears, *(branch.modules() if branch is not None else ()))):
        return False
    params = [p for m in (norm, *linears) for p in m.parameters()]
    return x.requires_grad or any(p.requires_grad for p in params)


def qkv_applies(block: nn.Module, x: torch.Tensor, backend: Optional[str]) -> bool:
    """Whether a block runs ``attn.qkv(norm1(x))`` as :func:`layer_norm_linear`: where
    :func:`applies`, and not in a stage's first block (dim != dim_out), whose normed input
    feeds its ``proj`` too. ``block`` has the official attributes (dim, dim_out, norm1,
    attn.qkv), as the drop-in, official, timm and SAM 2 blocks do."""
    return block.dim == block.dim_out and applies(block.norm1, (block.attn.qkv,), x, backend, block.attn)


def attention_applies(block: nn.Module, x: torch.Tensor, backend: Optional[str]) -> bool:
    """Whether a block runs its whole attention branch, ``x + attn.proj(attention(
    attn.qkv(norm1(x))))``, as :func:`layer_norm_attention`: where :func:`qkv_applies` (proj
    plain and unhooked too), no query pooling (a stage's later blocks), the attention and
    its Linears on the block's ``backend`` (``set_backend`` sets them alike; where they
    differ, each module keeps its own call), and the C++ kernels' attention (``"cpu"``, or
    ``"cuda"`` where chosen) is what that backend runs. The caller uses it only where
    nothing wraps the branch (no stochastic depth or LayerScale, or eval) and where
    ``block.attn`` computes the official MaskUnitAttention: the drop-in's exact type, or a
    patched official or timm attention running its bound forward (the callers check; a
    subclass's own forward is kept)."""
    attn = block.attn
    if attn.q_stride != 1 or not qkv_applies(block, x, backend) or type(attn.proj) not in (nn.Linear, Linear):
        return False
    if any(getattr(m, "backend", backend) != backend for m in (attn, attn.qkv, attn.proj)):
        return False
    chosen = backends.choose("mask_unit_attention", x, backend, stride=1, head_dim=attn.dim_out // attn.heads)
    return getattr(chosen, "KERNELS", None) is OPS


def layer_norm_attention(norm: nn.LayerNorm, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + attn.proj(mask_unit_attention(attn.qkv(norm(x))))`` (an official
    MaskUnitAttention without query pooling: the drop-in
    :class:`~hiera_kernels.models.hiera.MaskUnitAttention`, a patched official or timm one) in one
    op, its geometry checked as :func:`hiera_kernels.ops.mask_unit_attention` checks it:
    keeps x, the qkv and the attention's output, its log-sum-exp and argmax for the
    backward, instead of ``norm(x)`` besides; the backward adds the skip connection's
    gradient inside the LayerNorm's and sums proj's bias gradient there."""
    ops.check_mask_unit_geometry("mask_unit_attention", x.shape[1], attn.qkv.weight.shape[0], attn.heads, 1,
                                 attn.window_size, attn.use_mask_unit_attn)
    windows = reference.window_count(x.shape[1], 1, attn.window_size, attn.use_mask_unit_attn)
    out, *_ = torch.ops.hiera_kernels.layer_norm_attention(x, norm.weight, norm.bias, norm.eps, attn.qkv.weight,
                                                           attn.qkv.bias, attn.proj.weight, attn.proj.bias, attn.heads,
                                                           windows)
    return out


def layer_norm_linear(norm: nn.LayerNorm, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(norm(x))``, keeping x for the backward instead of ``norm(x)``."""
    out, _, _ = torch.ops.hiera_kernels.layer_norm_linear(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)
    return out


def layer_norm_mlp(norm: nn.LayerNorm, fc1: nn.Linear, activation: str, fc2: nn.Linear, x: torch.Tensor,
                   residual: bool = False) -> torch.Tensor:
    """``fc2(gelu(fc1(norm(x))))`` with ``activation`` ``"gelu"`` or ``"gelu_tanh"``
    (:func:`hiera_kernels.epilogues.activation_name`), keeping x and fc1's output for the
    backward instead of ``norm(x)``, fc1's output and the GELU's; with ``residual``, plus
    x (the block's skip connection, added in fc2's epilogue)."""
    approximate = {"gelu": "none", "gelu_tanh": "tanh"}[activation]
    out, _, _, _ = torch.ops.hiera_kernels.layer_norm_mlp(
        x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias, approximate, residual)
    return out
