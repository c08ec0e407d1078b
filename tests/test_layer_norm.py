"""LayerNorm on the C++ CPU kernels (hiera_kernels.layer_norm, its backward
hiera_kernels::layer_norm_backward): against F.layer_norm by the shared rule (float64
reference), forward and backward; ATen's contract (mean and rstd, the backward's output
mask); non-finite rows stay in their row; the column sums' bits do not depend on the
thread count; empty, non-contiguous, opcheck, compile, clear errors; where the models
run it."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hiera_kernels as hk
from hiera_kernels import error_rule
from hiera_kernels import layer_norm as ln
from hiera_kernels.backends import EXTENSION

from helpers import assert_fake_refuses

pytestmark = pytest.mark.skipif(not EXTENSION.loaded, reason="the C++ extension is not built")

op = torch.ops.hiera_kernels.layer_norm.default
backward_op = torch.ops.hiera_kernels.layer_norm_backward.default
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def case(rows, C, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, C, generator=g) * 3 + 5  # an offset: the variance must not cancel
    w = torch.randn(C, generator=g) if affine else None
    b = torch.randn(C, generator=g) if affine else None
    return x, w, b


def cast(t, dtype):
    return None if t is None else t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, C", [(13, 96), (8, 7), (3, 1), (17, 100), (9, 768), (5, 1030)])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_and_backward_pass_the_rule(dtype, rows, C, affine):
    """Rows not a multiple of the 8-row block; channels with vector tails (7, 100, 1030)."""
    x, w, b = case(rows, C, affine)
    g = torch.randn(rows, C)

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in (x, w, b) if t is not None]
        xi, wi, bi = leaves if affine else (leaves[0], None, None)
        y = fn(xi, wi, bi)
        return [y.detach(), *torch.autograd.grad(y, leaves, g.to(dt))]

    kernel = lambda x, w, b: op(x, w, b, 1e-6)[0]  # noqa: E731
    plain = lambda x, w, b: F.layer_norm(x, (C,), w, b, 1e-6)  # noqa: E731
    reference, torch_path, ours = run(plain, torch.float64), run(plain, dtype), run(kernel, dtype)
    for what, r, t, o in zip(["y", "dx", "dweight", "dbias"], reference, torch_path, ours):
        verdict = error_rule.judge(o, t, r)
        assert verdict.passed, f"{what}: {verdict.describe()}"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_atens_contract_mean_and_rstd(dtype):
    x, w, b = case(2 * 11, 40)
    x = x.view(2, 11, 40).to(dtype)
    y, mean, rstd = op(x, w.to(dtype), b.to(dtype), 1e-5)
    _, want_mean, want_rstd = torch.ops.aten.native_layer_norm(x, [40], w.to(dtype), b.to(dtype), 1e-5)
    assert mean.shape == want_mean.shape == (2, 11, 1) and mean.dtype == want_mean.dtype == dtype
    assert y.dtype == dtype and y.shape == x.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(mean, want_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(rstd, want_rstd, atol=tol, rtol=tol)


def test_non_finite_values_stay_in_their_row():
    x, w, b = case(20, 96)
    x[3, 5], x[11, 0], x[12, 95] = float("nan"), float("inf"), float("-inf")
    y = op(x, w, b, 1e-6)[0]
    want = F.layer_norm(x, (96,), w, b, 1e-6)
    bad = [3, 11, 12]
    assert y[bad].isnan().all() and want[bad].isnan().all()  # as PyTorch: the row is NaN
    good = [r for r in range(20) if r not in bad]
    assert y[good].isfinite().all()
    torch.testing.assert_close(y[good], want[good], atol=1e-5, rtol=1e-5)


def test_empty_non_contiguous_and_constant_rows():
    assert op(torch.empty(0, 96), None, None, 1e-6)[0].shape == (0, 96)
    y, mean, rstd = op(torch.empty(4, 0), None, None, 1e-6)
    want = torch.ops.aten.native_layer_norm(torch.empty(4, 0), [0], None, None, 1e-6)
    assert y.shape == (4, 0) and torch.equal(mean, want[1]) and rstd.isnan().all() and want[2].isnan().all()
    x, w, b = case(16, 96)
    strided = x.t().contiguous().t()  # same values, column-major
    torch.testing.assert_close(op(strided, w, b, 1e-6)[0], op(x, w, b, 1e-6)[0], atol=0, rtol=0)
    constant = torch.full((9, 96), 3.0)
    y = op(constant, w, b, 1e-6)[0]  # variance 0: y is the bias, as in ATen
    torch.testing.assert_close(y, F.layer_norm(constant, (96,), w, b, 1e-6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_gradcheck_and_compile(affine):
    x, w, b = case(5, 12, affine)
    args = (x.requires_grad_(), w, b, 1e-5)
    torch.library.opcheck(op, args)
    dargs = tuple(t.double().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
    assert torch.autograd.gradcheck(lambda *a: op(*a)[0], dargs)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a)[0].square().sum(), fullgraph=True)
    torch.testing.assert_close(compiled(*args), op(*args)[0].square().sum())


@pytest.mark.parametrize("dtype", DTYPES)  # float64: gradcheck (test_opcheck_gradcheck_and_compile)
@pytest.mark.parametrize("rows", [37, 400])  # a partial row block; 400 x 100: three chunks of column sums
def test_backward_is_atens_contract(dtype, rows):
    """The backward op on the forward's mean and rstd: each output where output_mask says,
    an empty [0] tensor elsewhere; the values by the shared rule against ATen's
    native_layer_norm_backward (the "torch" path) and float64; 3-D x."""
    x, w, b = case(rows, 100)
    x, w, b = x.view(1, rows, 100).to(dtype), w.to(dtype), b.to(dtype)
    dy = torch.randn(x.shape).to(dtype)
    _, mean, rstd = op(x, w, b, 1e-6)
    reference = torch.ops.aten.native_layer_norm_backward(
        dy.double(), x.double(), [100], mean.double(), rstd.double(), w.double(), b.double(), [True] * 3)
    aten = torch.ops.aten.native_layer_norm_backward(dy, x, [100], mean, rstd, w, b, [True] * 3)
    ours = backward_op(dy, x, mean, rstd, w, [True] * 3)
    assert ours[3].shape == ours[4].shape == (0,)  # no eps, no grad_skip
    for what, o, t, r in zip(["dx", "dweight", "dbias"], ours, aten, reference):
        assert o.dtype == dtype and o.shape == t.shape
        verdict = error_rule.judge(o, t, r)
        assert verdict.passed, f"{what}: {verdict.describe()}"
    for mask in ([True, False, False], [False, True, True], [False, False, True], [False] * 3):
        got = backward_op(dy, x, mean, rstd, w, mask)
        for wanted, g, full in zip(mask, got[:3], ours):
            assert torch.equal(g, full) if wanted else g.shape == (0,)
    # No weight: g = grad_y.
    mask = [True, False, True]
    no_weight = backward_op(dy, x, mean, rstd, None, mask)
    aten = torch.ops.aten.native_layer_norm_backward(dy, x, [100], mean, rstd, None, b, mask)
    reference = torch.ops.aten.native_layer_norm_backward(
        dy.double(), x.double(), [100], mean.double(), rstd.double(), None, b.double(), mask)
    for what in (0, 2):
        verdict = error_rule.judge(no_weight[what], aten[what], reference[what])
        assert verdict.passed, f"no weight, output {what}: {verdict.describe()}"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rows, C", [(37, 100), (400, 100), (170, 96), (9, 7)])  # partial blocks, chunks, tails
@pytest.mark.parametrize("affine", [True, False])
def test_backward_recomputes_the_forwards_y(dtype, rows, C, affine):
    """With eps, the backward's y is the forward kernel's output, bit for bit (the
    recompute ops' weight gradients read it), and the gradients are those without it."""
    x, w, b = (cast(t, dtype) for t in case(rows, C, affine))
    y, mean, rstd = op(x, w, b, 1e-5)
    dy = torch.randn(x.shape).to(dtype)
    plain = backward_op(dy, x, mean, rstd, w, [True] * 3)
    fused = backward_op(dy, x, mean, rstd, w, [True] * 3, b, 1e-5)
    assert torch.equal(fused[3], y)
    for p, f in zip(plain[:3], fused[:3]):
        assert torch.equal(p, f)
    assert torch.equal(backward_op(dy, x, mean, rstd, w, [False] * 3, b, 1e-5)[3], y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, C", [(37, 100), (400, 96), (9, 7)])
@pytest.mark.parametrize("affine", [True, False])
def test_backward_adds_the_skip_gradient(dtype, rows, C, affine):
    """grad_skip joins grad_x before its one rounding, and its column sums are the bias
    gradient of the Linear that adds the skip: both by the shared rule against the torch
    path (ATen's backward, then + grad_skip; grad_skip.sum(0)) and float64; the other
    outputs unchanged."""
    x, w, b = (cast(t, dtype) for t in case(rows, C, affine))
    _, mean, rstd = op(x, w, b, 1e-6)
    dy, skip = torch.randn(x.shape).to(dtype), (torch.randn(x.shape) * 4).to(dtype)

    def torch_path(*t):
        dy_, x_, mean_, rstd_, w_, b_, skip_ = t
        grads = torch.ops.aten.native_layer_norm_backward(dy_, x_, [C], mean_, rstd_, w_, b_, [True, affine, affine])
        return grads[0] + skip_, skip_.sum(0)

    reference = torch_path(*(cast(t, torch.float64) for t in (dy, x, mean, rstd, w, b, skip)))
    plain = torch_path(dy, x, mean, rstd, w, b, skip)
    ours = backward_op(dy, x, mean, rstd, w, [True] * 3, None, None, skip)
    for what, o, t, r in zip(["dx", "skip sums"], (ours[0], ours[4]), plain, reference):
        assert o.dtype == dtype and o.shape == t.shape
        verdict = error_rule.judge(o, t, r)
        assert verdict.passed, f"{what}: {verdict.describe()}"
    without = backward_op(dy, x, mean, rstd, w, [True] * 3)
    assert torch.equal(ours[1], without[1]) and torch.equal(ours[2], without[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_atens_fallback_keeps_the_fused_contract(dtype, monkeypatch):
    """Where the kernel does not take the tensors (no extension, another device, mixed
    dtypes), native_layer_norm_backward runs ATen's ops with the same outputs: the
    gradients, the forward's y, grad_x with the skip gradient and its column sums, None
    for what is not asked; by the rule against float64, like the kernel's."""
    x, w, b = (cast(t, dtype) for t in case(300, 96))
    _, mean, rstd = op(x, w, b, 1e-6)
    dy, skip = torch.randn(x.shape).to(dtype), torch.randn(x.shape).to(dtype)
    args = (dy, x, mean, rstd, w, b, [True] * 3)
    kernel = ln.native_layer_norm_backward(*args, eps=1e-6, grad_skip=skip)
    reference = ln.native_layer_norm_backward(*(cast(t, torch.float64) if isinstance(t, torch.Tensor) else t for t in args),
                                              eps=1e-6, grad_skip=skip.double())
    monkeypatch.setattr(ln, "cpu_kernel_takes", lambda *tensors: False)
    fallback = ln.native_layer_norm_backward(*args, eps=1e-6, grad_skip=skip)
    for what, f, k, r in zip(["dx", "dweight", "dbias", "y", "skip sums"], fallback, kernel, reference):
        assert f.dtype == k.dtype == dtype and f.shape == k.shape
        verdict = error_rule.judge(f, k, r)
        assert verdict.passed, f"{what}: {verdict.describe()}"
    assert ln.native_layer_norm_backward(dy, x, mean, rstd, w, b, [False, True, False])[3:] == (None, None)


def test_backward_column_sums_do_not_depend_on_threads():
    """grad_weight, grad_bias and grad_skip's sums add fixed row chunks in a fixed order:
    the same bits on one thread as on several (5000 rows of 96: many chunks)."""
    x, w, b = case(5000, 96)
    dy = torch.randn(x.shape)
    _, mean, rstd = op(x, w, b, 1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backward_op(dy, x, mean, rstd, w, [True] * 3, None, None, dy)
        torch.set_num_threads(max(2, threads))
        several = backward_op(dy, x, mean, rstd, w, [True] * 3, None, None, dy)
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(one, several):
        assert torch.equal(a, b_)


def test_backward_non_finite_values_stay_in_their_row():
    x, w, b = case(20, 96)
    x[3, 5], x[12, 95] = float("nan"), float("inf")
    _, mean, rstd = op(x, w, b, 1e-6)
    dy = torch.randn(x.shape)
    skip = torch.randn(x.shape)
    dx, dw, db, y, skip_sum = backward_op(dy, x, mean, rstd, w, [True] * 3, b, 1e-6, skip)
    good = [r for r in range(20) if r not in (3, 12)]
    assert dx[[3, 12]].isnan().all() and dx[good].isfinite().all()
    assert db.isfinite().all() and dw.isnan().all()  # as ATen: every column's sum meets a NaN row
    assert y[[3, 12]].isnan().all() and y[good].isfinite().all() and skip_sum.isfinite().all()


def test_backward_empty_non_contiguous_opcheck_and_compile():
    x, w, b = case(6, 12)
    dy = torch.randn(x.shape)
    _, mean, rstd = op(x, w, b, 1e-6)
    dx, dw, db, y, skip_sum = backward_op(dy[:0], x[:0], mean[:0], rstd[:0], w, [True] * 3, b, 1e-6, dy[:0])
    assert dx.shape == y.shape == (0, 12) and torch.equal(dw, torch.zeros(12)) and torch.equal(db, torch.zeros(12))
    assert torch.equal(skip_sum, torch.zeros(12))
    no_channels = torch.empty(3, 0, requires_grad=True)  # rows but no channels: empty gradients, as ATen
    op(no_channels, None, None, 1e-6)[0].sum().backward()
    assert no_channels.grad.shape == (3, 0)
    column_major = lambda t: t.t().contiguous().t()  # noqa: E731  same values
    strided = backward_op(column_major(dy), column_major(x), mean, rstd, w, [True] * 3, b, 1e-6, column_major(dy))
    for s_, c in zip(strided, backward_op(dy, x, mean, rstd, w, [True] * 3, b, 1e-6, dy)):
        assert torch.equal(s_, c)
    torch.library.opcheck(backward_op, (dy, x, mean, rstd, w, [True, True, False]))
    torch.library.opcheck(backward_op, (dy, x, mean, rstd, w, [True, False, True], b, 1e-6, dy))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: backward_op(*a)[0].sum(), fullgraph=True)
    torch.testing.assert_close(compiled(dy, x, mean, rstd, w, [True] * 3), backward_op(dy, x, mean, rstd, w, [True] * 3)[0].sum())


def _error_cases():
    """(op, args, message) for bad calls of the two ops."""
    x, w, b = case(4, 8)
    _, mean, rstd = op(x, w, b, 1e-6)
    return [
        (op, (x, torch.ones(9), None, 1e-6), r"hiera_kernels::layer_norm: weight must have shape \[8\], got \[9\]"),
        (op, (x, None, b.bfloat16(), 1e-6), r"hiera_kernels::layer_norm: bias must be float32 \(like x\), got bfloat16"),
        (op, (x, w, b, -1.0), r"hiera_kernels::layer_norm: eps must be finite and >= 0, got -1"),
        (op, (torch.ones(2, 8, dtype=torch.long), None, None, 1e-6), r"hiera_kernels::layer_norm: x has dtype int64"),
        (op, (torch.tensor(1.0), None, None, 1e-6), r"hiera_kernels::layer_norm: x must have at least one dim"),
        (backward_op, (torch.ones(4, 9), x, mean, rstd, w, [True] * 3),
         r"hiera_kernels::layer_norm_backward: grad_y must have shape \[4, 8\], got \[4, 9\]"),
        (backward_op, (x, x, mean, rstd[:3], w, [True] * 3),
         r"hiera_kernels::layer_norm_backward: rstd must have one value per row of x \(4\), got 3"),
        (backward_op, (x, x, mean.double(), rstd, w, [True] * 3),
         r"hiera_kernels::layer_norm_backward: mean must be float32 \(like x: the forward's\), got float64"),
        (backward_op, (x, x, mean, rstd, torch.ones(7), [True] * 3),
         r"hiera_kernels::layer_norm_backward: weight must have shape \[8\], got \[7\]"),
        (backward_op, (x, x, mean, rstd, w, [True] * 3, b),
         r"hiera_kernels::layer_norm_backward: bias is read only to recompute y, which needs the forward's eps"),
        (backward_op, (x, x, mean, rstd, w, [True] * 3, b, -1.0),
         r"hiera_kernels::layer_norm_backward: eps must be finite and >= 0, got -1"),
        (backward_op, (x, x, mean, rstd, w, [True] * 3, b[:7], 1e-6),
         r"hiera_kernels::layer_norm_backward: bias must have shape \[8\], got \[7\]"),
        (backward_op, (x, x, mean, rstd, w, [False, True, True], None, None, x),
         r"hiera_kernels::layer_norm_backward: grad_skip is added to grad_x, which output_mask\[0\] does not ask for"),
        (backward_op, (x, x, mean, rstd, w, [True] * 3, None, None, x[:, :7]),
         r"hiera_kernels::layer_norm_backward: grad_skip must have shape \[4, 8\], got \[4, 7\]"),
        (backward_op, (x, x, mean, rstd, w, [True] * 3, None, None, x.double()),
         r"hiera_kernels::layer_norm_backward: grad_skip must be float32 \(like x\), got float64"),
    ]


def test_clear_errors():
    """Each bad call raises the C++ check's message eagerly and, traced (FakeTensorMode:
    torch.compile, opcheck), the fake's: the same message."""
    for fn, args, message in _error_cases():
        with pytest.raises(RuntimeError, match=message):
            fn(*args)
        assert_fake_refuses(fn, args, message)


def test_where_the_models_run_it():
    norm, x = nn.LayerNorm(96), torch.randn(2, 5, 96)
    assert ln.runs_kernel(norm, x, "cpu") and ln.runs_kernel(norm, x, "auto")
    assert not ln.runs_kernel(norm, x, "torch")  # the oracle keeps the module
    assert not ln.runs_kernel(norm, x.bfloat16(), "cpu")  # weight and x differ in dtype: the module's rule
    assert not ln.runs_kernel(nn.GroupNorm(1, 96), x, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ln.runs_kernel(norm, x, "cpu")
    hooked = nn.LayerNorm(96)
    hooked.register_forward_hook(lambda *a: None)
    assert not ln.runs_kernel(hooked, x, "cpu")
    # The drop-in model in inference on "cpu" calls it (two per block).
    model = hk.hiera_tiny_224(input_size=(64, 64), num_classes=10, backend="cpu").eval()
    from torch.profiler import profile
    with torch.inference_mode(), profile() as prof:
        model(torch.randn(1, 3, 64, 64))
    calls = sum(e.count for e in prof.key_averages() if e.key == "hiera_kernels::layer_norm")
    assert calls == 2 * len(model.blocks)
