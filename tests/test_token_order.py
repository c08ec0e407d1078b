"""unroll / reroll: exact (atol=0) against the official Unroll/Reroll on every backend."""

import pytest
import torch

import hiera_kernels as hk
from hiera_kernels import library, ops

from helpers import (
    CPU_BACKENDS,
    DTYPES,
    GEOMETRIES,
    mu_size,
    official_utils,
    random_geometry,
    requires_gpu,
    stage_geometries,
    token_grid,
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_unroll_matches_official(geometry, backend):
    input_size, patch_stride, q_stride, stages, _ = GEOMETRIES[geometry]
    size, schedule = token_grid(geometry)
    x = torch.randn(2, torch.Size(size).numel(), 5)
    expected = official_utils.Unroll(input_size, patch_stride, schedule)(x)
    torch.testing.assert_close(ops.unroll(x, size, schedule, backend=backend), expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_reroll_matches_official_every_stage(geometry, backend):
    for block, size, schedule, official_reroll in stage_geometries(geometry):
        x = torch.randn(2, torch.Size(size).numel(), 3)
        expected = official_reroll(x, block)
        torch.testing.assert_close(ops.reroll(x, size, schedule, backend=backend), expected, atol=0, rtol=0)
        # With a keep-mask, x holds K whole kept units; the official code ignores the
        # mask's values and returns [B, K, *mu_shape, C].
        units = torch.Size(size).numel() // mu_size(schedule, len(size))
        kept = max(1, units // 3)
        xm = torch.randn(2, kept * mu_size(schedule, len(size)), 3)
        mask = torch.zeros(2, units, dtype=torch.bool)
        mask[:, :kept] = True
        expected = official_reroll(xm, block, mask=mask)
        torch.testing.assert_close(ops.reroll(xm, size, schedule, mask, backend=backend), expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_round_trip_is_identity(backend, dtype):
    size, schedule = token_grid("video")
    size = [4, 16, 24]  # smaller grid, same schedule
    x = torch.randn(3, 4 * 16 * 24, 7).to(dtype)
    u = ops.unroll(x, size, schedule, backend=backend)
    assert not torch.equal(u, x)
    torch.testing.assert_close(ops.reroll(u, size, schedule, backend=backend).flatten(1, 3), x, atol=0, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_empty_and_single(backend):
    size, schedule = [16, 16], [(2, 2), (2, 2)]
    base = torch.randn(2, 9, 256).transpose(1, 2)  # [2, 256, 9], channels not contiguous
    torch.testing.assert_close(
        ops.unroll(base, size, schedule, backend=backend), hk.reference.unroll(base.contiguous(), size, schedule), atol=0, rtol=0
    )
    for batch, channels in [(0, 4), (1, 1), (2, 0)]:
        x = torch.randn(batch, 256, channels)
        assert ops.unroll(x, size, schedule, backend=backend).shape == x.shape
        assert ops.reroll(x, size, schedule, backend=backend).shape == (batch, 16, 16, channels)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_are_the_inverse_permutation(backend):
    size, schedule = [24, 16], [(2, 2), (2, 2), (2, 2)]
    x = torch.randn(2, 24 * 16, 4, requires_grad=True)
    grad = torch.randn(2, 24 * 16, 4)
    (gx,) = torch.autograd.grad(ops.unroll(x, size, schedule, backend=backend), x, grad)
    torch.testing.assert_close(gx, hk.reference.reroll(grad, size, schedule).flatten(1, 2), atol=0, rtol=0)
    mask = torch.ones(2, 6, dtype=torch.bool)
    y = torch.randn(2, 6 * 64, 4, requires_grad=True)
    out = ops.reroll(y, size, schedule, mask, backend=backend)
    g = torch.randn_like(out)
    (gy,) = torch.autograd.grad(out, y, g)
    (gy_ref,) = torch.autograd.grad(hk.reference.reroll(y, size, schedule, windowed=True), y, g)
    torch.testing.assert_close(gy, gy_ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_gradcheck(backend):
    size, schedule = [4, 8], [(2, 2)]
    x = torch.randn(2, 32, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.unroll(t, size, schedule, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.reroll(t, size, schedule, backend=backend), (x,))
    mask = torch.ones(2, 8, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda t: ops.reroll(t, size, schedule, mask, backend=backend), (x,))


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("op", ["unroll", "reroll"])
def test_opcheck(op, windowed):
    x = torch.randn(2, 8 * 12, 5, requires_grad=True)
    torch.library.opcheck(library.OPS[op], (x, [8, 12], [2, 2, 2, 3], windowed))
    torch.library.opcheck(library.OPS[op], (x.detach(), [8, 12], [2, 2, 2, 3], windowed))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    size, schedule = [16, 16], [(2, 2), (2, 2)]

    def f(x):
        return ops.reroll(ops.unroll(x, size, schedule, backend=backend) * 2, size, schedule, backend=backend)

    x = torch.randn(2, 256, 4, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x), atol=0, rtol=0)
    compiled(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0), atol=0, rtol=0)


@pytest.mark.parametrize("seed", range(16))
def test_random_sweep_cpu_matches_torch_exactly(seed):
    """Random dims (1-3), schedules (0-4 steps, strides 1-3), grids, batch and channels,
    seeded by the iteration: the C++ kernels against the torch path, both directions,
    both orders, bit for bit."""
    x, size, schedule = random_geometry(seed)
    unit = hk.reference.mask_unit_shape(schedule, len(size))
    for backend_op in ["unroll", "reroll"]:
        got = getattr(ops, backend_op)(x, size, schedule, backend="cpu")
        want = getattr(ops, backend_op)(x, size, schedule, backend="torch")
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    units = torch.Size(size).numel() // torch.Size(unit).numel()
    mask = torch.ones(x.shape[0], units, dtype=torch.bool)
    torch.testing.assert_close(
        ops.reroll(x, size, schedule, mask, backend="cpu"), ops.reroll(x, size, schedule, mask, backend="torch"), atol=0, rtol=0
    )


@pytest.mark.extended
@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=requires_gpu)])
def test_more_than_2_31_elements(backend):
    """int64 offsets: a bfloat16 [1, 2^24, 130] tensor has 2.18e9 elements (4.4 GB; the
    test peaks near 20 GB on the CPU). Every bit pattern of int16 occurs, NaNs included."""
    size, schedule = [4096, 4096], [(2, 2)] * 3
    x = torch.empty(1, 4096 * 4096, 130, dtype=torch.bfloat16, device=backend)
    x.view(torch.int16).copy_(torch.arange(4096 * 4096, dtype=torch.int16, device=backend).view(1, -1, 1).expand_as(x))
    assert x.numel() > 2**31
    got = ops.unroll(x, size, schedule, backend=backend)
    torch.testing.assert_close(got, ops.unroll(x, size, schedule, backend="torch"), atol=0, rtol=0, equal_nan=True)
    del got
    pooled = ops.query_pool(x, 4, backend=backend)
    torch.testing.assert_close(pooled, ops.query_pool(x, 4, backend="torch"), atol=0, rtol=0, equal_nan=True)
