"""Linear epilogues inside the GEMM, for CPU inference on the ``"cpu"``/``"auto"`` backends.

``F.linear(x, w, b)`` on CPU is ``aten::addmm``: it first copies the broadcast bias into
every row of the output ([B*N, out], e.g. [25088, 288] for Hiera-B stage-1 qkv at batch
8) and then accumulates the GEMM on top, and fc1's GELU is one more full pass over the
[B*N, 4*dim] output. oneDNN adds the bias and applies the GELU to the accumulator before
the single store (post-ops). That is what inductor's CPU freezing emits
(torch/_inductor/fx_passes/mkldnn_fusion.py): the weight reordered once into oneDNN's
blocked layout by ``torch.ops.mkldnn._reorder_linear_weight``, then
``torch.ops.mkldnn._linear_pointwise(x, packed_w, b, "none" | "gelu", [], algorithm)``, and
for a block's skip connection ``torch.ops.mkldnn._linear_pointwise.binary(x, residual,
packed_w, b, "add")`` (attn.proj and mlp.fc2 with the residual add in their epilogue).
All are private PyTorch ops, so they are probed once at import (:data:`UNAVAILABLE`
says why they cannot be used; ``python -m hiera_kernels info`` prints it) and, if
unusable, the model runs the plain path.

:class:`Linear` is ``nn.Linear`` (same ``weight``/``bias`` keys) that takes the fused
path only where it is valid: backend ``"cpu"`` or ``"auto"``, CPU tensors, float32 or
bfloat16, nothing that needs a gradient, no CPU autocast, not while ``torch.compile`` traces (dynamo
cannot trace the packed-weight cache; with ``freezing``, inductor's own pass fuses the
plain ops it sees). Everywhere else, ``"torch"`` always, it is ``F.linear``.
The packed weight is a cache beside the module (:data:`_PACKED`, keyed weakly by the
module), never a parameter, buffer or attribute: it is rebuilt when the weight changes
(same Parameter object, data pointer, version counter, dtype, device and shape); the bias
is passed as it is on every call, so nothing of it is cached.

:func:`fuses` and :func:`fused_linear` run the same path on any plain ``nn.Linear``:
``hiera_kernels.patch`` uses them on other packages' Linears (SAM 2's Hiera), whose
class it must not change.
:func:`fused_mlp` runs a whole MLP (fc1 with its GELU, fc2 with the skip connection) on
that path in chunks of rows, so that fc1's output never exceeds :data:`CHUNK_BYTES`; the
drop-in attention runs its qkv Linear and attention in chunks of images by the same rule
(:func:`chunk_count`).

Training keeps the epilogues where the weight is read as it is (it changes every step, so
nothing is packed): :func:`linear_in_epilogue` in the forwards of
:mod:`hiera_kernels.recompute`'s ops, and the op ``hiera_kernels::linear_residual(x,
weight, bias, residual)`` (``residual + linear(x)``, with its own backward) for the
drop-in attention's proj with the block's skip connection (:meth:`Linear.forward`).
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends
from .library import NAMESPACE

# Backends whose Linears run the fused path (where it is valid); "torch" is the oracle.
FUSING_BACKENDS = ("cpu", "auto")
DTYPES = (torch.float32, torch.bfloat16)
# Training's epilogues (linear_in_epilogue, linear_residual): bfloat16 only. In float32
# they would replace ATen's GEMM (MKL's sgemm; oneDNN runs ATen's bfloat16 GEMMs anyway)
# and so the sums' order: legitimate, but then a max-pool whose window holds a near-tie
# can pick another argmax and route a whole gradient elsewhere. Float32 training keeps
# ATen's sums, and so the official model's gradients (tests/test_models.py judges them by
# the rule against float64, which such a flip fails: Hiera-T, block 10's proj).
TRAINING_DTYPES = (torch.bfloat16,)
# Linear.forward's activation -> oneDNN post-op (attr, algorithm); GELU exact or tanh, as nn.GELU's approximate.
POST_OPS = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """The unfused path: ``activation(x @ W^T + b)`` with ``activation`` a key of POST_OPS."""
    y = F.linear(x, weight, bias)
    if activation == "none":
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def _probe() -> Optional[str]:
    """None where the private ops exist and agree with F.linear (+GELU, +residual) on a
    small case in every dtype of DTYPES, else why not (one failing dtype turns the whole
    path off: simple, and on this project's CPUs both run)."""
    try:
        mkldnn = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
        if not torch.backends.mkldnn.enabled:
            return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
        linear, reorder = mkldnn._linear_pointwise.default, mkldnn._reorder_linear_weight.default
        mkldnn._linear_pointwise.binary  # noqa: B018 (the residual add's overload: must exist too)
        gen = torch.Generator().manual_seed(0)
        # [2, 3, 16] @ [16, 8]^T: 3-D input like the model's [B, N, C].
        x, w, b = (torch.randn(s, generator=gen) for s in ((2, 3, 16), (8, 16), (8,)))
        for dtype in DTYPES:
            xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
            with torch.no_grad():
                packed = reorder(wd, None)
                for activation, (attr, algorithm) in POST_OPS.items():
                    want = plain_linear(x, w, b, activation)
                    got = linear(xd, packed, bd, attr, [], algorithm)
                    tol = 1e-4 if dtype == torch.float32 else 5e-2
                    if got.shape != want.shape or got.dtype != dtype or not torch.allclose(got.float(), want, atol=tol, rtol=tol):
                        return (f"probe mismatch: mkldnn._linear_pointwise(attr={attr!r}, algorithm={algorithm!r}) in "
                                f"{dtype} differs from F.linear by {(got.float() - want).abs().max().item():.3g}")
                r = torch.randn(2, 3, 8, generator=gen)
                # The packed weight (inference) and, in TRAINING_DTYPES, the weight as it is
                # (training's linear_in_epilogue).
                for weight, layout in ((packed, "packed"),) + (((wd, "plain"),) if dtype in TRAINING_DTYPES else ()):
                    got = mkldnn._linear_pointwise.binary(xd, r.to(dtype), weight, bd, "add")
                    want = F.linear(x, w, b) + r
                    if not torch.allclose(got.float(), want, atol=tol, rtol=tol):
                        return (f"probe mismatch: mkldnn._linear_pointwise.binary(attr='add') with a {layout} weight in "
                                f"{dtype} differs from F.linear + residual by {(got.float() - want).abs().max().item():.3g}")
                if dtype in TRAINING_DTYPES:
                    got = linear(xd, wd, bd, "none", [], "")
                    if not torch.allclose(got.float(), F.linear(x, w, b), atol=tol, rtol=tol):
                        return (f"probe mismatch: mkldnn._linear_pointwise with a plain weight in {dtype} differs from "
                                f"F.linear by {(got.float() - F.linear(x, w, b)).abs().max().item():.3g}")
    except Exception as exc:  # a missing private op is AttributeError/RuntimeError; any failure means: do not use it
        return f"torch.ops.mkldnn._linear_pointwise/_reorder_linear_weight unusable ({type(exc).__name__}: {exc})"
    return None


UNAVAILABLE: Optional[str] = _probe()


def plain_linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The unfused path with a block's skip connection: ``residual + F.linear(x, weight,
    bias)``, the official block's order (the sum is the same either way)."""
    return F.linear(x, weight, bias) if residual is None else residual + F.linear(x, weight, bias)


def status() -> str:
    """One line for ``info``: whether the fused Linear epilogues run, and why not."""
    names = lambda dtypes: "/".join(str(d).replace("torch.", "") for d in dtypes)  # noqa: E731
    where = f"backends {'/'.join(FUSING_BACKENDS)}, CPU inference in {names(DTYPES)}, training in {names(TRAINING_DTYPES)}"
    if UNAVAILABLE:
        return f"Linear epilogues in the GEMM ({where}): unavailable, plain F.linear instead: {UNAVAILABLE}"
    return (f"Linear epilogues in the GEMM ({where}): available (bias, GELU and skip-connection add as oneDNN "
            "post-ops; inference weights packed once)")


# Module -> (its weight Parameter, (data_ptr, _version, dtype, device, shape), packed weight).
# Weak keys: the entry goes with its module; copies (deepcopy, pickle) start without one.
_PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook (its own forward or backward hooks, or a
    global one): then the fused paths (here, :mod:`hiera_kernels.layer_norm`,
    :mod:`hiera_kernels.recompute`) leave it to the module's own call."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    return any(map(bool, own)) or any(bool(getattr(nn.modules.module, name, None)) for name in _GLOBAL_HOOKS)


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")


def _fusing_here(backend: Optional[str]) -> bool:
    """What both fused paths (inference's :func:`fuses`, training's
    :func:`fuses_in_training`) need whatever the tensors: the private ops usable, a backend
    of FUSING_BACKENDS (None: the global default), not while ``torch.compile`` traces
    (inductor fuses the plain ops it sees) nor under CPU autocast (F.linear computes in the
    autocast dtype; the private op would not)."""
    if UNAVAILABLE is not None or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    return (backend or backends.get_backend()) in FUSING_BACKENDS


def fuses(linear: nn.Linear, x: torch.Tensor, residual: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> bool:
    """Whether ``linear`` on ``x`` (and ``residual``) takes the fused path on ``backend``
    (None: the global default); see the module docstring. Only ``nn.Linear`` itself or
    :class:`Linear`, and one without hooks (:func:`hooked`): a subclass or a hook computes
    something else or must see the call, so those keep the plain path."""
    if not _fusing_here(backend) or type(linear) not in (nn.Linear, Linear) or hooked(linear):
        return False
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        return False
    w, b = linear.weight, linear.bias
    if w.dtype != x.dtype or w.device.type != "cpu" or (b is not None and b.dtype != x.dtype):
        return False
    if residual is not None and (residual.dtype != x.dtype or residual.device.type != "cpu"):
        return False
    needs_grad = any(t is not None and t.requires_grad for t in (x, w, b, residual))
    return not (torch.is_grad_enabled() and needs_grad)


def packed_weight(linear: nn.Linear) -> torch.Tensor:
    """``linear``'s weight in oneDNN's layout, reordered once per weight value."""
    w = linear.weight
    key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
    cached = _PACKED.get(linear)
    if cached is None or cached[0] is not w or cached[1] != key:
        with torch.no_grad():
            # batch_size=None: a layout for any number of rows (the batch varies);
            # inductor passes its static row count, which made no measurable
            # difference here (Hiera-B stage-1 and stage-3 shapes, bf16 and fp32).
            cached = (w, key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        _PACKED[linear] = cached
    return cached[2]


def is_packed(linear: nn.Linear) -> bool:
    """Whether ``linear`` has a packed weight cached (it has run the fused path)."""
    return linear in _PACKED


def forget(module: nn.Module) -> None:
    """Drop the packed weights of ``module`` and its submodules (``unpatch``: the model no longer runs them)."""
    for m in module.modules():
        _PACKED.pop(m, None)


def fused_linear(linear: nn.Linear, x: torch.Tensor, activation: str = "none", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused path, where :func:`fuses` said yes: ``activation(x @ W^T + b)``, or with
    ``residual`` (a block's skip connection, the output's shape) ``x @ W^T + b + residual``."""
    bias = None if linear.bias is None else linear.bias.detach()
    x, packed = x.detach().contiguous(), packed_weight(linear)
    if residual is not None:
        # oneDNN binary post-op: the skip connection added to the accumulator before
        # the one store (no separate [B, N, C] read-read-write pass, one rounding).
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.detach().contiguous(), packed, bias, "add")
    attr, algorithm = POST_OPS[activation]
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)


def linear_in_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + b`` (+ ``residual``, the output's shape) for the forwards of ops with
    their own backward (:mod:`hiera_kernels.recompute`: training, where the weight changes
    every step, so it is not packed): bias and residual added to the GEMM's accumulator
    before its one store where the private op takes these tensors (CPU, all of one dtype in
    TRAINING_DTYPES), instead of addmm's copy of the broadcast bias into the output before the GEMM
    and a separate pass for the residual (bf16, Hiera-B batch 8: stage-1 fc1 [25088, 96 ->
    384] 3.0 -> 2.1 ms). Elsewhere (float32 too: TRAINING_DTYPES; a strided weight, bias or
    residual, or a residual that broadcasts) :func:`plain_linear_residual`, whose output
    has the same (contiguous) strides. Not differentiable itself."""
    if not takes_in_training(x, weight, bias, residual):
        return plain_linear_residual(x, weight, bias, residual)
    x = x.contiguous()
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def takes_in_training(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`linear_in_epilogue` runs oneDNN's linear on these tensors: the
    private op available, all CPU tensors of one dtype in TRAINING_DTYPES, weight, bias and
    residual contiguous, and the residual of the output's shape."""
    tensors = [t for t in (x, weight, bias, residual) if t is not None]
    if UNAVAILABLE is not None or x.dtype not in TRAINING_DTYPES or any(t.device.type != "cpu" or t.dtype != x.dtype for t in tensors):
        return False
    if not all(t.is_contiguous() for t in tensors[1:]):
        return False
    return residual is None or tuple(residual.shape) == (*x.shape[:-1], weight.shape[0])


def linear_backward(grad_out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, needs):
    """(grad_inp, grad_weight, grad_bias) of ``F.linear(inp, weight, bias)``, each None
    where ``needs`` (three bools) says it is not needed (a frozen weight: no GEMM);
    grad_out [..., out]; inp [..., in], read only for grad_weight (None where that is
    not needed); grad_inp [..., in] with grad_out's leading dims."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_inp = (g2 @ weight).view(*grad_out.shape[:-1], weight.shape[1]) if needs[0] else None
    grad_weight = g2.t() @ inp.reshape(-1, inp.shape[-1]) if needs[1] else None
    return grad_inp, grad_weight, g2.sum(0) if needs[2] else None


_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_lib.define("linear_residual(Tensor x, Tensor weight, Tensor? bias, Tensor residual) -> Tensor")
torch.library.impl(f"{NAMESPACE}::linear_residual", "CompositeExplicitAutograd", linear_in_epilogue, lib=_lib)
torch.library.register_fake(f"{NAMESPACE}::linear_residual", plain_linear_residual, lib=_lib)


def _setup_linear_residual(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)  # x only for the weight's gradient


def _linear_residual_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    needs_x, needs_w, needs_b, needs_residual = ctx.needs_input_grad
    return (*linear_backward(grad_out, x, weight, (needs_x, needs_w, needs_b)), grad_out if needs_residual else None)


torch.library.register_autograd(f"{NAMESPACE}::linear_residual", _linear_residual_backward,
                                setup_context=_setup_linear_residual, lib=_lib)


def fuses_in_training(linear: nn.Linear, x: torch.Tensor, residual: torch.Tensor, backend: Optional[str] = None) -> bool:
    """Whether ``linear`` on ``x`` with the skip connection ``residual`` runs as
    ``linear_residual`` (see the module docstring): grad mode on, where
    :func:`_fusing_here` (backend ``"cpu"`` or ``"auto"``, not under ``torch.compile`` nor
    CPU autocast), and tensors that :func:`takes_in_training` (CPU, one dtype of
    TRAINING_DTYPES, the residual of the output's shape)."""
    return torch.is_grad_enabled() and _fusing_here(backend) and takes_in_training(x, linear.weight, linear.bias, residual)


# The fused paths split their work so that an intermediate (an MLP's fc1 output, an
# attention's qkv) is at most this many bytes at a time. Hiera-B/224 at batch 8 has a
# [25088, 384] stage-1 MLP hidden (fp32 36.75 MiB, bf16 18.4) and [8, 3136, 288] /
# [8, 3136, 576] qkvs in stage 1 and its first pooled block (bf16 13.8 / 27.6 MiB). glibc
# maps a buffer that large afresh (over its mmap threshold, or freed back past its trim
# threshold), so the kernel faults and zeroes its pages on every call: 6-30 thousand
# faults a step. In chunks of a few MiB the intermediates come from the heap and stay in
# L3. Interleaved in one process (Hiera-B/224 batch 8 inference, 10-12 rounds, paired
# medians against 16 MiB): bf16 8 MiB 0.94-0.96, 6 MiB 0.94-0.95, 4 MiB 0.97; fp32 8 MiB
# 0.95-0.97, 6 MiB 0.95, 4 MiB 0.96. The same bits at any size (tests/test_epilogues.py).
CHUNK_BYTES = 6 << 20


def chunk_count(items: int, item_elements: int, dtype: torch.dtype) -> int:
    """In how many chunks a fused path runs ``items`` (rows, images) whose intermediate
    holds ``item_elements`` elements of ``dtype`` each (1: all at once); see CHUNK_BYTES."""
    total_bytes = items * item_elements * dtype.itemsize
    return max(1, min(items, -(-total_bytes // CHUNK_BYTES)))


def run_in_chunks(fn, items: int, chunks: int, out: torch.Tensor) -> torch.Tensor:
    """``out[part] = fn(part)`` for ``chunks`` slices ``part`` of ``out``'s first dim
    (``items`` long), as even as they come (so none is larger than :func:`chunk_count`
    allows); returns ``out``."""
    for i in range(chunks):
        part = slice(i * items // chunks, (i + 1) * items // chunks)
        out[part] = fn(part)
    return out


def fused_mlp(fc1: nn.Linear, activation: str, fc2: nn.Linear, x: torch.Tensor,
              residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fc2(activation(fc1(x)))`` (+ ``residual``) on the fused path, where :func:`fuses`
    said yes for both Linears: x [..., in] in :func:`chunk_count` chunks of rows, each
    chunk's hidden [rows, hidden] freed before the next (each chunk's output is copied into
    the whole one: an extra pass over the [rows, out] output, small beside the hidden's)."""
    x2 = x.reshape(-1, x.shape[-1])
    r2 = None if residual is None else residual.reshape(-1, residual.shape[-1])

    def mlp(rows: slice) -> torch.Tensor:
        return fused_linear(fc2, fused_linear(fc1, x2[rows], activation), residual=None if r2 is None else r2[rows])

    chunks = chunk_count(x2.shape[0], fc1.out_features, x.dtype)
    out = mlp(slice(None)) if chunks == 1 else run_in_chunks(mlp, x2.shape[0], chunks, x2.new_empty(x2.shape[0], fc2.out_features))
    return out.view(*x.shape[:-1], fc2.out_features)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward can apply an activation (``"gelu"``, ``"gelu_tanh"``)
    and, where :meth:`fuses` says so, runs bias and activation inside the GEMM.
    ``backend`` is set by the owning model's ``set_backend`` (None: the global default)."""

    backend: Optional[str] = None

    def fuses(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> bool:
        """Whether a forward on ``x`` (and ``residual``) takes the fused path (see the module docstring)."""
        return fuses(self, x, residual, self.backend)

    def forward(self, x: torch.Tensor, activation: str = "none", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``activation(x @ W^T + b)``, or with ``residual`` (a block's skip connection, the
        output's shape) ``x @ W^T + b + residual``."""
        if activation not in POST_OPS:
            raise ValueError(f"Linear.forward: activation must be one of {', '.join(POST_OPS)}, got {activation!r}")
        if residual is not None and activation != "none":
            raise ValueError(f"Linear.forward: a residual goes with activation 'none', got {activation!r}")
        if self.fuses(x, residual):
            return fused_linear(self, x, activation, residual)
        if residual is not None:
            if fuses_in_training(self, x, residual, self.backend):
                return torch.ops.hiera_kernels.linear_residual(x, self.weight, self.bias, residual)
            return plain_linear_residual(x, self.weight, self.bias, residual)
        return plain_linear(x, self.weight, self.bias, activation)

    def _apply(self, fn, recurse=True):
        _PACKED.pop(self, None)  # .to()/.half()/.cuda(): a new weight tensor; drop the old packed copy now
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", backend={self.backend!r}" if self.backend else "")


def activation_name(act: nn.Module) -> Optional[str]:
    """The :class:`Linear` activation equal to module ``act`` (torch's ``nn.GELU``, timm's
    ``GELU``/``GELUTanh``, which ``timm.create_model``'s ``act_layer="GELU"`` makes, or
    transformers' ``GELUActivation``/``GELUTanh`` on ``F.gelu``, its ``hidden_act`` "gelu"
    and "gelu_pytorch_tanh"), or None."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    timm_activations = sys.modules.get("timm.layers.activations")  # imported by timm if anything made one
    if timm_activations is not None:
        if type(act) is timm_activations.GELU:
            return "gelu"
        if type(act) is timm_activations.GELUTanh:
            return "gelu_tanh"
    hf_activations = sys.modules.get("transformers.activations")
    if hf_activations is not None and "forward" not in vars(act):  # no forward of its own (a hub kernel's)
        # Their act attribute is F.gelu, partial(F.gelu, approximate="tanh"), or a Python
        # formula (use_gelu_python: other roundings, not taken).
        if type(act) is hf_activations.GELUActivation and act.act is F.gelu:
            return "gelu"
        tanh = getattr(hf_activations, "GELUTanh", None)
        if (tanh is not None and type(act) is tanh and isinstance(act.act, functools.partial)
                and act.act.func is F.gelu and act.act.args == () and act.act.keywords == {"approximate": "tanh"}):
            return "gelu_tanh"
    return None
