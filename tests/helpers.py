"""Shared test helpers: the official package, backends to test, model configs."""

import math
import os
import warnings

import torch

import hiera_kernels as hk

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # timm.models.layers deprecation, inside hiera
    import hiera as official  # noqa: F401
    from hiera import hiera_utils as official_utils  # noqa: F401

# Backends that run here, on CPU tensors. "cpu" must be built: CI builds it, and a
# missing extension should fail the suite rather than silently test less.
CPU_BACKENDS = ["torch", "cpu"]
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


def without_interpreter():
    """The environment for a subprocess that sees hiera_kernels as a user does (the test
    session runs the Triton kernels in the interpreter: see conftest.py)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env
