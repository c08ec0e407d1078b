"""The "triton" backend against the "torch" path: compiled, on CUDA tensors, where a GPU
is; elsewhere in Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1
when no GPU is there). And its ahead-of-time compile for sm_80 and sm_90. The interpreter is slow, so shapes are small but cover every block type:
windowed with and without q pooling, global with and without, video, masked MAE
token sets, Hiera's head dims 56/64/72/96 and odd batch sizes."""

import copy
import subprocess
import sys

import pytest
import torch

import hiera_kernels as hk
from hiera_kernels import error_rule, library, ops

from helpers import (DTYPES, NONFINITE_BLOCKS, NONFINITE_PARTS, NONFINITE_VALUES, assert_nonfinite_stays_in_its_window,
                     mu_size, without_interpreter)

triton_kernels = pytest.importorskip("hiera_kernels.triton")
# unroll/reroll need tuple kernel arguments (Triton 3.3+); older Triton refuses them.
needs_tuple_arguments = pytest.mark.skipif(not triton_kernels.common.TUPLE_ARGUMENTS,
                                           reason=triton_kernels.common.NO_TUPLE_ARGUMENTS)
# Chosen once: the interpreter runs CPU tensors, compiled kernels need CUDA ones.
DEVICE = "cpu" if triton_kernels.INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="the Triton kernels are compiled (TRITON_INTERPRET was not set when hiera_kernels was imported) but no GPU is here")

# (size, schedule): image stages (windowed and not), video, odd strides.
GEOMETRIES = [
    ([16, 16], [(2, 2), (2, 2), (2, 2)]),
    ([8, 8], [(2, 2), (2, 2)]),
    ([4, 8, 8], [(1, 2, 2), (1, 2, 2)]),
    ([12, 8], [(3, 2), (2, 2)]),
    ([6, 5], []),
]


def exact(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("size, schedule", GEOMETRIES)
@needs_tuple_arguments
def test_unroll_and_reroll_are_exact_forward_and_backward(size, schedule):
    B, N, C = 3, 1, 5
    for s in size:
        N *= s
    x = torch.randn(B, N, C, dtype=torch.bfloat16, requires_grad=True, device=DEVICE)
    grad = torch.randn(B, N, C, dtype=torch.bfloat16, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        xi = x.detach().requires_grad_()
        unrolled = ops.unroll(xi, size, schedule, backend=backend)
        rerolled = ops.reroll(unrolled * 2, size, schedule, backend=backend)
        (g,) = torch.autograd.grad(rerolled, xi, grad.view(rerolled.shape))
        results[backend] = (unrolled, rerolled, g)
    for ours, theirs in zip(results["triton"], results["torch"]):
        exact(ours, theirs)


@pytest.mark.parametrize("size, schedule", GEOMETRIES[:4])
@needs_tuple_arguments
def test_reroll_with_a_mask_is_exact(size, schedule):
    kept, C = 3, 6
    units = 1
    for s, u in zip(size, hk.reference.mask_unit_shape(schedule, len(size))):
        units *= s // u
    mask = torch.zeros(2, units, dtype=torch.bool, device=DEVICE)
    mask[:, :kept] = True
    x = torch.randn(2, kept * mu_size(schedule, len(size)), C, requires_grad=True, device=DEVICE)
    grad = torch.randn(2, kept * mu_size(schedule, len(size)), C, device=DEVICE)
    outs = []
    for backend in ("torch", "triton"):
        xi = x.detach().requires_grad_()
        out = ops.reroll(xi, size, schedule, mask, backend=backend)
        outs.append((out, *torch.autograd.grad(out, xi, grad.view(out.shape))))
    for ours, theirs in zip(outs[1], outs[0]):
        exact(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_pool_is_exact_with_ties_and_nan(dtype):
    x = torch.randn(3, 4 * 10, 7, device=DEVICE).to(dtype)
    x[0, 10:20] = x[0, :10]  # ties: the first maximum wins
    x[1, 25, 2] = float("nan")
    x[2, 5, 1] = x[2, 15, 1] = float("nan")  # the first NaN wins
    x[2, :, 3] = float("-inf")
    grad = torch.randn(3, 10, 7, device=DEVICE).to(dtype)
    results = []
    for backend in ("torch", "triton"):
        xi = x.detach().requires_grad_()
        out = ops.query_pool(xi, 4, backend=backend)
        results.append((out, *torch.autograd.grad(out, xi, grad)))
    for ours, theirs in zip(results[1], results[0]):
        exact(ours, theirs)


# (dim_out, heads, q_stride, window_size, use_mask_unit_attn, N, batch)
ATTENTION_BLOCKS = {
    "windowed": (64, 1, 1, 64, True, 4 * 64, 2),
    "windowed_pool": (2 * 56, 2, 4, 16, True, 3 * 64, 1),
    "windowed_16": (2 * 72, 2, 1, 16, True, 5 * 16, 3),
    "windowed_pool_4": (4 * 96, 4, 4, 4, True, 6 * 16, 1),
    "global": (2 * 64, 2, 1, 0, False, 130, 2),
    "global_pool": (2 * 96, 2, 4, 0, False, 4 * 49, 1),
    "video_pool": (2 * 16, 2, 4, 16, True, 8 * 64, 1),
    "mae_masked_kept_7": (2 * 56, 2, 1, 16, True, 7 * 16, 3),
    "odd": (30, 3, 3, 5, True, 45, 3),
}


def attention_forward_backward(qkv, grad, args, backend):
    qkv = qkv.detach().requires_grad_()
    out = ops.mask_unit_attention(qkv, *args, backend=backend)
    return out.detach(), *torch.autograd.grad(out, qkv, grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", list(ATTENTION_BLOCKS))
def test_attention_within_the_error_rule(block, dtype):
    """Output and dqkv pass the shared error rule against the float64 "torch" path."""
    dim_out, heads, q_stride, window_size, use_mu, N, batch = ATTENTION_BLOCKS[block]
    args = (heads, q_stride, window_size, use_mu)
    qkv = torch.randn(batch, N, 3 * dim_out, device=DEVICE)
    grad = torch.randn(batch, N // q_stride, dim_out, device=DEVICE)
    reference = attention_forward_backward(qkv.double(), grad.double(), args, "torch")
    torch_low = attention_forward_backward(qkv.to(dtype), grad.to(dtype), args, "torch")
    triton_low = attention_forward_backward(qkv.to(dtype), grad.to(dtype), args, "triton")
    for name, r, t, k in zip(["out", "dqkv"], reference, torch_low, triton_low):
        assert k.dtype == dtype
        verdict = error_rule.judge(k, t, r)
        assert verdict.passed, f"{name}: triton {verdict.describe()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", list(NONFINITE_VALUES))
@pytest.mark.parametrize("part", list(NONFINITE_PARTS))
@pytest.mark.parametrize("block", list(NONFINITE_BLOCKS))
def test_attention_keeps_non_finite_values_in_their_window(block, part, value, dtype):
    """Packed tiles (four windows in one tile) multiply masked zeros by other windows'
    operands; an inf or NaN there must not reach them (forward and every gradient)."""
    assert_nonfinite_stays_in_its_window("triton", block, part, value, dtype)


def test_attention_pooling_routes_the_query_gradient_like_pytorch():
    qkv = torch.randn(1, 32, 3 * 8, device=DEVICE)
    qkv[:, 8:16, :8] = qkv[:, 0:8, :8]  # ties between the q_stride candidates
    grads = []
    for backend in ("torch", "triton"):
        q = qkv.clone().requires_grad_()
        out = ops.mask_unit_attention(q, 2, 4, 8, False, backend=backend)
        out.sum().backward()
        grads.append(q.grad[..., :8])
    assert torch.equal(grads[0] != 0, grads[1] != 0)  # the same candidate gets the gradient


@needs_tuple_arguments
def test_empty_batch_and_non_contiguous_inputs():
    empty = torch.randn(0, 64, 3 * 16, device=DEVICE)
    assert ops.mask_unit_attention(empty, 2, 1, 16, True, backend="triton").shape == (0, 64, 16)
    assert ops.unroll(torch.randn(0, 64, 4, device=DEVICE), [8, 8], [(2, 2)], backend="triton").shape == (0, 64, 4)
    assert ops.query_pool(torch.randn(0, 64, 4, device=DEVICE), 4, backend="triton").shape == (0, 16, 4)
    qkv = torch.randn(2, 3 * 16, 64, device=DEVICE).transpose(1, 2)  # [2, 64, 48], not contiguous
    exact(ops.mask_unit_attention(qkv, 2, 4, 4, True, backend="triton"),
          ops.mask_unit_attention(qkv.contiguous(), 2, 4, 4, True, backend="triton"))
    x = torch.randn(2, 6, 64, device=DEVICE).transpose(1, 2)
    exact(ops.unroll(x, [8, 8], [(2, 2)], backend="triton"), ops.unroll(x, [8, 8], [(2, 2)], backend="torch"))
    for offset in (1, 2, 3):  # inputs starting 2, 4 and 6 bytes past an 8-byte boundary
        x = torch.randn(2 * 16 * 8 + offset, dtype=torch.float16, device=DEVICE)[offset:].view(2, 16, 8)
        for op in (ops.unroll, ops.reroll):
            exact(op(x, [4, 4], [(2, 2)], backend="triton"), op(x, [4, 4], [(2, 2)], backend="torch"))
    # One token, token stride 4 != C = 1 x 4 (a transpose): contiguous by torch's rule,
    # so .contiguous() keeps the stride (sweep case triton seed 236 crashed on it).
    x = torch.randn(1, 4, 1, dtype=torch.float16, device=DEVICE).transpose(1, 2)
    for op in (ops.unroll, ops.reroll):
        exact(op(x, [1], [], backend="triton"), x)


@needs_tuple_arguments
def test_opcheck_every_triton_op():
    ops_ = library.TRITON_OPS
    x = torch.randn(2, 16, 3, requires_grad=True, device=DEVICE)
    torch.library.opcheck(ops_["unroll"], (x, [4, 4], [2, 2], False))
    torch.library.opcheck(ops_["reroll"], (x, [4, 4], [2, 2], True))
    torch.library.opcheck(ops_["query_pool"], (x, 4))
    out, argmax = ops_["query_pool"](x.detach(), 4)
    torch.library.opcheck(ops_["query_pool_backward"], (torch.randn_like(out), argmax, 4))
    qkv = torch.randn(1, 16, 3 * 8, requires_grad=True, device=DEVICE)
    torch.library.opcheck(ops_["mask_unit_attention"], (qkv, 2, 2, 2))
    out, lse, q_argmax = ops_["mask_unit_attention"](qkv.detach(), 2, 2, 2)
    torch.library.opcheck(ops_["mask_unit_attention_backward"],
                          (torch.randn_like(out), qkv.detach(), out, lse, q_argmax, 2, 2, 2))


@needs_tuple_arguments
def test_compiles_without_graph_breaks():
    def f(x, qkv):
        y = ops.unroll(x, [4, 4], [(2, 2)], backend="triton")
        return ops.query_pool(y, 4, backend="triton"), ops.mask_unit_attention(qkv, 2, 2, 4, True, backend="triton")

    x, qkv = torch.randn(1, 16, 4, device=DEVICE), torch.randn(1, 16, 3 * 8, device=DEVICE)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for ours, theirs in zip(compiled(x, qkv), f(x, qkv)):
        exact(ours, theirs)


def test_direct_op_calls_get_clear_errors():
    with pytest.raises(ValueError, match=r"unroll_triton: x has N=10 tokens but size \[4, 4\] holds 16"):
        library.TRITON_OPS["unroll"](torch.randn(1, 10, 2, device=DEVICE), [4, 4], [2, 2], False)
    with pytest.raises(ValueError, match=r"query_pool_triton: stride must be in \[1, 256\]"):
        library.TRITON_OPS["query_pool"](torch.randn(1, 300, 2, device=DEVICE), 300)
    with pytest.raises(ValueError, match=r"mask_unit_attention_triton: head_dim 160 exceeds the Triton kernels' 128"):
        library.TRITON_OPS["mask_unit_attention"](torch.randn(1, 4, 3 * 160, device=DEVICE), 1, 1, 1)
    with pytest.raises(TypeError, match=r"query_pool_triton: x dtype float64 is not supported"):
        library.TRITON_OPS["query_pool"](torch.randn(1, 4, 2, dtype=torch.float64, device=DEVICE), 2)
    reasons = hk.backend_reasons(DEVICE, "mask_unit_attention", torch.float64)["triton"]
    assert any("dtype float64 is not supported" in r for r in reasons)
    with pytest.raises(hk.BackendError, match=r"head_dim=160 exceeds the attention kernel's 128"):
        ops.mask_unit_attention(torch.randn(1, 4, 3 * 160, device=DEVICE), 1, 1, 4, True, backend="triton")


def _float64_calls():
    """op -> float64 arguments of the right shapes for each Triton op that refuses float64."""
    t = lambda *shape, dtype=torch.float64: torch.zeros(shape, dtype=dtype, device=DEVICE)  # noqa: E731
    u8 = torch.uint8
    return {
        "query_pool": (t(1, 4, 2), 2),
        "query_pool_backward": (t(1, 2, 2), t(1, 2, 2, dtype=u8), 2),
        "mask_unit_attention": (t(1, 8, 24), 2, 1, 2),
        "mask_unit_attention_backward": (t(1, 8, 8), t(1, 8, 24), t(1, 8, 8), t(1, 2, 2, 4), t(0, dtype=u8), 2, 1, 2),
        "window_attention": (t(1, 4, 4, 24), t(24), 2, 2, 1),
        "window_attention_backward": (t(1, 4, 4, 8), t(1, 4, 4, 24), t(24), t(1, 4, 4, 8), t(1, 2, 4, 4), t(0, dtype=u8),
                                      2, 2, 1),
    }


@pytest.mark.parametrize("name", sorted(library.TRITON_MAIN_TENSORS))
def test_fakes_refuse_float64_as_the_kernels_do(name):
    """A Triton op on float64 raises the Triton entry's TypeError (triton.language has no
    float64 dot) both when it runs and when it is traced (FakeTensorMode: torch.compile,
    opcheck), where the shared fakes alone would have returned shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _float64_calls()[name]
    tensor = library.TRITON_MAIN_TENSORS[name][1]
    message = rf"{name}_triton: {tensor} dtype float64 is not supported \(float32, float16, bfloat16\)"
    with pytest.raises(TypeError, match=message):
        library.TRITON_OPS[name](*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(TypeError, match=message):
            library.TRITON_OPS[name](*fake_args)
        library.OPS[name](*fake_args)  # the C++ family's kernels take float64, and so does its fake


def _attention_saved(q_stride):
    """qkv [2, 64, 48] (2 heads of 8, 4 windows) and what the forward saves from it:
    out [2, 64 / q_stride, 16], lse [2, 2, 4, 16 / q_stride], q_argmax."""
    qkv = torch.randn(2, 64, 48, device=DEVICE)
    out, lse, q_argmax = library.TRITON_OPS["mask_unit_attention"](qkv, 2, q_stride, 4)
    return torch.randn_like(out), qkv, out, lse, q_argmax


def _meta_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


BACKWARD_OP = "mask_unit_attention_backward_triton"
# (argument index in (grad_out, qkv, out, lse, q_argmax), replacement, q_stride, exception, message)
BAD_BACKWARD_ARGS = {
    "grad_out_dtype": (0, lambda t: t.half(), 4, TypeError, r"grad_out must be float32 like qkv, got float16"),
    "grad_out_shape": (0, lambda t: t[:, :15], 4, ValueError,
                       r"grad_out must be \[B, queries \* windows, dim_out\] = \[2, 16, 16\], got \[2, 15, 16\]"),
    "grad_out_device": (0, _meta_like, 4, ValueError, rf"grad_out must be on {DEVICE} like qkv, got meta"),
    "out_dtype": (2, lambda t: t.bfloat16(), 1, TypeError, r"out must be float32 like qkv, got bfloat16"),
    "out_shape": (2, lambda t: t.reshape(2, 16, 64), 1, ValueError, r"out must be .* = \[2, 64, 16\], got \[2, 16, 64\]"),
    "out_device": (2, _meta_like, 1, ValueError, rf"out must be on {DEVICE} like qkv, got meta"),
    "lse_dtype": (3, lambda t: t.double(), 4, TypeError, r"lse must be float32, got float64"),
    "lse_shape": (3, lambda t: t.reshape(2, 2, 16), 4, ValueError,
                  r"lse must be \[B, heads, windows, queries\] = \[2, 2, 4, 4\], got \[2, 2, 16\]"),
    "lse_device": (3, _meta_like, 4, ValueError, rf"lse must be on {DEVICE} like qkv, got meta"),
    "q_argmax_dtype": (4, lambda t: t.long(), 4, TypeError, r"q_argmax must be uint8, got int64"),
    "q_argmax_shape": (4, lambda t: t[:, :8], 4, ValueError, r"q_argmax must be .* = \[2, 16, 16\], got \[2, 8, 16\]"),
    "q_argmax_device": (4, _meta_like, 4, ValueError, rf"q_argmax must be on {DEVICE} like qkv, got meta"),
    "q_argmax_not_empty_without_pooling": (4, lambda t: torch.zeros(2, 64, 16, dtype=torch.uint8, device=DEVICE), 1, ValueError,
                                           r"q_argmax must be \[0 \(q_stride 1\)\] = \[0\], got \[2, 64, 16\]"),
    "qkv_dtype": (1, lambda t: t.double(), 4, TypeError, r"qkv dtype float64 is not supported"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD_ARGS))
def test_direct_backward_calls_check_every_saved_tensor(case):
    """The raw backward op reads grad_out, out, lse and q_argmax by the shapes the forward
    gives them: each must be the forward's dtype, shape and device, or a clear error."""
    index, bad, q_stride, error, message = BAD_BACKWARD_ARGS[case]
    args = list(_attention_saved(q_stride))
    args[index] = bad(args[index])
    # A tensor on another device makes the dispatcher pick that device's kernel (here
    # the meta one), so device mismatches go to the registered implementation itself.
    call = (triton_kernels.IMPLEMENTATIONS["mask_unit_attention_backward"] if case.endswith("_device")
            else getattr(torch.ops.hiera_kernels, BACKWARD_OP).default)
    with pytest.raises(error, match=f"hiera_kernels::{BACKWARD_OP}: {message}"):
        call(*args, 2, q_stride, 4)


def test_direct_query_pool_backward_checks_argmax():
    op = torch.ops.hiera_kernels.query_pool_backward_triton.default
    grad = torch.randn(2, 4, 3, device=DEVICE)
    argmax = torch.zeros(2, 4, 3, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(TypeError, match=r"query_pool_backward_triton: argmax must be uint8, got int64"):
        op(grad, argmax.long(), 4)
    with pytest.raises(ValueError, match=r"query_pool_backward_triton: argmax must be \[B, N / stride, C of grad_out\] = "
                                         r"\[2, 4, 3\], got \[2, 4, 2\]"):
        op(grad, argmax[..., :2], 4)
    with pytest.raises(ValueError, match=rf"query_pool_backward_triton: argmax must be on {DEVICE} like grad_out, got meta"):
        triton_kernels.IMPLEMENTATIONS["query_pool_backward"](grad, _meta_like(argmax), 4)
    with pytest.raises(TypeError, match=r"query_pool_backward_triton: grad_out dtype int64 is not supported"):
        op(grad.long(), argmax, 4)
    with pytest.raises(TypeError, match=r"unroll_triton: x rows of 3 x uint8 cannot be moved as 2-byte words"):
        torch.ops.hiera_kernels.unroll_triton.default(torch.zeros(1, 16, 3, dtype=torch.uint8, device=DEVICE), [4, 4], [2, 2], False)


@pytest.mark.skipif(DEVICE == "cuda", reason="about the interpreter on CPU tensors; compiled here")
def test_auto_never_picks_the_interpreter_and_lists_it_by_name_only():
    assert hk.available_backends("cpu") == ["cpu", "torch"]
    assert hk.backends.choose("unroll", torch.randn(1, 4, 1)).NAME == "cpu"


@needs_tuple_arguments
def test_tiny_model_training_step_matches_the_torch_path():
    """Hiera-T's configuration at 64x64 (every stage, pooling and global attention) on
    "triton" against "torch": logits, intermediates and every gradient, float32."""
    model = hk.Hiera(input_size=(64, 64), embed_dim=96, num_heads=1, stages=(1, 1, 2, 1), num_classes=10).to(DEVICE)
    x = torch.randn(1, 3, 64, 64, device=DEVICE)

    def step(backend):
        m = copy.deepcopy(model).set_backend(backend)
        xi = x.clone().requires_grad_()
        out, inter = m(xi, return_intermediates=True)
        loss = out.square().sum() + sum(i.square().mean() for i in inter)
        return [out, *inter, *torch.autograd.grad(loss, [xi] + list(m.parameters()))]

    for ours, theirs in zip(step("triton"), step("torch")):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_launchers_only_launch_compiled_specializations():
    """What the launchers launch for Hiera's and SAM 2's shapes is among what the AOT check compiles."""
    from hiera_kernels.triton import aot, query_pool, token_order

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    cases = []
    for dtype in DTYPES:
        for size, schedule in GEOMETRIES + [([56, 56], [(2, 2)] * 3), ([8, 56, 56], [(1, 2, 2)] * 3)]:
            flat = [s for step in schedule for s in step]
            n = 1
            for s in size:
                n *= s
            for channels in (96, 97, 768):
                cases.append(lambda s=size, f=flat, n=n, c=channels, d=dtype: token_order.unroll(meta(2, n, c, dtype=d), s, f, False))
                cases.append(lambda s=size, f=flat, n=n, c=channels, d=dtype: token_order.reroll(meta(2, n, c, dtype=d), s, f, False))
        cases.append(lambda d=dtype: query_pool.query_pool(meta(2, 3136, 96, dtype=d), 4))
        for tokens, dim_out, heads, q_stride, windows in [(3136, 96, 1, 1, 49), (3136, 192, 2, 4, 49), (784, 192, 2, 1, 49),
                                                          (784, 384, 4, 4, 49), (196, 384, 4, 1, 1), (196, 768, 8, 4, 1),
                                                          (49, 768, 8, 1, 1), (3136, 224, 4, 4, 49), (784, 576, 8, 4, 49),
                                                          (25088, 192, 2, 1, 1)]:
            cases.append(lambda t=tokens, c=dim_out, h=heads, s=q_stride, w=windows, d=dtype:
                         aot._attention(d, c // h, t, heads=h, q_stride=s, windows=w))
        # SAM 2 at 1024x1024 (map side, dim_out, heads, window_size, q_stride): Hiera-T/S/B+/L
        # blocks, with and without query pooling, windows 8/4/14/16/7 and global.
        for side, dim_out, heads, window_size, q_stride in [(256, 96, 1, 8, 1), (256, 192, 2, 4, 2), (128, 192, 2, 4, 1),
                                                            (128, 384, 4, 14, 2), (64, 384, 4, 14, 1), (64, 768, 8, 0, 2),
                                                            (32, 768, 8, 0, 1), (256, 112, 2, 8, 1), (64, 576, 8, 16, 1),
                                                            (32, 1152, 16, 7, 1)]:
            cases.append(lambda n=side, c=dim_out, h=heads, w=window_size, s=q_stride, d=dtype:
                         aot._window_attention(d, c // h, n, w, heads=h, q_stride=s))
    launched = set(aot.launcher_specializations(cases))
    compiled = set(aot.all_specializations())
    missing = launched - compiled
    assert not missing, f"{len(missing)} launched specializations are not compiled, e.g. {sorted(missing)[0]}"


@pytest.mark.parametrize("scope", ["quick", pytest.param("every", marks=pytest.mark.extended)])
def test_every_specialization_compiles_for_sm80_and_sm90(tmp_path, scope):
    """The ahead-of-time compile check (no GPU needed): every kernel, every specialization,
    compiled for real (an empty Triton cache), as on a fresh CI machine. Quick: window
    attention at one head dim (aot.all_specializations); --extended: all of them."""
    env = dict(without_interpreter(), TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "hiera_kernels.triton.aot", "--arch", "80", "90"]
                          + (["--quick"] if scope == "quick" else []),
                          capture_output=True, text=True, env=env, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " 0 failed" in done.stdout


def test_unroll_and_reroll_are_refused_without_tuple_arguments(monkeypatch):
    """Under a Triton without tuple kernel arguments (3.2) the backend says why instead of failing to compile."""
    monkeypatch.setattr(triton_kernels.common, "TUPLE_ARGUMENTS", False)
    for op in ("unroll", "reroll"):
        assert triton_kernels.common.NO_TUPLE_ARGUMENTS in hk.backend_reasons(DEVICE, op)["triton"]
    assert triton_kernels.common.NO_TUPLE_ARGUMENTS not in hk.backend_reasons(DEVICE, "query_pool")["triton"]
    with pytest.raises(hk.BackendError, match="cannot pass tuples to kernels"):
        ops.unroll(torch.randn(1, 16, 2, device=DEVICE), [4, 4], [(2, 2)], backend="triton")


def test_half_attention_is_refused_on_sm90_where_triton_3_2_aborts(monkeypatch):
    """Triton 3.2 aborts compiling the fp16/bf16 attention backward for sm_90: the backend
    refuses those cases there (an abort would kill the process), and only those."""
    common = triton_kernels.common
    monkeypatch.setattr(common, "SM90_HALF_BACKWARD_ABORTS", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    reasons = lambda dtype, op="mask_unit_attention": hk.backend_reasons("cuda", op, dtype)["triton"]  # noqa: E731
    assert common.SM90_HALF_BACKWARD_ABORTS_REASON in reasons(torch.float16)
    assert common.SM90_HALF_BACKWARD_ABORTS_REASON in reasons(torch.bfloat16)
    assert common.SM90_HALF_BACKWARD_ABORTS_REASON in reasons(torch.float16, "window_attention")
    assert common.SM90_HALF_BACKWARD_ABORTS_REASON not in reasons(torch.float32)
    assert common.SM90_HALF_BACKWARD_ABORTS_REASON not in reasons(torch.float16, "query_pool")
    capability[0] = (8, 0)
    assert common.SM90_HALF_BACKWARD_ABORTS_REASON not in reasons(torch.float16)
