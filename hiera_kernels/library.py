"""The kernel ops: schemas defined once with ``torch.library``, plus fake and autograd.

Every backend except ``"torch"`` runs these ops. Two families share each schema:

* ``hiera_kernels::<op>``: the C++ kernels register per dispatch key when
  ``hiera_kernels._C`` loads (``csrc/cpu`` for CPU; ``csrc/cuda`` for CUDA, compiled in when torch has CUDA and
  nvcc is found);
* ``hiera_kernels::<op>_triton``: the Triton kernels (:mod:`hiera_kernels.triton`),
  registered for CUDA and, under ``TRITON_INTERPRET=1``, CPU. They need ops of their
  own because they share the CUDA dispatch key with the CUDA C++ kernels.

Both families get the same fake and autograd registrations, so each backend's
backward runs that backend's backward kernels.

The schemas speak in flat integer lists: an unroll schedule ``[(2, 2), (2, 2)]``
travels as ``strides=[2, 2, 2, 2]`` with ``len(size)`` telling the dims apart.
The permutation ops keep the [B, N, C] shape; :mod:`hiera_kernels.ops` adds the
views that give reroll its spatial shape.

    unroll(x, size, strides, windowed)   [B, N, C] raster (or windowed) -> unrolled
    reroll(x, size, strides, windowed)   [B, N, C] unrolled -> raster (or windowed)
    query_pool(x, stride)                [B, N, C] -> ([B, N/stride, C], uint8 argmax)
    query_pool_backward(grad, argmax, stride) -> [B, N, C]
    mask_unit_attention(qkv, heads, q_stride, windows)
        qkv [B, N, 3 * C] -> (out [B, N / q_stride, C], lse [B, heads, windows, N / (windows * q_stride)]
                              in float32 (float64 for float64 qkv),
                              q_argmax uint8 [B, N / q_stride, C], or [0] when q_stride == 1)
    mask_unit_attention_backward(grad_out, qkv, out, lse, q_argmax, heads, q_stride, windows) -> grad_qkv
    window_attention(qkv, pad, heads, window_size, q_stride)           SAM 2's windows on the spatial map
        qkv [B, H, W, 3 * C], pad [3 * C] (a padded token's qkv: the Linear's bias)
        -> (out [B, H // s, W // s, C], lse [B, heads, windows, queries] as above,
            q_argmax uint8 [B, H // s, W // s, C] (index dy * s + dx), or [0] when q_stride == 1)
        window_size 0 is global attention; reference.window_grid gives windows and queries.
    window_attention_backward(grad_out, qkv, pad, out, lse, q_argmax, heads, window_size, q_stride)
        -> (grad_qkv, grad_pad)

The backward ops read what their forward returned: ``query_pool_backward``'s
``argmax``, and ``mask_unit_attention_backward``'s ``out``, ``lse`` and ``q_argmax``
must be exactly the forward's outputs for the same input and arguments (same dtype,
shape and device; ``q_argmax`` is uint8 [0] when ``q_stride == 1``), and ``grad_out``
must have ``out``'s dtype and shape. The C++ entry points check every argument's dtype,
shape, device and bounds (csrc/include/hiera_kernels) and raise a ``RuntimeError``
naming the op, the argument and the numbers. The fakes repeat those checks with the same
messages (as ``ValueError``; :func:`check_input`, :func:`check_like` and the op checks
below), so that a traced call fails where eager does instead of returning shapes (the
Triton family's unroll and reroll within those kernels' wider bounds). Of the values,
the CPU attention backwards refuse a ``q_argmax`` byte at or past the candidate count,
the CUDA ones read it as 0 (they cannot raise without a sync), and
``query_pool_backward`` drops the gradient of an argmax of ``stride`` or more.

``windowed`` order is Reroll-with-a-mask order: unit after unit, each unit's
tokens in raster order over the unit shape; ``size`` then only gives the number
of dims. unroll and reroll are each other's inverse and each other's backward.
"""

from __future__ import annotations

import functools
import math

import torch

from .reference import window_grid

NAMESPACE = "hiera_kernels"
TRITON_SUFFIX = "_triton"

# A pooled value's argmax is one byte: query_pool's stride and mask_unit_attention's
# q_stride choose among at most MAX_POOL_STRIDE candidates, window_attention's s x s pool
# among s * s (s <= MAX_WINDOW_Q_STRIDE). The C++ copy: kMaxPoolStride and
# kMaxWindowQStride (csrc/include/hiera_kernels/token_order.h); tests check that both
# refuse the same strides.
MAX_POOL_STRIDE = 256
MAX_WINDOW_Q_STRIDE = math.isqrt(MAX_POOL_STRIDE)
# unroll and reroll take up to MAX_DIMS spatial dims and MAX_STEPS unroll steps (the C++
# copy: kMaxDims and kMaxSteps, token_order.h).
MAX_DIMS, MAX_STEPS = 4, 8

SCHEMAS = {
    "unroll": "(Tensor x, int[] size, int[] strides, bool windowed) -> Tensor",
    "reroll": "(Tensor x, int[] size, int[] strides, bool windowed) -> Tensor",
    "query_pool": "(Tensor x, int stride) -> (Tensor, Tensor)",
    "query_pool_backward": "(Tensor grad_out, Tensor argmax, int stride) -> Tensor",
    "mask_unit_attention": "(Tensor qkv, int heads, int q_stride, int windows) -> (Tensor, Tensor, Tensor)",
    "mask_unit_attention_backward": "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor q_argmax, "
    "int heads, int q_stride, int windows) -> Tensor",
    "window_attention": "(Tensor qkv, Tensor pad, int heads, int window_size, int q_stride) -> (Tensor, Tensor, Tensor)",
    "window_attention_backward": "(Tensor grad_out, Tensor qkv, Tensor pad, Tensor out, Tensor lse, Tensor q_argmax, "
    "int heads, int window_size, int q_stride) -> (Tensor, Tensor)",
}

_lib = torch.library.Library(NAMESPACE, "DEF")


# ------------------------------------------------------------------ argument checks
# The C++ entry points' checks (csrc/include/hiera_kernels: tensor_checks.h, pool_args.h,
# attention_checks.h) with their messages, in Python for the fakes, so that a traced call
# refuses what eager refuses instead of returning shapes, and for the Triton entry points.
# They raise ValueError (Python's type for a bad value; the C++ checks raise
# RuntimeError). Conditions on sizes go through torch._check_value: on a traced call's
# symbolic sizes it guards on them (as the shapes the fakes return do), and on
# data-dependent sizes it defers the check to run time instead of failing the trace.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require(condition, message: str) -> None:
    torch._check_value(condition, lambda: message)


def check_dims(op: str, name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {layout}, got {t.dim()} dims {list(t.shape)}")


def check_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} has dtype {_name(t.dtype)}, not one of float32, float16, bfloat16, float64")


# What the Triton kernels compute in (triton.language has no float64 dot): the Triton
# entries and their ops' fakes refuse the rest with check_triton_dtype's TypeError.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_triton_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: {name} dtype {_name(t.dtype)} is not supported (float32, float16, bfloat16)")


def check_input(op: str, name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    check_dims(op, name, t, dims, layout)
    check_float_dtype(op, name, t)


def check_same_device(op: str, name: str, t: torch.Tensor, main_name: str, main: torch.Tensor) -> None:
    if t.device != main.device:
        raise ValueError(f"{op}: {name} must be on {main_name}'s device {main.device}, got one on {t.device}")


def check_like(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, why: str, shape, main_name: str,
               main: torch.Tensor) -> None:
    """check_dtype, check_shape and check_same_device, in that order."""
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {_name(dtype)}{why}, got {_name(t.dtype)}")
    message = f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}"
    _require(t.dim() == len(shape), message)
    for size, expected in zip(t.shape, shape):
        _require(size == expected, message)
    check_same_device(op, name, t, main_name, main)


def check_token_geometry(op: str, x: torch.Tensor, size, strides, windowed: bool, kernel_bounds: bool = True) -> None:
    """unroll and reroll: x [B, N, C] holds the grid of mask units that ``size`` and the flat
    ``strides`` describe, or, windowed, whole mask units (make_token_geometry in
    geometry.h); with ``kernel_bounds``, within the C++ kernels' MAX_DIMS, MAX_STEPS and
    float dtypes (the Triton kernels move any rows of 2-byte words over any schedule their
    digit table holds, and check that themselves)."""
    check_dims(op, "x", x, 3, "[B, N, C]")
    if kernel_bounds:
        check_float_dtype(op, "x", x)
    dims = len(size)
    if kernel_bounds and not 1 <= dims <= MAX_DIMS:
        raise ValueError(f"{op}: size must have 1 to {MAX_DIMS} dims, got {dims}")
    if dims < 1:
        raise ValueError(f"{op}: size must have at least 1 dim, got {dims}")
    if len(strides) % dims:
        raise ValueError(f"{op}: strides has {len(strides)} entries, not a multiple of the {dims} spatial dims")
    if kernel_bounds and len(strides) // dims > MAX_STEPS:
        raise ValueError(f"{op}: at most {MAX_STEPS} unroll steps, got {len(strides) // dims}")
    for s in strides:
        if s < 1:
            raise ValueError(f"{op}: strides must be positive, got {s}")
    unit = [math.prod(strides[d::dims]) for d in range(dims)]
    tokens = x.shape[1]
    if windowed:
        _require(tokens % math.prod(unit) == 0,
                 f"{op}: N={tokens} is not a whole number of mask units of {math.prod(unit)} tokens")
        return
    for d in range(dims):
        if size[d] % unit[d]:
            raise ValueError(f"{op}: size[{d}]={size[d]} is not divisible by the schedule's stride product {unit[d]}")
    _require(tokens == math.prod(size), f"{op}: x has N={tokens} tokens but size {list(size)} holds {math.prod(size)}")


def check_pool_stride(op: str, stride: int) -> None:
    if not 1 <= stride <= MAX_POOL_STRIDE:
        raise ValueError(f"{op}: stride must be in [1, {MAX_POOL_STRIDE}] (one-byte argmax), got {stride}")


def check_heads(op: str, width: int, heads: int) -> None:
    """qkv's last dim is ``width`` = 3 * heads * head_dim (both attentions)."""
    _require(heads >= 1 and width % (3 * heads) == 0,
             f"{op}: qkv width {width} is not divisible by 3 * heads = {3 * heads}")


def check_attention_args(op: str, tokens: int, width: int, heads: int, q_stride: int, windows: int) -> None:
    """mask_unit_attention: qkv [B, tokens, width = 3 * heads * head_dim] in ``windows``
    windows of a multiple of q_stride tokens (check_attention_args in attention_checks.h)."""
    check_heads(op, width, heads)
    if not 1 <= q_stride <= MAX_POOL_STRIDE:
        raise ValueError(f"{op}: q_stride must be in [1, {MAX_POOL_STRIDE}], got {q_stride}")
    _require(windows >= 1 and tokens % (windows * q_stride) == 0,
             f"{op}: N={tokens} does not split into {windows} windows of a multiple of q_stride={q_stride} tokens")


def check_window_attention_args(op: str, qkv: torch.Tensor, pad: torch.Tensor, heads: int, window_size: int,
                                q_stride: int) -> None:
    """window_attention: qkv [B, H, W, 3 * C]; window_size 0 (global) or a multiple of
    q_stride; s * s candidates fit the one-byte argmax; the map holds at least one pooling
    window; pad [3 * C] like qkv (check_window_attention_args in attention_checks.h)."""
    _, height, width, channels = qkv.shape
    check_heads(op, channels, heads)
    if not 1 <= q_stride <= MAX_WINDOW_Q_STRIDE:
        raise ValueError(f"{op}: q_stride must be in [1, {MAX_WINDOW_Q_STRIDE}] (s * s candidates, one-byte argmax), "
                         f"got {q_stride}")
    if window_size < 0 or window_size % q_stride:
        raise ValueError(f"{op}: window_size must be 0 (global) or a multiple of q_stride={q_stride}, got {window_size}")
    too_small = f"{op}: the {height}x{width} map is smaller than one {q_stride}x{q_stride} pooling window"
    _require(height >= q_stride, too_small)
    _require(width >= q_stride, too_small)
    check_like(op, "pad", pad, qkv.dtype, " like qkv", (channels,), "qkv", qkv)


def attention_lse_dtype(qkv_dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is saved in the accumulation type: float32, or float64 for float64
    (attention_lse_dtype in attention_checks.h)."""
    return torch.float64 if qkv_dtype == torch.float64 else torch.float32


def check_forward_outputs(op: str, qkv: torch.Tensor, given, expected) -> None:
    """An attention backward's grad_out, out, lse and q_argmax against what the forward
    makes of the same arguments (``expected``: its fake's out, lse, q_argmax; grad_out
    like out), each on qkv's device (check_forward_outputs in attention_checks.h)."""
    whys = (" like qkv", " like qkv", " (the forward's log-sum-exp)", " (the forward's query argmax)")
    for name, t, e, why in zip(("grad_out", "out", "lse", "q_argmax"), given, (expected[0], *expected), whys):
        check_like(op, name, t, e.dtype, why, e.shape, "qkv", qkv)


# ----------------------------------------------------------------------------- fake
# Each checks its arguments as the kernels' entry points do, then makes the outputs.
# Each takes ``op``, the op's qualified name (either family's), for its messages.
def _permutation_fake(x, size, strides, windowed, *, op):
    check_token_geometry(op, x, size, strides, windowed, kernel_bounds=not op.endswith(TRITON_SUFFIX))
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _query_pool_fake(x, stride, *, op):
    check_dims(op, "x", x, 3, "[B, N, C]")  # check_pool_args' order
    check_pool_stride(op, stride)
    check_float_dtype(op, "x", x)
    B, N, C = x.shape
    _require(N % stride == 0, f"{op}: N={N} is not divisible by stride={stride}")
    out = x.new_empty((B, N // stride, C))
    return out, x.new_empty((B, N // stride, C), dtype=torch.uint8)


def _query_pool_backward_fake(grad_out, argmax, stride, *, op):
    check_dims(op, "grad_out", grad_out, 3, "[B, N, C]")
    check_pool_stride(op, stride)
    check_float_dtype(op, "grad_out", grad_out)
    check_like(op, "argmax", argmax, torch.uint8, " (query_pool's argmax)", grad_out.shape, "grad_out", grad_out)
    B, N, C = grad_out.shape
    return grad_out.new_empty((B, N * stride, C))


def _mask_unit_attention_fake(qkv, heads, q_stride, windows, *, op):
    check_input(op, "qkv", qkv, 3, "[B, N, 3 * dim_out]")
    B, N, width = qkv.shape
    check_attention_args(op, N, width, heads, q_stride, windows)
    dim, queries = width // 3, N // (windows * q_stride)
    out = qkv.new_empty((B, queries * windows, dim))
    lse = qkv.new_empty((B, heads, windows, queries), dtype=attention_lse_dtype(qkv.dtype))
    argmax_shape = (B, queries * windows, dim) if q_stride > 1 else (0,)
    return out, lse, qkv.new_empty(argmax_shape, dtype=torch.uint8)


def _mask_unit_attention_backward_fake(grad_out, qkv, out, lse, q_argmax, heads, q_stride, windows, *, op):
    check_forward_outputs(op, qkv, (grad_out, out, lse, q_argmax),
                          _mask_unit_attention_fake(qkv, heads, q_stride, windows, op=op))
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _window_attention_fake(qkv, pad, heads, window_size, q_stride, *, op):
    check_input(op, "qkv", qkv, 4, "[B, H, W, 3 * dim_out]")
    check_window_attention_args(op, qkv, pad, heads, window_size, q_stride)
    B, H, W, width = qkv.shape
    grid = window_grid(H, W, window_size, q_stride)
    out = qkv.new_empty((B, grid.out_h, grid.out_w, width // 3))
    lse = qkv.new_empty((B, heads, grid.windows, grid.queries), dtype=attention_lse_dtype(qkv.dtype))
    argmax_shape = tuple(out.shape) if q_stride > 1 else (0,)
    return out, lse, qkv.new_empty(argmax_shape, dtype=torch.uint8)


def _window_attention_backward_fake(grad_out, qkv, pad, out, lse, q_argmax, heads, window_size, q_stride, *, op):
    check_forward_outputs(op, qkv, (grad_out, out, lse, q_argmax),
                          _window_attention_fake(qkv, pad, heads, window_size, q_stride, op=op))
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(pad)


FAKES = {
    "unroll": _permutation_fake,
    "reroll": _permutation_fake,
    "query_pool": _query_pool_fake,
    "query_pool_backward": _query_pool_backward_fake,
    "mask_unit_attention": _mask_unit_attention_fake,
    "mask_unit_attention_backward": _mask_unit_attention_backward_fake,
    "window_attention": _window_attention_fake,
    "window_attention_backward": _window_attention_backward_fake,
}


# ------------------------------------------------------------------------- autograd
# Each family's backward calls the same family's ops (``ops``, bound below).
def mark_extra_outputs(ctx, *extras) -> None:
    """In an op's ``setup_context``: ``extras`` (statistics, argmaxes, a kept activation)
    are not differentiable, and autograd hands their gradients to the backward as None
    instead of materialising a zero tensor of each one's size before every backward call
    (for ``layer_norm_mlp``'s h that was a [rows, hidden] fill per block and step). The
    backward must then be wrapped in :func:`needs_first_gradient`."""
    ctx.mark_non_differentiable(*extras)
    ctx.set_materialize_grads(False)


def needs_first_gradient(backward):
    """A backward of an op whose setup called :func:`mark_extra_outputs` (autograd then
    passes None for any output without a gradient, as ``set_materialize_grads(False)``
    documents): where the first output got none either, no input gets one. (The extra
    outputs never carry a gradient, so autograd runs the backward only once the first
    does; this keeps the backward correct without relying on that.)"""
    @functools.wraps(backward)
    def wrapped(ctx, grad, *extra_grads):
        if grad is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, grad, *extra_grads)

    return wrapped


def _setup_permutation(ctx, inputs, output):
    _, ctx.size, ctx.strides, ctx.windowed = inputs


def _permutation_backward(inverse):
    def backward(ctx, grad):  # unroll's backward is reroll, and vice versa
        return inverse(grad, ctx.size, ctx.strides, ctx.windowed), None, None, None

    return backward


def _setup_query_pool(ctx, inputs, output):
    _, ctx.stride = inputs
    argmax = output[1]
    mark_extra_outputs(ctx, argmax)
    ctx.save_for_backward(argmax)


def refuse_double_backward(op: str) -> None:
    """In a backward that calls a non-differentiable *_backward kernel: under create_graph
    (grad mode on in the backward) raise, instead of the second derivatives that
    PyTorch's fallback for an op without autograd would silently get wrong."""
    torch._check(not torch.is_grad_enabled(), lambda: f"{op}: double backward (create_graph=True) is not supported: "
                 "its backward kernel is not differentiable")


def _query_pool_backward(ops):
    def backward(ctx, grad, _grad_argmax):
        refuse_double_backward("query_pool")
        (argmax,) = ctx.saved_tensors
        return ops["query_pool_backward"](grad.contiguous(), argmax, ctx.stride), None

    return backward


def _setup_attention(ctx, inputs, output):
    qkv, ctx.heads, ctx.q_stride, ctx.windows = inputs
    out, lse, q_argmax = output
    mark_extra_outputs(ctx, lse, q_argmax)
    ctx.save_for_backward(qkv, out, lse, q_argmax)


def _attention_backward(ops):
    def backward(ctx, grad_out, _grad_lse, _grad_argmax):
        refuse_double_backward("mask_unit_attention")
        qkv, out, lse, q_argmax = ctx.saved_tensors
        grad_qkv = ops["mask_unit_attention_backward"](
            grad_out.contiguous(), qkv, out, lse, q_argmax, ctx.heads, ctx.q_stride, ctx.windows
        )
        return grad_qkv, None, None, None

    return backward


def _setup_window_attention(ctx, inputs, output):
    qkv, pad, ctx.heads, ctx.window_size, ctx.q_stride = inputs
    out, lse, q_argmax = output
    mark_extra_outputs(ctx, lse, q_argmax)
    ctx.save_for_backward(qkv, pad, out, lse, q_argmax)


def _window_attention_backward(ops):
    def backward(ctx, grad_out, _grad_lse, _grad_argmax):
        refuse_double_backward("window_attention")
        qkv, pad, out, lse, q_argmax = ctx.saved_tensors
        grad_qkv, grad_pad = ops["window_attention_backward"](
            grad_out.contiguous(), qkv, pad, out, lse, q_argmax, ctx.heads, ctx.window_size, ctx.q_stride
        )
        return grad_qkv, grad_pad, None, None, None

    return backward


# Each Triton op's main tensor: op -> (its position, name, dims, layout). The Triton entries
# check it first (check_triton_main_tensor: its dims, then TRITON_DTYPES), and so do the
# Triton family's fakes, before the shared checks. unroll and reroll move any dtype's bytes.
TRITON_MAIN_TENSORS = {
    "query_pool": (0, "x", 3, "[B, N, C]"),
    "query_pool_backward": (0, "grad_out", 3, "[B, N, C]"),
    "mask_unit_attention": (0, "qkv", 3, "[B, N, 3 * dim_out]"),
    "mask_unit_attention_backward": (1, "qkv", 3, "[B, N, 3 * dim_out]"),
    "window_attention": (0, "qkv", 4, "[B, H, W, 3 * dim_out]"),
    "window_attention_backward": (1, "qkv", 4, "[B, H, W, 3 * dim_out]"),
}


def check_triton_main_tensor(op: str, t: torch.Tensor) -> None:
    """``op`` ("hiera_kernels::<name>_triton")'s main tensor ``t``: TRITON_MAIN_TENSORS' dims, then TRITON_DTYPES."""
    _, name, dims, layout = TRITON_MAIN_TENSORS[op.split("::")[-1].removesuffix(TRITON_SUFFIX)]
    check_dims(op, name, t, dims, layout)
    check_triton_dtype(op, name, t)


def _triton_fake(fake, position: int, name: str, *_layout):
    def checked(*args, op, **kwargs):
        check_triton_main_tensor(op, args[position] if len(args) > position else kwargs[name])
        return fake(*args, op=op, **kwargs)

    return checked


def _define_family(suffix: str):
    """Define every op as ``hiera_kernels::<op><suffix>`` with its fake and autograd;
    return ``{op: OpOverload}`` keyed by the unsuffixed name."""
    ops = {}
    for name, schema in SCHEMAS.items():
        _lib.define(name + suffix + schema)
        qualname = f"{NAMESPACE}::{name}{suffix}"
        fake = FAKES[name]
        if suffix == TRITON_SUFFIX and name in TRITON_MAIN_TENSORS:
            fake = _triton_fake(fake, *TRITON_MAIN_TENSORS[name])
        torch.library.register_fake(qualname, functools.partial(fake, op=qualname), lib=_lib)
        ops[name] = getattr(torch.ops.hiera_kernels, name + suffix).default
    autograd = {
        "unroll": (_permutation_backward(ops["reroll"]), _setup_permutation),
        "reroll": (_permutation_backward(ops["unroll"]), _setup_permutation),
        "query_pool": (needs_first_gradient(_query_pool_backward(ops)), _setup_query_pool),
        "mask_unit_attention": (needs_first_gradient(_attention_backward(ops)), _setup_attention),
        "window_attention": (needs_first_gradient(_window_attention_backward(ops)), _setup_window_attention),
    }
    for name, (backward, setup) in autograd.items():
        torch.library.register_autograd(f"{NAMESPACE}::{name}{suffix}", backward, setup_context=setup, lib=_lib)
    return ops


OPS = _define_family("")
TRITON_OPS = _define_family(TRITON_SUFFIX)


# --------------------------------------------------------------------- layer_norm
# C++ CPU kernels only (csrc/cpu/layer_norm.cpp). layer_norm has aten::native_layer_norm's
# contract over the last dim (mean and rstd [..., 1] in x's dtype, as ATen's CPU kernel
# returns them); layer_norm_backward is aten::native_layer_norm_backward's from those mean
# and rstd, (grad_x, grad_weight, grad_bias) each computed where output_mask says so, else
# an empty [0] tensor, and two fusions for training's recompute ops (hiera_kernels.recompute):
# where eps is given, y = layer_norm(x, weight, bias, eps), the forward's output with its
# bits, recomputed in the same pass over x (bias is read only for it); where grad_skip is
# given (x's shape; needs grad_x), grad_x + grad_skip (one rounding) and grad_skip's column
# sums [C] (the bias gradient of the Linear that adds the skip connection); else [0]
# tensors. It is not itself differentiable (like the other *_backward ops).
# hiera_kernels.layer_norm decides where they run and registers layer_norm's autograd.
_lib.define("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)")
_lib.define("layer_norm_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
            "bool[3] output_mask, Tensor? bias=None, float? eps=None, Tensor? grad_skip=None) "
            "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor y, Tensor grad_skip_sum)")


def _check_layer_norm_x(op: str, x: torch.Tensor) -> None:
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim (the channels), got a scalar")
    check_float_dtype(op, "x", x)


def _check_layer_norm_affine(op: str, name: str, t, x: torch.Tensor) -> None:
    """weight or bias: None, or [C] like x, in layer_norm.cpp's order (affine_ptr: device
    first, then check_like's dtype and shape)."""
    if t is not None:
        check_same_device(op, name, t, "x", x)
        check_like(op, name, t, x.dtype, " (like x)", (x.shape[-1],), "x", x)


def _check_layer_norm_eps(op: str, eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps:g}")


@torch.library.register_fake(f"{NAMESPACE}::layer_norm", lib=_lib)
def _layer_norm_fake(x, weight, bias, eps):
    op = f"{NAMESPACE}::layer_norm"
    if x.dim() >= 1:
        _check_layer_norm_eps(op, eps)
    _check_layer_norm_x(op, x)
    _check_layer_norm_affine(op, "weight", weight, x)
    _check_layer_norm_affine(op, "bias", bias, x)
    stats = x.new_empty(tuple(x.shape[:-1]) + (1,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.register_fake(f"{NAMESPACE}::layer_norm_backward", lib=_lib)
def _layer_norm_backward_fake(grad_y, x, mean, rstd, weight, output_mask, bias=None, eps=None, grad_skip=None):
    op = f"{NAMESPACE}::layer_norm_backward"
    _check_layer_norm_x(op, x)
    check_same_device(op, "grad_y", grad_y, "x", x)
    check_like(op, "grad_y", grad_y, x.dtype, " (like x)", x.shape, "x", x)
    rows = math.prod(x.shape[:-1])
    for name, stat in (("mean", mean), ("rstd", rstd)):
        check_same_device(op, name, stat, "x", x)
        if stat.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must be {_name(x.dtype)} (like x: the forward's), got {_name(stat.dtype)}")
        _require(stat.numel() == rows, f"{op}: {name} must have one value per row of x ({rows}), got {stat.numel()}")
    _check_layer_norm_affine(op, "weight", weight, x)
    if eps is None and bias is not None:
        raise ValueError(f"{op}: bias is read only to recompute y, which needs the forward's eps: got a bias and no eps")
    if eps is not None:
        _check_layer_norm_eps(op, eps)
    _check_layer_norm_affine(op, "bias", bias, x)
    if grad_skip is not None:
        if not output_mask[0]:
            raise ValueError(f"{op}: grad_skip is added to grad_x, which output_mask[0] does not ask for")
        check_same_device(op, "grad_skip", grad_skip, "x", x)
        check_like(op, "grad_skip", grad_skip, x.dtype, " (like x)", x.shape, "x", x)

    def like_x(wanted):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if wanted else x.new_empty(0)

    def per_channel(wanted):
        return x.new_empty(x.shape[-1] if wanted else 0)

    return (like_x(output_mask[0]), per_channel(output_mask[1]), per_channel(output_mask[2]), like_x(eps is not None),
            per_channel(grad_skip is not None))


# -------------------------------------------------------- gelu_recompute_backward
# A C++ CPU kernel only (csrc/cpu/gelu.cpp): the exact GELU of h recomputed together with
# its backward, (gelu(h), grad_out * gelu'(h)), in one pass, and where bias_grad also
# grad_h summed over every dim but the last (fc1's bias gradient when h is fc1's output;
# else an empty [0] tensor); not itself differentiable, like the other *_backward ops. The
# backward of hiera_kernels.recompute's layer_norm_mlp runs its in-place form below.
_lib.define("gelu_recompute_backward(Tensor grad_out, Tensor h, bool bias_grad=False) -> (Tensor, Tensor, Tensor)")


# gelu_recompute_backward_ is the same with grad_h written over grad_out (contiguous), which
# saves the backward one [rows, hidden] buffer; it returns (gelu(h), grad_bias).
_lib.define("gelu_recompute_backward_(Tensor(a!) grad_out, Tensor h, bool bias_grad=False) -> (Tensor, Tensor)")


def _check_gelu_arguments(op, grad_out, h, bias_grad):
    torch._check(grad_out.shape == h.shape, lambda: f"{op}: grad_out {list(grad_out.shape)} != h {list(h.shape)}")
    torch._check(not bias_grad or h.dim() >= 1, lambda: f"{op}: bias_grad needs h with at least one dim")


@torch.library.register_fake(f"{NAMESPACE}::gelu_recompute_backward", lib=_lib)
def _gelu_recompute_backward_fake(grad_out, h, bias_grad=False):
    _check_gelu_arguments("gelu_recompute_backward", grad_out, h, bias_grad)
    same = torch.empty_like(h, memory_format=torch.contiguous_format)
    return same, torch.empty_like(same), h.new_empty(h.shape[-1] if bias_grad else 0)


@torch.library.register_fake(f"{NAMESPACE}::gelu_recompute_backward_", lib=_lib)
def _gelu_recompute_backward_in_place_fake(grad_out, h, bias_grad=False):
    _check_gelu_arguments("gelu_recompute_backward_", grad_out, h, bias_grad)
    torch._check(grad_out.is_contiguous(), lambda: "gelu_recompute_backward_: grad_out must be contiguous (it is overwritten with grad_h)")
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(h.shape[-1] if bias_grad else 0)
