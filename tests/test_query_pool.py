"""query_pool: exact against the official do_pool, values and gradient routing (ties, NaN)."""

import pytest
import torch

from hiera_kernels import BackendError, library, ops

from helpers import CPU_BACKENDS, DTYPES, official_utils


def official_pool_and_grad(x, stride, grad):
    x = x.detach().requires_grad_()
    out = official_utils.do_pool(x, stride)
    (gx,) = torch.autograd.grad(out, x, grad)
    return out, gx


def check_against_official(x, stride, backend):
    x = x.detach().requires_grad_()
    out = ops.query_pool(x, stride, backend=backend)
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    expected, expected_grad = official_pool_and_grad(x, stride, grad)
    torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(gx, expected_grad, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape, stride", [((2, 3136, 96), 4), ((3, 196, 56), 4), ((1, 49, 7), 1), ((2, 30, 5), 3), ((2, 392 * 4, 8), 4)])
def test_matches_official(backend, dtype, shape, stride):
    check_against_official(torch.randn(shape).to(dtype), stride, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_and_nan_route_like_pytorch(backend, dtype):
    # Small integers make many ties (more so in half precision); NaNs anywhere.
    x = torch.randint(0, 3, (2, 64, 16)).to(dtype)
    x[0, 5, 3] = float("nan")
    x[1, 5 + 16, 3] = float("nan")
    x[1, 5 + 32, 3] = float("nan")  # two NaNs in one window: the first wins
    x[0, 9, :] = float("-inf")
    check_against_official(x, 4, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_empty(backend):
    x = torch.randn(2, 12, 64).transpose(1, 2)  # [2, 64, 12]
    check_against_official(x, 4, backend)
    for shape in [(0, 16, 4), (2, 16, 0), (1, 4, 1)]:
        assert ops.query_pool(torch.randn(shape), 4, backend=backend).shape == (shape[0], shape[1] // 4, shape[2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_gradcheck(backend):
    x = torch.randn(2, 32, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.query_pool(t, 4, backend=backend), (x,))


def test_opcheck():
    x = torch.randn(2, 48, 5, requires_grad=True)
    torch.library.opcheck(library.OPS["query_pool"], (x, 4))
    torch.library.opcheck(library.OPS["query_pool"], (x.detach().half(), 3))
    out, argmax = library.OPS["query_pool"](x.detach(), 4)
    assert argmax.dtype == torch.uint8 and argmax.shape == out.shape
    torch.library.opcheck(library.OPS["query_pool_backward"], (torch.randn_like(out), argmax, 4))


def test_kernel_refuses_stride_over_one_byte():
    x = torch.randn(1, 257 * 2, 1)
    with pytest.raises(BackendError, match="stride=257 exceeds 256"):
        ops.query_pool(x, 257, backend="cpu")
    assert ops.query_pool(x, 257).shape == (1, 2, 1)  # auto takes the torch path


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    x = torch.randn(2, 64, 8, requires_grad=True)
    f = lambda t: ops.query_pool(t * 1.5, 4, backend=backend)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x), atol=0, rtol=0)
    (g1,) = torch.autograd.grad(compiled(x).sum(), x)
    (g2,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(g1, g2, atol=0, rtol=0)
