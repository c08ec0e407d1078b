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


def without_interpreter():
    """The environment for a subprocess that sees hiera_kernels as a user does (the test
    session runs the Triton kernels in the interpreter: see conftest.py)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env
