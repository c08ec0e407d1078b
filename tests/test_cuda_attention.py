"""The CUDA mask_unit_attention kernel (csrc/cuda): registered for the CUDA dispatch
key, its argument checks (shared with the CPU kernel, so exercised through the CPU op
here), the "cuda" backend's refusals, and -- on a GPU -- flash-attention's error rule
against the float64 torch path, with the helpers of test_attention.py."""

import pytest
import torch

import hiera_kernels as hk
from hiera_kernels import BackendError, library, ops
from hiera_kernels._extension import EXTENSION
from hiera_kernels.backends import AUTO_ORDER, BACKENDS

from test_attention import BLOCKS, assert_error_rule, forward_backward, op_args, random_case

needs_cuda_build = pytest.mark.skipif(not EXTENSION.with_cuda, reason="the extension was built without CUDA sources")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels build and link here, but cannot run)")
FORWARD = library.OPS["mask_unit_attention"]
BACKWARD = library.OPS["mask_unit_attention_backward"]


@needs_cuda_build
@pytest.mark.parametrize("op", ["mask_unit_attention", "mask_unit_attention_backward"])
def test_registered_for_cuda(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hiera_kernels::{op}", "CUDA")


# Direct op calls skip the Python checks of hiera_kernels.ops and reach the C++ checks
# of csrc/include/hiera_kernels/attention_checks.h, which the CUDA entry point shares.
@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: FORWARD(torch.randn(2, 64), 2, 1, 1), r"mask_unit_attention: qkv must be \[B, N, 3 \* dim_out\], got 2 dims"),
        (lambda: FORWARD(torch.randn(2, 64, 50), 2, 1, 1), r"mask_unit_attention: qkv width 50 is not divisible by 3 \* heads = 6"),
        (lambda: FORWARD(torch.randn(2, 64, 48), 0, 1, 1), r"qkv width 48 is not divisible by 3 \* heads = 0"),
        (lambda: FORWARD(torch.randn(1, 512, 6), 1, 512, 1), r"q_stride must be in \[1, 256\], got 512"),
        (lambda: FORWARD(torch.randn(2, 60, 48), 2, 4, 4), r"N=60 does not split into 4 windows of a multiple of q_stride=4 tokens"),
        (lambda: FORWARD(torch.randn(2, 64, 48), 2, 1, 0), r"N=64 does not split into 0 windows"),
    ],
)
def test_shared_forward_checks(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()


def test_shared_backward_checks():
    qkv = torch.randn(2, 64, 48)
    out, lse, argmax = FORWARD(qkv, 2, 4, 4)  # out [2, 16, 16], lse [2, 2, 4, 4], argmax [2, 16, 16]
    grad = torch.randn_like(out)
    with pytest.raises(RuntimeError, match=r"grad_out and out must have shape \[2, 16, 16\], got \[2, 15, 16\]"):
        BACKWARD(grad[:, :15], qkv, out, lse, argmax, 2, 4, 4)
    with pytest.raises(RuntimeError, match=r"lse must be Float \[B, heads, windows, queries\] = \[2, 2, 4, 4\], got Double"):
        BACKWARD(grad, qkv, out, lse.double(), argmax, 2, 4, 4)
    with pytest.raises(RuntimeError, match=r"lse must be .* got Float \[2, 2, 16\]"):
        BACKWARD(grad, qkv, out, lse.reshape(2, 2, 16), argmax, 2, 4, 4)
    with pytest.raises(RuntimeError, match=r"q_argmax must be uint8 of the output's shape \[2, 16, 16\], got Long"):
        BACKWARD(grad, qkv, out, lse, argmax.long(), 2, 4, 4)


def test_backend_refusals():
    cuda = BACKENDS["cuda"]
    device = torch.device("cuda")
    assert "mask_unit_attention" in cuda.OPS
    assert any("dtype float64 is not supported" in r for r in cuda.not_supported_reasons("mask_unit_attention", device, torch.float64))
    too_wide = cuda.not_supported_reasons("mask_unit_attention", device, torch.float16, head_dim=129)
    assert any("head_dim=129 exceeds the attention kernel's 128" in r for r in too_wide)
    assert not any("head_dim" in r for r in cuda.not_supported_reasons("mask_unit_attention", device, torch.float16, head_dim=128))
    with pytest.raises(BackendError, match=r"backend 'cuda' cannot run .*runs on cuda tensors, not cpu"):
        ops.mask_unit_attention(torch.randn(2, 64, 48), 2, 1, 64, True, backend="cuda")
    # The head dim reaches the chooser from the public op: 3 * 2 heads * 130 channels.
    with pytest.raises(BackendError, match=r"head_dim=130 exceeds"):
        ops.mask_unit_attention(torch.randn(1, 16, 780), 2, 1, 16, True, backend="cuda")
    assert AUTO_ORDER["cuda"] == ("triton", "torch")  # "cuda" runs only by name until it has run on a GPU


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_error_rule(block, dtype):
    N, dim_out, args = op_args(block)
    qkv = torch.randn(2, N, 3 * dim_out, device="cuda")
    assert_error_rule("cuda", qkv, args, torch.randn(2, N // args[1], dim_out, device="cuda"), dtype)


@needs_gpu
@pytest.mark.parametrize("seed", range(12))
def test_random_sweep(seed):
    qkv, args, grad, dtype = random_case(seed, "cuda")
    if qkv.shape[2] // (3 * args[0]) > BACKENDS["cuda"].MAX_ATTENTION_HEAD_DIM:
        with pytest.raises(BackendError, match="exceeds the attention kernel's"):
            forward_backward(qkv.to(dtype), args, grad.to(dtype), "cuda")
        return
    assert_error_rule("cuda", qkv, args, grad, dtype)


@needs_gpu
def test_long_global_sequence():
    """Video Hiera-B stage 1 as global attention: 25,088 queries tile over the grid and
    stream 784 key blocks each."""
    qkv = torch.randn(1, 25088, 3 * 96, device="cuda")
    assert_error_rule("cuda", qkv, (1, 1, 0, False), torch.randn(1, 25088, 96, device="cuda"), torch.bfloat16)


@needs_gpu
def test_pooling_ties_and_matches_cpu_argmax():
    """Integer-valued q makes many pooling ties: the first maximum wins (argmax equal to
    the CPU kernel's) and gets the gradient."""
    qkv = torch.randint(-2, 3, (2, 64, 3 * 16)).float()
    grad = torch.randn(2, 16, 16)
    cpu = FORWARD(qkv, 2, 4, 4)
    gpu = FORWARD(qkv.cuda(), 2, 4, 4)
    assert torch.equal(gpu[2].cpu(), cpu[2])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-5, rtol=0)
    ref = forward_backward(qkv, (2, 4, 4, True), grad, "cpu")
    out = forward_backward(qkv.cuda(), (2, 4, 4, True), grad.cuda(), "cuda")
    torch.testing.assert_close(out[1].cpu(), ref[1], atol=1e-5, rtol=0)


@needs_gpu
def test_empty_non_contiguous_and_opcheck():
    for B in [0, 1]:
        qkv = torch.randn(B, 64, 3 * 16, device="cuda", requires_grad=True)
        out = ops.mask_unit_attention(qkv, 2, 4, 4, True, backend="cuda")
        assert out.shape == (B, 16, 16)
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape
    qkv = torch.randn(2, 3 * 16, 64, device="cuda").transpose(1, 2)
    torch.testing.assert_close(
        ops.mask_unit_attention(qkv, 2, 4, 4, True, backend="cuda"),
        ops.mask_unit_attention(qkv.contiguous(), 2, 4, 4, True, backend="cuda"),
        atol=0,
        rtol=0,
    )
    for tokens, q_stride, windows in [(48, 4, 4), (48, 1, 1), (45, 3, 5)]:
        qkv = torch.randn(2, tokens, 3 * 12, device="cuda", requires_grad=True)
        torch.library.opcheck(FORWARD, (qkv, 3, q_stride, windows))
        out, lse, argmax = FORWARD(qkv.detach(), 3, q_stride, windows)
        torch.library.opcheck(BACKWARD, (torch.randn_like(out), qkv.detach(), out, lse, argmax, 3, q_stride, windows))


@needs_gpu
def test_float64_is_refused_with_a_reason():
    qkv = torch.randn(1, 64, 48, device="cuda", dtype=torch.float64)
    with pytest.raises(BackendError, match="dtype float64 is not supported"):
        ops.mask_unit_attention(qkv, 2, 1, 64, True, backend="cuda")
    with pytest.raises(RuntimeError, match="float64 runs on the 'torch' backend"):
        FORWARD(qkv, 2, 1, 1)
    assert hk.ops.mask_unit_attention(qkv, 2, 1, 64, True).dtype == torch.float64  # auto: torch
