"""Shared test helpers: the official package, backends to test, model configs."""

import math
import os
import warnings

import pytest
import torch

import hiera_kernels as hk

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # timm.models.layers deprecation, inside hiera
    import hiera as official  # noqa: F401
    from hiera import hiera_utils as official_utils  # noqa: F401

# Backends that run here, on CPU tensors. "cpu" must be built: CI builds it, and a
# missing extension should fail the suite rather than silently test less.
CPU_BACKENDS = ["torch", "cpu"]
# GPU tests run wherever a GPU is; elsewhere they are skipped, and say so.
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to run the kernels")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (input_size, patch_stride, q_stride, stages, q_pool): every geometry the official
# factories produce, plus odd grids.
GEOMETRIES = {
    "image": ((224, 224), (4, 4), (2, 2), (2, 3, 16, 3), 3),
    "mae_image": ((224, 224), (4, 4), (2, 2), (1, 2, 7, 2), 2),
    "video": ((16, 224, 224), (2, 4, 4), (1, 2, 2), (2, 3, 16, 3), 3),
    "mae_video": ((16, 224, 224), (2, 4, 4), (1, 2, 2), (2, 3, 16, 3), 2),
    "non_square": ((96, 160), (4, 4), (2, 2), (1, 1, 1, 1), 3),
    "odd_strides": ((72, 48), (1, 1), (3, 2), (1, 1, 1), 2),
}


def stage_geometries(name):
    """(size, schedule) for every block of geometry ``name``, as the official Reroll has them."""
    input_size, patch_stride, q_stride, stages, q_pool = GEOMETRIES[name]
    stage_ends = [sum(stages[:i]) - 1 for i in range(1, len(stages) + 1)]
    reroll = official_utils.Reroll(input_size, patch_stride, [q_stride] * (len(stages) - 1), stage_ends, q_pool)
    seen, out = set(), []
    for block in range(stage_ends[-1] + 1):
        schedule, size = reroll.schedule[block]
        key = (tuple(size), tuple(map(tuple, schedule)))
        if key not in seen:
            seen.add(key)
            out.append((block, list(size), [tuple(s) for s in schedule], reroll))
    return out


def token_grid(name):
    input_size, patch_stride, q_stride, stages, _ = GEOMETRIES[name]
    size = [i // s for i, s in zip(input_size, patch_stride)]
    return size, [q_stride] * (len(stages) - 1)


def mu_size(schedule, dims):
    return math.prod(hk.reference.mask_unit_shape(schedule, dims))


def random_geometry(seed):
    """A random unroll problem seeded by ``seed``: dims 1-3, a schedule of 0-4 steps with
    strides 1-3, a grid of 1-3 mask units per dim, batch 1-3 and 1-9 channels.
    Returns (x, size, schedule) with x [B, prod(size), C] float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    dims, steps = rand(1, 3), rand(0, 4)
    schedule = [tuple(rand(1, 3) for _ in range(dims)) for _ in range(steps)]
    size = [u * rand(1, 3) for u in hk.reference.mask_unit_shape(schedule, dims)]
    x = torch.randn(rand(1, 3), math.prod(size), rand(1, 9), generator=g)
    return x, size, schedule


def kernel_for(key, op, *args):
    """Call kernel op ``op``'s kernel for dispatch ``key`` ("CPU", "CUDA") whatever the
    tensors' devices. Without a GPU this reaches the CUDA entry points with CPU tensors:
    their host-side checks run, and the device check stops them before anything touches
    the tensors' memory."""
    from hiera_kernels import library

    return library.OPS[op].redispatch(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key)), *args)


def assert_fake_refuses(fn, args, message):
    """``fn(*args)`` traced (FakeTensorMode, as torch.compile and opcheck run an op's fake,
    the tensors made fake) raises ValueError matching ``message``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=message):
            fn(*fake_args)


def without_interpreter():
    """The environment for a subprocess that sees hiera_kernels as a user does (the test
    session runs the Triton kernels in the interpreter: see conftest.py)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


# ------------------------------------------------------------ non-finite isolation
# One inf, -inf or NaN in q, k or v of window 0 must stay in window 0: every other
# window's output and qkv gradient is finite and equal to the "torch" path's (which
# folds windows into SDPA's batch, so they never meet). Shared by the "cpu", "triton"
# and "cuda" tests. (dim_out, heads, q_stride, window_size, use_mask_unit_attn, N):
NONFINITE_BLOCKS = {
    "packed_16": (16, 1, 1, 16, True, 4 * 16),  # four 16-token windows packed in one tile
    "packed_pool_4": (16, 1, 4, 4, True, 4 * 16),  # four windows of 4 pooled queries over 16 keys
    "window_64": (2 * 16, 2, 1, 64, True, 2 * 64),  # one 64-token window per tile
    "global": (16, 1, 1, 0, False, 130),  # one window over several key blocks: parity incl. NaN positions
}
NONFINITE_PARTS = {"q": 0, "k": 1, "v": 2}
NONFINITE_VALUES = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
# Kernels vs the "torch" path in the same dtype, on the finite windows.
NONFINITE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def nonfinite_case(block, part, value, dtype, device="cpu"):
    """(qkv, grad, args, windows): qkv [1, N, 3 * dim_out] and grad [1, N // q_stride, dim_out]
    in ``dtype`` on ``device``, with ``value`` at position 1 of window 0, head 0, channel 3
    of ``part`` ("q", "k" or "v"). Token n = t * windows + w is position t of window w."""
    dim_out, heads, q_stride, window_size, use_mu, N = NONFINITE_BLOCKS[block]
    windows = N // (q_stride * window_size) if use_mu else 1
    qkv = torch.randn(1, N, 3 * dim_out)
    qkv[0, 1 * windows + 0, NONFINITE_PARTS[part] * dim_out + 3] = NONFINITE_VALUES[value]
    grad = torch.randn(1, N // q_stride, dim_out)
    return qkv.to(device, dtype), grad.to(device, dtype), (heads, q_stride, window_size, use_mu), windows


def assert_nonfinite_stays_in_its_window(backend, block, part, value, dtype, device="cpu"):
    """The kernel's output and dqkv equal the "torch" path's on every window but window 0,
    and are finite there. With one window (global attention) the non-finite positions
    must be the float64 "torch" path's (plain math: the fp16/bf16 CPU SDPA kernel turns
    a row whose top score is inf into zeros, and its gradient's NaN pattern follows),
    and the finite values the same-dtype "torch" path's."""
    qkv, grad, args, windows = nonfinite_case(block, part, value, dtype, device)
    results = {}
    for name, x, g in (("torch", qkv, grad), (backend, qkv, grad), ("float64", qkv.double(), grad.double())):
        x = x.detach().requires_grad_()
        out = hk.ops.mask_unit_attention(x, *args, backend="torch" if name == "float64" else name)
        results[name] = (out.detach(), *torch.autograd.grad(out, x, g))
    tol = NONFINITE_TOLERANCE[dtype]
    where = f"{backend}, {block}, {part}={value} in window 0, {dtype}"
    for what, ours, theirs, exact in zip(["out", "dqkv"], results[backend], results["torch"], results["float64"]):
        if windows == 1:
            finite = torch.isfinite(exact)
            mismatched = int((torch.isfinite(ours) != finite).sum())
            assert not mismatched, f"{what}: {mismatched} elements finite in one of {backend} and float64 torch only ({where})"
        else:
            finite = (torch.arange(ours.shape[1], device=ours.device) % windows != 0)[None, :, None].expand_as(ours)
            spilled = int((~torch.isfinite(ours[finite])).sum())
            assert not spilled, f"{what}: {spilled} elements of windows 1.. are not finite ({where})"
        torch.testing.assert_close(ours[finite], theirs[finite], atol=tol, rtol=tol,
                                   msg=lambda m: f"{what} where finite, {backend} vs torch ({where}): {m}")


# ------------------------------------------------------------ patched-model comparisons
def tensors(out):
    """The floating tensors of a model's output, flattened (ModelOutputs, tuples, lists)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    return []


def run(model, x, fn, backward=True):
    """Outputs and gradients (input, then every parameter by name) of one forward +
    backward with a fixed cotangent per output."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    outs = [o for o in tensors(fn(model, x)) if o.requires_grad]
    if not backward:
        return [o.detach() for o in outs], {}
    g = torch.Generator().manual_seed(2)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, cotangents)
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return [o.detach() for o in outs], grads


def check_patch_conv_runs_channels_last(model, x):
    """A patched model's ``patch_embed`` runs its own forward on a channels-last image (on
    CPU, kernel backends): its output comes out contiguous; unpatched and on "torch" it
    stays the transposed NCHW conv output; unpatch unbinds it."""
    assert not model.patch_embed(x).is_contiguous()
    hk.patch(model, backend="torch")
    assert not model.patch_embed(x).is_contiguous()
    hk.unpatch(model)
    hk.patch(model)
    assert model.patch_embed(x).is_contiguous()
    hk.unpatch(model)
    assert "forward" not in vars(model.patch_embed)
