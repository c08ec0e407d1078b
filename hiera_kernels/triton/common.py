"""What every Triton kernel and launcher here shares: the interpreter switch, the
MMA-operand rule, and the launch hook that the AOT compile check records through."""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Callable, List, Optional

import torch
import triton
import triton.language as tl

# Read once, when the kernels are decorated: triton.jit itself decides at decoration
# time whether a kernel is compiled or interpreted, so later changes to
# TRITON_INTERPRET do not switch these kernels.
try:
    from triton import knobs
except ImportError:  # triton < 3.4 has no knobs: its triton.jit reads the variable as "1"
    INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
else:
    INTERPRETED = bool(knobs.runtime.interpret)
INTERPRETER = tl.constexpr(INTERPRETED)
# Tuples as kernel arguments (unroll/reroll pass their digit tables so) came with
# triton.language.tuple in Triton 3.3; Triton 3.2 (torch 2.6's) cannot compile them, so
# the backend refuses unroll/reroll there, saying so, and the AOT check skips them.
TUPLE_ARGUMENTS: bool = hasattr(tl, "tuple")
NO_TUPLE_ARGUMENTS = (f"Triton {triton.__version__} cannot pass tuples to kernels (needs 3.3+, "
                      "with triton.language.tuple), which the unroll/reroll kernel takes")
# Triton 3.2's compiler aborts the process (an assertion in LinearLayout::reshapeOuts)
# compiling the attention backward kv kernel in fp16/bf16 for sm_90, every head dim
# (found by the AOT check; fp32, sm_80 and the other kernels compile). An abort cannot
# be caught, so the backend refuses those cases there and the AOT check skips them.
# The window attention's backward kv kernel is built from the same tile functions and
# is refused likewise (not tried on 3.2: assumed to abort the same way).
# Triton 3.8 compiles them; 3.3-3.7 are untested, and torch >= 2.6 pins nothing older than 3.2.
TRITON_VERSION = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
SM90_HALF_BACKWARD_ABORTS: bool = TRITON_VERSION < (3, 3)
SM90_HALF_BACKWARD_ABORTS_REASON = (f"Triton {triton.__version__}'s compiler aborts on the fp16/bf16 attention "
                                    "backward for sm_90 (Triton 3.8 compiles it)")

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def mma_operand(x):
    """``x`` (already in the storage dtype) as a tl.dot operand. On GPUs fp16/bf16 stay
    as they are, for the tensor cores; the interpreter computes bf16 arithmetic wrongly,
    so there every operand is fp32 (exact: it came from a narrower type)."""
    if INTERPRETER:
        return x.to(tl.float32)
    else:
        return x


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(op: str, name: str, t, *, device: torch.device, device_of: str, dtype: torch.dtype,
                 dtype_of: str = "", shape, shape_names: str = "") -> None:
    """That argument ``name`` of ``op`` is a tensor on ``device`` (``device_of``'s), of
    ``dtype`` (``dtype_of``'s, if named) and ``shape`` (``shape_names`` spells it), in the
    C++ checks' style: ``...: out must be float32 like qkv, got float16``. The kernels
    index raw pointers by the expected shape: anything else reads or writes out of bounds."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like {device_of}, got {t.device}")
    if t.dtype != dtype:
        like = f" like {dtype_of}" if dtype_of else ""
        raise TypeError(f"{op}: {name} must be {dtype_name(dtype)}{like}, got {dtype_name(t.dtype)}")
    if tuple(t.shape) != tuple(shape):
        names = f"[{shape_names}] = " if shape_names else ""
        raise ValueError(f"{op}: {name} must be {names}{list(shape)}, got {list(t.shape)}")


def new_attention_lse(qkv: torch.Tensor, g) -> torch.Tensor:
    """The forward's log-sum-exp [B, heads, windows, queries] in float32 for geometry ``g``
    (either attention's). The kernels write every element, except where C = 0: then out is
    empty and no kernel runs, but every score is an empty dot product, 0, so each query's
    softmax is uniform over its window's g.keys keys (as SDPA's is for E = 0): lse =
    log(keys). The C++ backends' new_attention_lse (attention_checks.h) does the same."""
    lse = qkv.new_empty((g.batch, g.heads, g.windows, g.queries), dtype=torch.float32)
    if g.dim == 0:
        lse.fill_(math.log(g.keys))
    return lse


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ------------------------------------------------------------------- launching
# Every launcher calls launch(); the AOT compile check (hiera_kernels.triton.aot)
# swaps in a recorder so that what it compiles is exactly what the launchers
# launch, specialization for specialization.
_recorder: Optional[Callable] = None


def launch(kernel, grid, *args, **constexprs) -> None:
    if _recorder is not None:
        _recorder(kernel, args, constexprs)
        return
    # Triton launches on the current device: make it the inputs' (ops registered from
    # Python get no device guard from the dispatcher).
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    with torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **constexprs)


@contextlib.contextmanager
def recording(into: List):
    """Inside the block, launches append ``(kernel, args, constexprs)`` to ``into``
    instead of running (the launchers may then be fed meta tensors)."""
    global _recorder
    previous, _recorder = _recorder, lambda kernel, args, constexprs: into.append((kernel, args, constexprs))
    try:
        yield into
    finally:
        _recorder = previous
