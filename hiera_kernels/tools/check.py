"""``python -m hiera_kernels check``: every available backend against the ``"torch"`` path.

For each backend that runs on the device, every op it implements runs at the
shapes of every block of the chosen model, forward and backward: permutations and
pooling must match the ``"torch"`` path exactly; attention is judged against the
float64 ``"torch"`` path by :mod:`hiera_kernels.error_rule`. Then the whole model
on ``"auto"``, by the same rule. Exits non-zero on any failure; this is how a GPU owner
verifies the Triton and CUDA kernels on their hardware.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, List

import torch

from .. import backends, error_rule, models, ops
from ..models.hiera import HieraBlock


@dataclass
class Case:
    op: str
    shape: str
    run: Callable[[str, torch.dtype], torch.Tensor]  # backend, dtype -> output (grad flows from input)
    make_input: Callable[[torch.dtype], torch.Tensor]


def op_cases(model: models.Hiera, batch: int, device) -> List[Case]:
    """The op calls of one forward of ``model``, at the shapes they see there."""
    block_inputs = {}
    hooks = [
        blk.register_forward_pre_hook(lambda mod, args, i=i: block_inputs.__setitem__(i, tuple(args[0].shape)))
        for i, blk in enumerate(model.blocks)
    ]
    size = [s * p for s, p in zip(model.tokens_spatial_shape, model.patch_stride)]
    with torch.no_grad():
        model(torch.zeros(1, 3, *size, device=device))
    for h in hooks:
        h.remove()

    def tensor(shape):
        return lambda dtype: torch.randn(shape, device=device, dtype=dtype)

    C0 = model.blocks[0].dim
    N0 = block_inputs[0][1]
    cases = [
        Case("unroll", f"[{batch}, {N0}, {C0}]", lambda b, t: ops.unroll(t, model.unroll.size, model.unroll.schedule, backend=b), tensor((batch, N0, C0)))
    ]
    for i in model.stage_ends:
        schedule, sz = model.reroll.schedule[i]
        n, c = block_inputs[i][1] // model.blocks[i].attn.q_stride, model.blocks[i].dim_out
        cases.append(Case("reroll", f"[{batch}, {n}, {c}] stage end {i}", lambda b, t, sz=sz, s=schedule: ops.reroll(t, sz, s, backend=b), tensor((batch, n, c))))
    seen = set()
    for i, blk in enumerate(model.blocks):
        assert isinstance(blk, HieraBlock)
        attn, n = blk.attn, block_inputs[i][1]
        if blk.dim != blk.dim_out:
            cases.append(Case("query_pool", f"[{batch}, {n}, {blk.dim_out}] block {i}", lambda b, t, s=attn.q_stride: ops.query_pool(t, s, backend=b), tensor((batch, n, blk.dim_out))))
        key = (n, attn.dim_out, attn.heads, attn.q_stride, attn.window_size, attn.use_mask_unit_attn)
        if key not in seen:
            seen.add(key)
            args = (attn.heads, attn.q_stride, attn.window_size, attn.use_mask_unit_attn)
            cases.append(Case("mask_unit_attention", f"[{batch}, {n}, {3 * attn.dim_out}] block {i}", lambda b, t, a=args: ops.mask_unit_attention(t, *a, backend=b), tensor((batch, n, 3 * attn.dim_out))))
    return cases


def forward_backward(case: Case, backend: str, x: torch.Tensor, grad_seed: int):
    x = x.detach().requires_grad_()
    out = case.run(backend, x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float32).to(out)
    (dx,) = torch.autograd.grad(out, x, g)
    return out.detach(), dx


def whole_model(model: models.Hiera, x: torch.Tensor, backend: str) -> List[torch.Tensor]:
    with torch.no_grad():
        logits, intermediates = model.set_backend(backend).train()(x, return_intermediates=True)
    return [logits] + intermediates


def check(model_name: str = "hiera_tiny_224", device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 2,
          print_fn=print) -> bool:
    if model_name not in models.CLASSIFIERS:
        raise ValueError(f"check: --model must be one of {', '.join(models.CLASSIFIERS)}, got {model_name!r}")
    device = torch.device(device)
    torch.manual_seed(0)
    model = getattr(models, model_name)().to(device).eval()
    candidates = [n for n in backends.available_backends(device) if n != "torch"]
    print_fn(f"check {model_name} on {device}, {str(dtype).replace('torch.', '')}, batch {batch}: backends {candidates or 'none besides torch'}")
    ok = True
    for case in op_cases(model, batch, device):
        x = case.make_input(dtype)
        for backend in candidates:
            reasons = backends.BACKENDS[backend].not_supported_reasons(case.op, device, dtype)
            if reasons:
                continue
            got = forward_backward(case, backend, x, 1)
            want = forward_backward(case, "torch", x, 1)
            if case.op == "mask_unit_attention":
                reference = forward_backward(case, "torch", x.double(), 1)
                verdicts = [error_rule.judge(g, w, r) for g, w, r in zip(got, want, reference)]
                passed = all(v.passed for v in verdicts)
                figures = "  ".join(f"{name} err {v.error:.2e} (<= {v.limit:.1e})" for name, v in zip(("out", "grad"), verdicts))
            else:  # permutations and pooling: bit for bit, NaN included
                errs = [error_rule.max_abs_error(g, w) for g, w in zip(got, want)]
                passed = all(e == 0 for e in errs)
                figures = f"out err {errs[0]:.2e} (== 0)  grad err {errs[1]:.2e} (== 0)"
            ok &= passed
            print_fn(f"  {'PASS' if passed else 'FAIL'} {backend:6s} {case.op:19s} {case.shape:38s} {figures}")
    # The whole model: logits (train-mode head: the eval softmax of a random head is
    # nearly uniform and would hide errors) and every stage's intermediate, on "auto",
    # by the error rule against the float64 "torch" path.
    size = [s * p for s, p in zip(model.tokens_spatial_shape, model.patch_stride)]
    x = torch.randn(batch, 3, *size, device=device)
    reference = whole_model(copy.deepcopy(model).double(), x.double(), "torch")
    want = whole_model(model.to(dtype), x.to(dtype), "torch")
    got = whole_model(model, x.to(dtype), "auto")
    for i, (r, w, g) in enumerate(zip(reference, want, got)):
        name = "logits" if i == 0 else f"stage {i} features"
        verdict = error_rule.judge(g, w, r)
        ok &= verdict.passed
        print_fn(f"  {'PASS' if verdict.passed else 'FAIL'} auto   whole model {name:17s} {verdict.describe()}")
    print_fn("all checks passed" if ok else "SOME CHECKS FAILED")
    return ok
