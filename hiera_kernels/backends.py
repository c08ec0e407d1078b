"""Backends: what each one can run, why it refuses, and which one an op uses.

Each backend declares its devices, dtypes and implemented ops (xformers-style) and
answers ``not_supported_reasons(op, device, dtype)`` with readable reasons. ``"auto"``
takes the first backend with no reasons from a per-device priority list, which
always ends in ``"torch"``; a backend asked for by name raises
:class:`BackendError` with its reasons instead of falling back.

The default backend comes from ``HIERA_KERNELS_BACKEND`` (read at import),
:func:`set_backend`, or the :func:`use_backend` context manager; a ``backend=``
argument on an op or model overrides it. Set ``HIERA_KERNELS_LOG=debug`` (or
configure the ``hiera_kernels`` logger) to see every ``"auto"`` decision.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import reference
from ._extension import BUILD_HINT, EXTENSION
from . import library

log = logging.getLogger("hiera_kernels")
_log_level = os.environ.get("HIERA_KERNELS_LOG", "").upper()
if _log_level:
    if _log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"HIERA_KERNELS_LOG={_log_level!r}: use debug, info, warning or error")
    logging.basicConfig()
    log.setLevel(_log_level)

MASK_UNIT_OPS = ("unroll", "reroll", "query_pool", "mask_unit_attention")
OP_NAMES = MASK_UNIT_OPS + ("window_attention",)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WITH_FLOAT64 = FLOAT_DTYPES + (torch.float64,)


class BackendError(RuntimeError):
    """A backend was asked for by name and cannot run the op on these inputs."""


def describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)} on {t.device}"


class Backend:
    """What a backend supports; subclasses implement the ops they list in ``OPS``."""

    NAME: str = ""
    DEVICES: Tuple[str, ...] = ()
    DTYPES: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    OPS: Tuple[str, ...] = ()

    def build_reasons(self) -> List[str]:
        """Why this backend cannot run at all in this installation (empty if it can)."""
        return []

    def by_name_only(self, device: torch.device) -> bool:
        """Whether this backend runs on ``device`` only when asked for by name (never
        listed as available, never chosen by ``"auto"``)."""
        return False

    def device_reasons(self, device: torch.device) -> List[str]:
        if device.type not in self.DEVICES:
            return [f"runs on {'/'.join(self.DEVICES)} tensors, not {device.type}"]
        if device.type == "cuda" and not torch.cuda.is_available():
            return ["no CUDA device is available (torch.cuda.is_available() is False)"]
        return []

    def not_supported_reasons(self, op: str, device: torch.device, dtype: torch.dtype, **limits) -> List[str]:
        """Why this backend cannot run ``op`` on ``dtype`` tensors on ``device`` (empty if it can).
        ``limits`` carries op arguments with backend-specific bounds: a pooling ``stride``
        (query_pool's stride, attention's q_stride), attention's ``head_dim``, and
        unroll/reroll's ``dims`` and ``steps``."""
        reasons = self.build_reasons() + self.device_reasons(device)
        if op not in self.OPS:
            reasons.append(f"has no {op} kernel (it implements: {', '.join(self.OPS) or 'nothing yet'})")
        if dtype not in self.DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in self.DTYPES)
            reasons.append(f"dtype {str(dtype).replace('torch.', '')} is not supported (supported: {names})")
        return reasons

    # Implementations, with arguments already validated and normalised by hiera_kernels.ops.
    def unroll(self, x, size, schedule):
        raise NotImplementedError

    def reroll(self, x, size, schedule, windowed):
        raise NotImplementedError

    def query_pool(self, x, stride):
        raise NotImplementedError

    def mask_unit_attention(self, qkv, heads, q_stride, window_size, use_mask_unit_attn):
        raise NotImplementedError

    def window_attention(self, qkv, pad, heads, window_size, q_stride):
        raise NotImplementedError


class TorchBackend(Backend):
    """Plain PyTorch (:mod:`hiera_kernels.reference`): any device, the oracle."""

    NAME = "torch"
    DTYPES = WITH_FLOAT64
    OPS = OP_NAMES

    def device_reasons(self, device):
        return []

    def unroll(self, x, size, schedule):
        return reference.unroll(x, size, schedule)

    def reroll(self, x, size, schedule, windowed):
        return reference.reroll(x, size, schedule, windowed)

    def query_pool(self, x, stride):
        return reference.query_pool(x, stride)

    def mask_unit_attention(self, qkv, heads, q_stride, window_size, use_mask_unit_attn):
        return reference.mask_unit_attention(qkv, heads, q_stride, window_size, use_mask_unit_attn)

    def window_attention(self, qkv, pad, heads, window_size, q_stride):
        return reference.window_attention(qkv, pad, heads, window_size, q_stride)


def _flat(schedule: Sequence[Sequence[int]]) -> List[int]:
    return [s for step in schedule for s in step]


class KernelOpsBackend(Backend):
    """Backends whose kernels are registered on the ops of :mod:`hiera_kernels.library`
    (``KERNELS``: the C++ family or the Triton family). Their bounds are the C++ kernels'
    (library.py, whose C++ copy is csrc/include/hiera_kernels/token_order.h), for both
    families: the Triton token-order kernels take wider ones, which choosing does not use."""

    OPS = ("unroll", "reroll", "query_pool")
    KERNELS = library.OPS
    MAX_DIMS, MAX_STEPS, MAX_POOL_STRIDE = library.MAX_DIMS, library.MAX_STEPS, library.MAX_POOL_STRIDE
    MAX_ATTENTION_HEAD_DIM: Optional[int] = None  # no bound

    def build_reasons(self):
        if not EXTENSION.loaded:
            return [f"the C++ extension is not built ({EXTENSION.error}); {BUILD_HINT}"]
        return []

    def not_supported_reasons(self, op, device, dtype, **limits):
        reasons = super().not_supported_reasons(op, device, dtype, **limits)
        stride, dims, steps = limits.get("stride", 1), limits.get("dims", 1), limits.get("steps", 0)
        if stride > self.MAX_POOL_STRIDE:
            reasons.append(f"stride={stride} exceeds {self.MAX_POOL_STRIDE}, the most a one-byte argmax can route")
        if dims > self.MAX_DIMS:
            reasons.append(f"{dims} spatial dims exceed the kernels' {self.MAX_DIMS}")
        if steps > self.MAX_STEPS:
            reasons.append(f"{steps} unroll steps exceed the kernels' {self.MAX_STEPS}")
        head_dim = limits.get("head_dim", 0)
        if op in ("mask_unit_attention", "window_attention") and self.MAX_ATTENTION_HEAD_DIM and head_dim > self.MAX_ATTENTION_HEAD_DIM:
            reasons.append(f"head_dim={head_dim} exceeds the attention kernel's {self.MAX_ATTENTION_HEAD_DIM}")
        return reasons

    def unroll(self, x, size, schedule):
        return self.KERNELS["unroll"](x, list(size), _flat(schedule), False)

    def reroll(self, x, size, schedule, windowed):
        B, N, C = x.shape
        out = self.KERNELS["reroll"](x, list(size), _flat(schedule), windowed)
        if not windowed:
            return out.view(B, *size, C)
        mu = reference.mask_unit_shape(schedule, len(size))
        return out.view(B, N // math.prod(mu), *mu, C)

    def query_pool(self, x, stride):
        return self.KERNELS["query_pool"](x, stride)[0]

    def mask_unit_attention(self, qkv, heads, q_stride, window_size, use_mask_unit_attn):
        windows = reference.window_count(qkv.shape[1], q_stride, window_size, use_mask_unit_attn)
        return self.KERNELS["mask_unit_attention"](qkv, heads, q_stride, windows)[0]

    def window_attention(self, qkv, pad, heads, window_size, q_stride):
        return self.KERNELS["window_attention"](qkv.contiguous(), pad.contiguous(), heads, window_size, q_stride)[0]


class CpuBackend(KernelOpsBackend):
    """C++ kernels for CPU tensors (csrc/cpu)."""

    NAME = "cpu"
    DEVICES = ("cpu",)
    DTYPES = WITH_FLOAT64
    OPS = OP_NAMES


class CudaBackend(KernelOpsBackend):
    """C++/CUDA kernels for CUDA tensors (csrc/cuda), built whenever torch has CUDA and
    nvcc is found, GPU or not. ``"auto"`` does not choose them until they have run on a
    GPU: asked for by name, they run. Attention runs float32, float16 and bfloat16 only
    (float64, for gradcheck, stays on "torch"), with head dims up to the kernel's padded
    maximum."""

    NAME = "cuda"
    DEVICES = ("cuda",)
    OPS = OP_NAMES
    MAX_ATTENTION_HEAD_DIM = 128  # kMaxHeadDim in csrc/cuda/attention_launch.h

    def build_reasons(self):
        if not EXTENSION.loaded:
            return super().build_reasons()
        if not EXTENSION.with_cuda:
            return ["the C++ extension was built without CUDA sources (needs torch with CUDA and nvcc at build time)"]
        return []


def _import_triton_kernels():
    """(hiera_kernels.triton, None), or (None, why it cannot be imported)."""
    try:
        from . import triton as kernels
    except Exception as exc:  # not only ImportError: a Triton that fails while decorating the kernels must cost this backend, not the package
        return None, f"{type(exc).__name__}: {exc}"
    return kernels, None


TRITON_KERNELS, TRITON_IMPORT_ERROR = _import_triton_kernels()


class TritonBackend(KernelOpsBackend):
    """Triton kernels (hiera_kernels/triton) for CUDA tensors; CPU tensors run only when
    the kernels were loaded under TRITON_INTERPRET=1, for tests."""

    NAME = "triton"
    DEVICES = ("cuda",)
    OPS = OP_NAMES
    KERNELS = library.TRITON_OPS

    def build_reasons(self):
        return [f"the Triton kernels cannot be imported ({TRITON_IMPORT_ERROR})"] if TRITON_KERNELS is None else []

    def device_reasons(self, device):
        if device.type == "cpu" and TRITON_KERNELS is not None and TRITON_KERNELS.INTERPRETED:
            return []
        if device.type == "cpu":
            return ["runs on cuda tensors (CPU tensors only in the interpreter: set TRITON_INTERPRET=1 "
                    "before importing hiera_kernels, for testing)"]
        return super().device_reasons(device)

    MAX_ATTENTION_HEAD_DIM = TRITON_KERNELS.mask_unit_attention.MAX_HEAD_DIM if TRITON_KERNELS else None

    def not_supported_reasons(self, op, device, dtype, **limits):
        reasons = super().not_supported_reasons(op, device, dtype, **limits)
        common = TRITON_KERNELS.common if TRITON_KERNELS is not None else None
        if common is None:
            return reasons
        if op in ("unroll", "reroll") and not common.TUPLE_ARGUMENTS:
            reasons.append(common.NO_TUPLE_ARGUMENTS)
        if (op in ("mask_unit_attention", "window_attention") and dtype in (torch.float16, torch.bfloat16)
                and common.SM90_HALF_BACKWARD_ABORTS and device.type == "cuda" and torch.cuda.is_available()
                and torch.cuda.get_device_capability(device)[0] == 9):
            reasons.append(common.SM90_HALF_BACKWARD_ABORTS_REASON)
        return reasons

    def by_name_only(self, device):
        return device.type == "cpu"  # the interpreter: for tests, far too slow for use


BACKENDS: Dict[str, Backend] = {b.NAME: b for b in (TorchBackend(), CpuBackend(), CudaBackend(), TritonBackend())}
NAMES = ("auto",) + tuple(BACKENDS)
# "auto" tries these in order; "torch" last, so "auto" never fails where "torch" runs.
# "cuda" is chosen only by name until its kernels have run on a GPU.
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}


def check_name(name: str, where: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


_default = check_name(os.environ.get("HIERA_KERNELS_BACKEND", "auto"), "HIERA_KERNELS_BACKEND")


def get_backend() -> str:
    """The default backend name (``"auto"`` unless set)."""
    return _default


def set_backend(name: str) -> None:
    """Set the default backend for every op and model without a ``backend=`` of its own."""
    global _default
    _default = check_name(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` as the default backend inside a ``with`` block."""
    global _default
    previous, _default = _default, check_name(name, "use_backend")
    try:
        yield
    finally:
        _default = previous


def backend_reasons(device, op: Optional[str] = None, dtype: torch.dtype = torch.float32) -> Dict[str, List[str]]:
    """For every backend, why it cannot run ``op`` on ``dtype`` tensors on ``device``;
    with ``op=None``, why it cannot run any op there."""
    device = torch.device(device)
    out = {}
    for name, b in BACKENDS.items():
        if op is not None:
            out[name] = b.not_supported_reasons(op, device, dtype)
        else:
            out[name] = b.build_reasons() + b.device_reasons(device) + ([] if b.OPS else ["implements no ops yet"])
    return out


def available_backends(device="cpu") -> List[str]:
    """Backends that can run at least one op on ``device``, in ``"auto"`` priority order
    (the Triton interpreter on CPU tensors excluded: it runs only when named)."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("torch",))
    ready = [n for n, reasons in backend_reasons(device).items() if not reasons and not BACKENDS[n].by_name_only(device)]
    return [n for n in order if n in ready] + [n for n in ready if n not in order]


def choose(op: str, tensor: torch.Tensor, backend: Optional[str] = None, **limits) -> Backend:
    """The backend that runs ``op`` on ``tensor``: ``backend`` (or the default), or the
    first that can under ``"auto"``. Raises :class:`BackendError` saying why otherwise."""
    name = check_name(backend, op) if backend is not None else _default
    if name != "auto":
        chosen = BACKENDS[name]
        reasons = chosen.not_supported_reasons(op, tensor.device, tensor.dtype, **limits)
        if reasons:
            raise BackendError(f"{op}: backend {name!r} cannot run on {describe(tensor)}: " + "; ".join(reasons))
        return chosen
    refused = []
    for candidate in AUTO_ORDER.get(tensor.device.type, ("torch",)):
        reasons = BACKENDS[candidate].not_supported_reasons(op, tensor.device, tensor.dtype, **limits)
        if not reasons:
            if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
                log.debug("%s on %s: auto chose %r %s", op, describe(tensor), candidate, " | ".join(refused))
            return BACKENDS[candidate]
        refused.append(f"{candidate!r} refused: " + "; ".join(reasons))
    raise BackendError(f"{op}: no backend can run on {describe(tensor)}: " + " | ".join(refused))
