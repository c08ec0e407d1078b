"""mask_unit_attention: the "torch" path against the official MaskUnitAttention, and the
kernels against the "torch" path (flash-attention's rule: within twice its error
against a float64 reference, output and gradient)."""

import pytest
import torch

import hiera_kernels as hk
from hiera_kernels import error_rule, library, ops

from helpers import (DTYPES, NONFINITE_BLOCKS, NONFINITE_PARTS, NONFINITE_VALUES, assert_nonfinite_stays_in_its_window,
                     official)

# Every attention block shape of Hiera-B/224 (spec §10), plus B+ (head_dim 56), L
# (head_dim 72), H (head_dim 64), MAE with 19 kept units, video and odd sizes:
# (dim, dim_out, heads, q_stride, window_size, use_mask_unit_attn, N)
BLOCKS = {
    "B_s1": (96, 96, 1, 1, 64, True, 3136),
    "B_s2_pool": (96, 192, 2, 4, 16, True, 3136),
    "B_s2": (192, 192, 2, 1, 16, True, 784),
    "B_s3_pool": (192, 384, 4, 4, 4, True, 784),
    "B_s3_global": (384, 384, 4, 1, 4, False, 196),
    "B_s4_pool_global": (384, 768, 8, 4, 1, False, 196),
    "B_s4": (768, 768, 8, 1, 1, False, 49),
    "Bplus_s2_pool": (112, 224, 4, 4, 16, True, 3136),
    "L_s1": (144, 144, 2, 1, 64, True, 3136),
    "L_s3_pool": (288, 576, 8, 4, 4, True, 784),
    "H_s2": (512, 512, 8, 1, 16, True, 784),
    "H_s4_global": (2048, 2048, 32, 1, 1, False, 49),
    "mae_s1_masked": (96, 96, 1, 1, 64, True, 19 * 64),
    "mae_s4_no_pool": (384, 768, 8, 1, 4, False, 19 * 4),
    "video_s2_pool": (96, 192, 2, 4, 16, True, 32 * 64),
    "odd": (24, 30, 3, 3, 5, True, 45),
}


def make_pair(dim, dim_out, heads, q_stride, window_size, use_mu, dtype=torch.float32):
    theirs = official.MaskUnitAttention(dim, dim_out, heads, q_stride, window_size, use_mu)
    ours = hk.MaskUnitAttention(dim, dim_out, heads, q_stride, window_size, use_mu)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(dtype), ours.to(dtype)


def run(module, x, grad):
    x = x.detach().requires_grad_()
    out = module(x)
    grads = torch.autograd.grad(out, [x] + list(module.parameters()), grad)
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("block", list(BLOCKS))
def test_float32_output_matches_official(block):
    dim, dim_out, heads, q_stride, window_size, use_mu, N = BLOCKS[block]
    theirs, ours = make_pair(dim, dim_out, heads, q_stride, window_size, use_mu)
    x = torch.randn(2, N, dim)
    with torch.no_grad():
        torch.testing.assert_close(ours.set_backend("torch")(x), theirs(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_no_worse_than_official(block, dtype):
    """The error rule applied to the torch path itself, with the official code in the
    same dtype as the yardstick: output and every gradient against float64."""
    dim, dim_out, heads, q_stride, window_size, use_mu, N = BLOCKS[block]
    theirs, ours = make_pair(dim, dim_out, heads, q_stride, window_size, use_mu)
    ours.set_backend("torch")
    x = torch.randn(2, N, dim)
    grad = torch.randn(2, N // q_stride, dim_out)
    reference = run(theirs.double(), x.double(), grad.double())
    official_low = run(theirs.to(dtype), x.to(dtype), grad.to(dtype))
    ours_low = run(ours.to(dtype), x.to(dtype), grad.to(dtype))
    names = ["out", "dx"] + [n for n, _ in ours.named_parameters()]
    for name, r, o, t in zip(names, reference, ours_low, official_low):
        verdict = error_rule.judge(o, t, r)  # the official code as the yardstick
        assert verdict.passed, f"{name}: torch path {verdict.describe().replace('torch path', 'official code')}"


def op_args(block):
    dim, dim_out, heads, q_stride, window_size, use_mu, N = BLOCKS[block]
    return N, dim_out, (heads, q_stride, window_size, use_mu)


def forward_backward(qkv, args, grad, backend):
    qkv = qkv.detach().requires_grad_()
    out = ops.mask_unit_attention(qkv, *args, backend=backend)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    return out.detach(), dqkv


def assert_error_rule(backend, qkv, args, grad, dtype):
    """The kernel's output and dqkv in ``dtype`` pass the shared error rule
    (:mod:`hiera_kernels.error_rule`) against the float64 torch path. qkv and grad come in
    float32 on the kernel's device."""
    reference = forward_backward(qkv.double(), args, grad.double(), "torch")
    torch_low = forward_backward(qkv.to(dtype), args, grad.to(dtype), "torch")
    kernel_low = forward_backward(qkv.to(dtype), args, grad.to(dtype), backend)
    for name, r, t, k in zip(["out", "dqkv"], reference, torch_low, kernel_low):
        assert k.dtype == dtype
        verdict = error_rule.judge(k, t, r)
        assert verdict.passed, f"{name} {args} N={qkv.shape[1]} {dtype}: {backend} {verdict.describe()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_cpu_kernel_error_rule(block, dtype):
    N, dim_out, args = op_args(block)
    assert_error_rule("cpu", torch.randn(2, N, 3 * dim_out), args, torch.randn(2, N // args[1], dim_out), dtype)


def random_case(seed, device="cpu"):
    """A random geometry, seeded by the iteration: odd head dims, strides, window counts,
    long global sequences (several key blocks) and batch sizes. Returns
    (qkv, args, grad, dtype) with float32 qkv and grad on ``device``."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda values: values[int(torch.randint(len(values), (1,), generator=g))]  # noqa: E731
    heads, head_dim, q_stride = pick([1, 2, 3, 5]), pick([1, 7, 16, 33, 56, 72, 96, 130]), pick([1, 2, 4, 9])
    use_mu = bool(seed % 2)
    windows = pick([1, 3, 49]) if use_mu else 1
    window_size = pick([1, 4, 16]) if use_mu else pick([3, 40, 150])  # global: N up to 1350 (several key blocks)
    N = windows * q_stride * window_size
    B, dtype = pick([1, 2, 3]), pick([torch.float32, torch.bfloat16])
    args = (heads, q_stride, window_size if use_mu else 0, use_mu)
    qkv = torch.randn(B, N, 3 * heads * head_dim, generator=g)
    grad = torch.randn(B, N // q_stride, heads * head_dim, generator=g)
    return qkv.to(device), args, grad.to(device), dtype


@pytest.mark.parametrize("seed", range(12))
def test_cpu_kernel_random_sweep(seed):
    qkv, args, grad, dtype = random_case(seed)
    assert_error_rule("cpu", qkv, args, grad, dtype)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_float64_gradcheck(backend):
    qkv = torch.randn(2, 32, 3 * 8, dtype=torch.float64, requires_grad=True)
    for q_stride, window, use_mu in [(4, 4, True), (1, 8, True), (4, 0, False), (1, 0, False)]:
        assert torch.autograd.gradcheck(lambda t: ops.mask_unit_attention(t, 2, q_stride, window, use_mu, backend=backend), (qkv,))


def test_float64_kernel_matches_torch_path():
    qkv = torch.randn(2, 784, 3 * 192, dtype=torch.float64)
    grad = torch.randn(2, 196, 192, dtype=torch.float64)
    for a, b in zip(forward_backward(qkv, (4, 4, 4, True), grad, "cpu"), forward_backward(qkv, (4, 4, 4, True), grad, "torch")):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_pooling_ties_route_the_query_gradient_like_pytorch():
    """Integer-valued q makes many pooling ties; the first maximum must get the gradient."""
    qkv = torch.randint(-2, 3, (2, 64, 3 * 16)).float()
    grad = torch.randn(2, 16, 16)
    cpu, ref = forward_backward(qkv, (2, 4, 4, True), grad, "cpu"), forward_backward(qkv, (2, 4, 4, True), grad, "torch")
    torch.testing.assert_close(cpu[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cpu[1], ref[1], atol=1e-5, rtol=0)
    assert (ref[1][..., :16] == 0).float().mean() > 0.5  # most q candidates get no gradient


@pytest.mark.parametrize("tokens, q_stride, windows", [(48, 4, 4), (48, 1, 1), (45, 3, 5), (32, 4, 1)])
def test_opcheck(tokens, q_stride, windows):
    qkv = torch.randn(2, tokens, 3 * 12, requires_grad=True)
    torch.library.opcheck(library.OPS["mask_unit_attention"], (qkv, 3, q_stride, windows))
    out, lse, argmax = library.OPS["mask_unit_attention"](qkv.detach(), 3, q_stride, windows)
    torch.library.opcheck(
        library.OPS["mask_unit_attention_backward"], (torch.randn_like(out), qkv.detach(), out, lse, argmax, 3, q_stride, windows)
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_empty_and_single_batch(backend):
    for B in [0, 1]:
        qkv = torch.randn(B, 64, 3 * 16, requires_grad=True)
        out = ops.mask_unit_attention(qkv, 2, 4, 4, True, backend=backend)
        assert out.shape == (B, 16, 16)
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_non_contiguous_qkv(backend):
    qkv = torch.randn(2, 3 * 16, 64).transpose(1, 2)  # [2, 64, 48]
    torch.testing.assert_close(
        ops.mask_unit_attention(qkv, 2, 4, 4, True, backend=backend),
        ops.mask_unit_attention(qkv.contiguous(), 2, 4, 4, True, backend=backend),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiles_without_graph_breaks(backend):
    qkv = torch.randn(2, 64, 3 * 16, requires_grad=True)
    f = lambda t: ops.mask_unit_attention(t, 2, 4, 4, True, backend=backend)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(qkv), f(qkv), atol=1e-6, rtol=0)
    (g1,) = torch.autograd.grad(compiled(qkv).sum(), qkv)
    (g2,) = torch.autograd.grad(f(qkv).sum(), qkv)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", list(NONFINITE_VALUES))
@pytest.mark.parametrize("part", list(NONFINITE_PARTS))
@pytest.mark.parametrize("block", list(NONFINITE_BLOCKS))
def test_cpu_kernel_keeps_non_finite_values_in_their_window(block, part, value, dtype):
    assert_nonfinite_stays_in_its_window("cpu", block, part, value, dtype)
