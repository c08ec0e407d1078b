"""SAM 2's window attention (ops.window_attention) on every backend with a kernel for it,
against the "torch" path, which is SAM 2's own sequence of ops (tests/test_sam2.py ties
that to the sam2 package): padding to whole windows with the qkv bias, the s x s query
max-pool, the crop, global attention. Shapes are small: the Triton backend runs here in
its interpreter when no GPU is present."""

import math

import pytest
import torch

from hiera_kernels import error_rule, library, ops
from hiera_kernels.backends import BACKENDS, TRITON_KERNELS

from helpers import DTYPES

# (batch, H, W, heads, head_dim, window_size, q_stride)
CASES = {
    "windows_divide": (2, 8, 8, 2, 8, 4, 1),
    "windows_padded": (2, 7, 9, 2, 8, 4, 1),
    "pool_windows_divide": (1, 8, 8, 2, 8, 4, 2),
    "pool_windows_padded_and_cropped": (2, 7, 10, 1, 16, 4, 2),
    "global": (1, 5, 6, 2, 8, 0, 1),
    "global_pool_odd_map": (2, 7, 9, 2, 8, 0, 2),
    "hd96_pool_padded": (1, 9, 6, 1, 96, 6, 2),
    "hd56_padded": (1, 5, 7, 2, 56, 4, 1),
    "hd72_pool_global": (1, 6, 5, 1, 72, 0, 2),
    # Longer than one 64-key block: a loop over key blocks (and the Triton dq kernel).
    "window14_pool_padded_and_cropped": (1, 14, 15, 1, 8, 14, 2),
    "global_over_key_blocks": (1, 9, 11, 2, 8, 0, 1),
}


def backend_device(name):
    """The device a backend's window_attention kernel runs on here, or a reason to skip."""
    if "window_attention" not in BACKENDS[name].OPS:
        pytest.skip(f"the {name!r} backend has no window_attention kernel")
    if name == "cpu":
        device = "cpu"
    elif name == "triton":
        device = "cpu" if TRITON_KERNELS is not None and TRITON_KERNELS.INTERPRETED else "cuda"
    else:
        device = "cuda"
    reasons = BACKENDS[name].not_supported_reasons("window_attention", torch.device(device), torch.float32)
    if device == "cuda" and not torch.cuda.is_available():
        reasons.append("no GPU here")
    if reasons:
        pytest.skip("; ".join(reasons))
    return device


KERNEL_BACKENDS = ["cpu", "triton", "cuda"]


def make_case(case, dtype=torch.float32, device="cpu", seed=0):
    batch, H, W, heads, hd, window_size, q_stride = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, H, W, 3 * heads * hd, generator=gen)
    pad = torch.randn(3 * heads * hd, generator=gen)  # a qkv bias: padded keys read it
    C = heads * hd
    grad = torch.randn(batch, H // q_stride, W // q_stride, C, generator=gen)
    return (qkv.to(device, dtype), pad.to(device, dtype), grad.to(device, dtype)), (heads, window_size, q_stride)


def forward_backward(qkv, pad, grad, args, backend):
    qkv, pad = qkv.detach().requires_grad_(), pad.detach().requires_grad_()
    heads, window_size, q_stride = args
    out = ops.window_attention(qkv, heads, window_size, q_stride, pad=pad, backend=backend)
    # The "torch" path reads pad only where a window is padded: elsewhere dpad is zeros.
    return (out.detach(), *torch.autograd.grad(out, (qkv, pad), grad, materialize_grads=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_and_backward_within_the_error_rule(backend, case, dtype):
    """Output, dqkv and dpad (the qkv bias's gradient through the padded keys) pass the
    shared rule against the float64 "torch" path."""
    device = backend_device(backend)
    tensors, args = make_case(case, device=device)
    reference = forward_backward(*[t.double() for t in tensors], args, "torch")
    torch_low = forward_backward(*[t.to(dtype) for t in tensors], args, "torch")
    kernel = forward_backward(*[t.to(dtype) for t in tensors], args, backend)
    for name, r, t, k in zip(["out", "dqkv", "dpad"], reference, torch_low, kernel):
        assert k.dtype == dtype and k.shape == r.shape
        verdict = error_rule.judge(k, t, r)
        assert verdict.passed, f"{case} {name}: {backend} {verdict.describe()}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_padding_reaches_the_output_only_through_padded_keys(backend):
    """A window that needs no padding does not see pad; a padded one does, and dpad is
    zero when no window is padded."""
    device = backend_device(backend)
    (qkv, pad, _), (heads, window_size, q_stride) = make_case("windows_padded", device=device)
    out = ops.window_attention(qkv, heads, window_size, q_stride, pad=pad, backend=backend)
    moved = ops.window_attention(qkv, heads, window_size, q_stride, pad=pad + 1, backend=backend)
    changed = (out != moved).any(-1)[0]  # [H, W]: windows 4x4; rows 4..6 and cols 8 are padded windows
    assert not changed[:4, :8].any() and changed[4:, :].all() and changed[:, 8:].all()
    (qkv, pad, grad), args = make_case("windows_divide", device=device)
    assert not forward_backward(qkv, pad, grad, args, backend)[2].any()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_query_pooling_routes_the_gradient_like_max_pool2d(backend):
    """Ties between the 2x2 candidates: the first in MaxPool2d's scan order takes the
    gradient, and of two NaN candidates the last (MaxPool2d's rule, not max(dim)'s): the
    same zero pattern as the torch path's."""
    device = backend_device(backend)
    (qkv, pad, grad), args = make_case("pool_windows_padded_and_cropped", device=device)
    qkv = qkv.round()  # many ties
    qkv[0, 2, 2, 3] = qkv[0, 3, 3, 3] = float("nan")  # two NaN candidates of pooled query (1, 1)
    q_grads = [forward_backward(qkv, pad, grad, args, b)[1][..., : qkv.shape[-1] // 3] for b in ("torch", backend)]
    assert torch.equal(q_grads[0] != 0, q_grads[1] != 0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_non_finite_key_stays_in_its_window(backend, value):
    device = backend_device(backend)
    (qkv, pad, grad), (heads, window_size, q_stride) = make_case("windows_padded", device=device)
    qkv[0, 1, 1, heads * 8 + 3] = value  # a key of window (0, 0), head 0
    results = [ops.window_attention(qkv, heads, window_size, q_stride, pad=pad, backend=b) for b in ("torch", backend)]
    finite = [r.isfinite().all(-1) for r in results]
    assert torch.equal(finite[0], finite[1])
    assert finite[1][0, :4, 4:].all() and finite[1][0, 4:].all() and finite[1][1].all()  # the other windows
    if value != value:  # a NaN key reaches every query of its window; an inf only those it scores +inf with
        assert not finite[1][0, :4, :4].any()
    assert error_rule.judge(results[1], results[0], results[0].double()).passed


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_batch_and_non_contiguous_inputs(backend):
    device = backend_device(backend)
    (qkv, pad, _), (heads, window_size, q_stride) = make_case("pool_windows_padded_and_cropped", device=device)
    empty = qkv[:0]
    for b in ("torch", backend):
        assert ops.window_attention(empty, heads, window_size, q_stride, pad=pad, backend=b).shape == (0, 3, 5, 16)
    strided = qkv.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not strided.is_contiguous()
    assert torch.equal(ops.window_attention(strided, heads, window_size, q_stride, pad=pad, backend=backend),
                       ops.window_attention(qkv, heads, window_size, q_stride, pad=pad, backend=backend))


def test_float64_gradcheck_on_the_cpu_kernel():
    backend_device("cpu")
    (qkv, pad, _), (heads, window_size, q_stride) = make_case("pool_windows_padded_and_cropped")
    qkv, pad = qkv[:1, :5, :6].double().requires_grad_(), pad.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, p: ops.window_attention(q, heads, window_size, q_stride, pad=p, backend="cpu"), (qkv, pad))


def kernel_ops(backend):
    return library.TRITON_OPS if backend == "triton" else library.OPS


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_heads_of_no_channels_give_a_uniform_softmax_in_lse(backend):
    """C = 0: out and grad_qkv are empty and no kernel runs, but lse [B, heads, windows,
    queries] is not: every score is an empty dot product, 0, so each softmax is uniform
    over the window's keys (SDPA's answer for E = 0) and lse = log(keys per window), for
    both attentions; their backwards return empty gradients of the inputs' shapes."""
    device = backend_device(backend)
    family = kernel_ops(backend)
    qkv = torch.randn(2, 64, 0, device=device)  # 4 windows of 16 keys, q_stride 4
    out, lse, q_argmax = family["mask_unit_attention"](qkv, 2, 4, 4)
    assert out.shape == (2, 16, 0) and lse.shape == (2, 2, 4, 4)
    assert torch.equal(lse, torch.full_like(lse, math.log(16)))
    assert family["mask_unit_attention_backward"](out, qkv, out, lse, q_argmax, 2, 4, 4).shape == qkv.shape
    qkv, pad = torch.randn(1, 5, 6, 0, device=device), torch.randn(0, device=device)
    # 2 x 2 windows of 4 x 4 keys (padded), 2 x 2 queries each; one global window of 30 keys, 2 x 3 queries
    for window_size, keys, lse_shape in [(4, 16, (1, 2, 4, 4)), (0, 30, (1, 2, 1, 6))]:
        out, lse, q_argmax = family["window_attention"](qkv, pad, 2, window_size, 2)
        assert out.shape == (1, 2, 3, 0) and lse.shape == lse_shape
        assert torch.equal(lse, torch.full_like(lse, math.log(keys)))
        grad_qkv, grad_pad = family["window_attention_backward"](out, qkv, pad, out, lse, q_argmax, 2, window_size, 2)
        assert grad_qkv.shape == qkv.shape and grad_pad.shape == pad.shape


@pytest.mark.parametrize("case", ["windows_padded", "pool_windows_padded_and_cropped", "global_pool_odd_map"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, case):
    device = backend_device(backend)
    (qkv, pad, _), args = make_case(case, device=device)
    family = kernel_ops(backend)
    torch.library.opcheck(family["window_attention"], (qkv.requires_grad_(), pad.requires_grad_(), *args))
    out, lse, argmax = family["window_attention"](qkv.detach(), pad.detach(), *args)
    torch.library.opcheck(family["window_attention_backward"],
                          (torch.randn_like(out), qkv.detach(), pad.detach(), out, lse, argmax, *args))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    device = backend_device(backend)
    (qkv, pad, _), (heads, window_size, q_stride) = make_case("pool_windows_padded_and_cropped", device=device)

    def f(qkv, pad):
        return ops.window_attention(qkv, heads, window_size, q_stride, pad=pad, backend=backend).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(qkv, pad), f(qkv, pad))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qkv=torch.randn(2, 8, 24)), r"qkv must be \[B, H, W, 3 \* dim_out\], got shape \(2, 8, 24\)"),
        (dict(heads=5), "qkv width 48 is not divisible by 3 \\* heads = 15"),
        (dict(window_size=-1), "window_size must be an int >= 0"),
        (dict(window_size=6, q_stride=4), "window_size=6 is not divisible by q_stride=4"),
        (dict(q_stride=17, window_size=0), "q_stride=17 exceeds 16"),
        (dict(qkv=torch.randn(1, 1, 5, 48), q_stride=2, window_size=0), "the 1x5 map is smaller than one 2x2"),
        (dict(pad=torch.randn(47)), r"pad must be a tensor \[3 \* dim_out\] = \[48\]"),
        (dict(qkv=torch.randn(1, 0, 4, 48)), "empty token map"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    args = dict(qkv=torch.randn(1, 4, 4, 48), heads=2, window_size=4, q_stride=1, pad=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.window_attention(args.pop("qkv"), args.pop("heads"), args.pop("window_size"), args.pop("q_stride"), **args)


def test_direct_op_calls_check_their_arguments():
    backend_device("cpu")
    op, backward = library.OPS["window_attention"], library.OPS["window_attention_backward"]
    qkv, pad = torch.randn(1, 4, 4, 48), torch.randn(48)
    with pytest.raises(RuntimeError, match="window_attention: pad must have shape"):
        op(qkv, pad[:40], 2, 4, 1)
    with pytest.raises(RuntimeError, match="window_size must be 0 \\(global\\) or a multiple of q_stride=2, got 3"):
        op(qkv, pad, 2, 3, 2)
    out, lse, argmax = op(qkv, pad, 2, 4, 2)
    with pytest.raises(RuntimeError, match="window_attention_backward: lse"):
        backward(out, qkv, pad, out, lse[:, :1], argmax, 2, 4, 2)
