"""The one error rule for results that are not bit-exact (attention, its gradients,
whole models): ``check``, the tests and the benchmarks all judge with it.

flash-attention's rule, always against a float64 reference::

    |result - reference| <= 2 * |torch_result - reference| + allowance
    allowance = (ROUNDING_ULPS * eps(dtype) + ACCUMULATION_ULPS * eps(float32)) * max|reference|

``result`` is a backend's output in a low-precision ``dtype``, ``torch_result`` the
``"torch"`` path's output in the same dtype, and ``reference`` the ``"torch"`` path in
float64 (max-abs norms, each tensor on its own).

Why an allowance: the factor 2 alone ties the bound to how accurate PyTorch's own
kernels happen to be, and PyTorch picks different SDPA and GEMM kernels on different
CPUs (oneDNN on AMX, MKL elsewhere, its flash kernel in one blocking or another). Where
the ``"torch"`` path happens to be nearly correctly rounded, twice its error is below the
rounding that any kernel must do. The allowance covers that rounding, in units in the
last place at the reference's largest magnitude:

* ``ROUNDING_ULPS`` of ``dtype``: the final cast to ``dtype`` (a kernel and the torch
  path may round the same value to neighbouring ``dtype`` values, and a softmax or a
  gradient carries that difference through), and the Triton interpreter's fp32 ->
  bf16/fp16 casts, which truncate where GPUs round to nearest;
* ``ACCUMULATION_ULPS`` of float32: every backend accumulates in float32 (float64 for
  float64), in its own order: blocked dot products over head dims up to 128, online
  softmax sums over up to thousands of keys with a polynomial exp. Such an error scales
  with the summed terms (|p| |v|, up to max|v|), not with the result: a global attention
  output over 1568 keys has max|out| ~ 0.46 where max|v| ~ 4. Measured there (Hiera-B+
  video, stage 3, fp32): the cpu kernel 1.15e-6 off float64, the torch path ~3e-7, so
  the kernel's excess was ~20 float32 ulps at the output's scale.

Both scale with the output, so they stay small against a real bug, which shows up as
errors of many ulps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

ROUNDING_ULPS = 2
ACCUMULATION_ULPS = 32


@dataclass(frozen=True)
class Verdict:
    error: float        # max |result - reference|
    torch_error: float  # max |torch_result - reference|
    allowance: float    # (ROUNDING_ULPS * eps(dtype) + ACCUMULATION_ULPS * eps(float32)) * max|reference|
    limit: float        # 2 * torch_error + allowance

    @property
    def passed(self) -> bool:
        return self.error <= self.limit

    def describe(self) -> str:
        return (f"error {self.error:.3g} vs float64 {'<=' if self.passed else '>'} limit {self.limit:.3g} "
                f"(2 x torch path's {self.torch_error:.3g} + allowance {self.allowance:.2g})")


def max_abs_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """max |result - reference| in float64 (0 for empty tensors). NaN where either has a
    NaN the other lacks, so that a NaN never passes."""
    if result.shape != reference.shape:
        raise ValueError(f"error_rule: result shape {list(result.shape)} != reference shape {list(reference.shape)}")
    if result.numel() == 0:
        return 0.0
    a, b = result.detach().double().cpu(), reference.detach().double().cpu()
    # Equal infinities and NaN where both have NaN count as no error; any other
    # non-finite difference is inf or NaN and fails every limit.
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, torch.zeros_like(a), (a - b).abs()).max().item()


def allowance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """The rule's allowance for ``dtype`` at the reference's largest finite magnitude."""
    finite = reference.detach().double()
    finite = finite[torch.isfinite(finite)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    return (ROUNDING_ULPS * torch.finfo(dtype).eps + ACCUMULATION_ULPS * torch.finfo(accumulation).eps) * scale


def judge(result: torch.Tensor, torch_result: torch.Tensor, reference: torch.Tensor,
          dtype: Optional[torch.dtype] = None) -> Verdict:
    """Judge ``result`` (a backend, in a low-precision dtype) by the rule, given the
    ``"torch"`` path's result in the same dtype and the float64 reference. ``dtype``: the
    dtype the result was computed in, when not its own: under bf16 autocast a float32
    parameter's gradient comes out of bfloat16 products, so its rounding is bfloat16's."""
    if reference.dtype != torch.float64:
        raise ValueError(f"error_rule: the reference must be float64, got {reference.dtype}")
    if result.dtype != torch_result.dtype:
        raise ValueError(f"error_rule: result is {result.dtype} but the torch path's result is {torch_result.dtype}")
    torch_error = max_abs_error(torch_result, reference)
    extra = allowance(reference, dtype or result.dtype)
    return Verdict(max_abs_error(result, reference), torch_error, extra, 2 * torch_error + extra)
