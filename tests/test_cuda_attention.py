"""The CUDA attention kernels (csrc/cuda/attention_kernels.cuh): mask_unit_attention and
SAM 2's window_attention, registered for the CUDA dispatch key, their argument checks
(shared with the CPU kernels, so exercised through the CPU op here, and by redispatch
through the CUDA entry points), the "cuda" backend's refusals, and -- on a GPU --
flash-attention's error rule against the float64 torch path, with the helpers of
test_attention.py and test_window_attention.py (which runs its window_attention cases on
every backend, "cuda" included)."""

import pytest
import torch

import hiera_kernels as hk
from hiera_kernels import BackendError, error_rule, library, ops
from hiera_kernels._extension import EXTENSION
from hiera_kernels.backends import AUTO_ORDER, BACKENDS

from helpers import (DTYPES, NONFINITE_BLOCKS, NONFINITE_PARTS, NONFINITE_VALUES, assert_nonfinite_stays_in_its_window,
                     kernel_for)
from test_attention import BLOCKS, assert_error_rule, forward_backward, op_args, random_case
import test_window_attention as window

needs_cuda_build = pytest.mark.skipif(not EXTENSION.with_cuda, reason="the extension was built without CUDA sources")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels build and link here, but cannot run)")
FORWARD = library.OPS["mask_unit_attention"]
BACKWARD = library.OPS["mask_unit_attention_backward"]
WINDOW = library.OPS["window_attention"]
WINDOW_BACKWARD = library.OPS["window_attention_backward"]


@needs_cuda_build
@pytest.mark.parametrize("op", ["mask_unit_attention", "mask_unit_attention_backward", "window_attention",
                                "window_attention_backward"])
def test_registered_for_cuda(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hiera_kernels::{op}", "CUDA")


def window_backward_args(**replace):
    """The backward's arguments for a [1, 5, 6] map, 2 heads of 8, windows of 4 (2 x 2 of
    them), queries pooled 2 x 2: out [1, 2, 3, 16], lse [1, 2, 4 windows, 4 queries]."""
    out = torch.randn(1, 2, 3, 16)
    args = dict(grad_out=torch.randn_like(out), qkv=torch.randn(1, 5, 6, 48), pad=torch.randn(48), out=out,
                lse=torch.randn(1, 2, 4, 4), q_argmax=torch.zeros(1, 2, 3, 16, dtype=torch.uint8))
    args.update(replace)
    return (*args.values(), 2, 4, 2)


# The CUDA entry points without a GPU: redispatched to the CUDA key with CPU tensors, the
# shared checks run first, then the device check stops them.
@needs_cuda_build
@pytest.mark.parametrize(
    "op, make_args, pattern",
    [
        ("window_attention", lambda: (torch.randn(1, 4, 4, 48), torch.randn(48), 2, 4, 1),
         r"hiera_kernels::window_attention: qkv must be a CUDA tensor, got one on cpu"),
        ("window_attention", lambda: (torch.randn(1, 4, 4, 48), torch.randn(48), 2, 3, 2),
         r"hiera_kernels::window_attention: window_size must be 0 \(global\) or a multiple of q_stride=2, got 3"),
        ("window_attention", lambda: (torch.randn(1, 4, 4, 48), torch.randn(40), 2, 4, 1),
         r"hiera_kernels::window_attention: pad must have shape \[48\], got \[40\]"),
        ("window_attention_backward", lambda: window_backward_args(),
         r"hiera_kernels::window_attention_backward: qkv must be a CUDA tensor, got one on cpu"),
        ("window_attention_backward", lambda: window_backward_args(lse=torch.randn(1, 2, 4, 3)),
         r"hiera_kernels::window_attention_backward: lse must have shape \[1, 2, 4, 4\], got \[1, 2, 4, 3\]"),
    ],
    ids=["qkv_off_the_gpu", "window_size", "pad_shape", "backward_qkv_off_the_gpu", "backward_lse_shape"],
)
def test_window_attention_cuda_entry_points_check_their_arguments(op, make_args, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        kernel_for("CUDA", op, *make_args())


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


# The backward's checks of every tensor argument: test_errors_and_backends.py
# (test_raw_ops_check_every_argument), through the CPU and the CUDA entry points.


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


def test_window_attention_backend_refusals():
    cuda = BACKENDS["cuda"]
    device = torch.device("cuda")
    assert "window_attention" in cuda.OPS
    assert any("dtype float64 is not supported" in r for r in cuda.not_supported_reasons("window_attention", device, torch.float64))
    too_wide = cuda.not_supported_reasons("window_attention", device, torch.bfloat16, head_dim=129)
    assert any("head_dim=129 exceeds the attention kernel's 128" in r for r in too_wide)
    with pytest.raises(BackendError, match=r"backend 'cuda' cannot run .*runs on cuda tensors, not cpu"):
        ops.window_attention(torch.randn(1, 8, 8, 48), 2, 4, 1, backend="cuda")
    with pytest.raises(BackendError, match=r"head_dim=130 exceeds"):
        ops.window_attention(torch.randn(1, 8, 8, 780), 2, 4, 1, backend="cuda")


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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", list(NONFINITE_VALUES))
@pytest.mark.parametrize("part", list(NONFINITE_PARTS))
@pytest.mark.parametrize("block", list(NONFINITE_BLOCKS))
def test_non_finite_values_stay_in_their_window(block, part, value, dtype):
    """A warp's 16 rows span four windows in the packed blocks: masked zeros meet other
    windows' operands in the WMMA and SIMT products (forward, dq, dk/dv)."""
    assert_nonfinite_stays_in_its_window("cuda", block, part, value, dtype, device="cuda")


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
def test_an_argmax_byte_past_the_candidates_reads_as_zero():
    """The CPU backward refuses a q_argmax byte >= the candidate count (see
    test_errors_and_backends); the CUDA kernels cannot raise without a sync, so they read
    that pooled query's channel as 0 and route its q gradient to no candidate: nothing is
    read out of bounds, and the other windows' gradients are those of the true argmax."""
    qkv = torch.randn(2, 64, 24, device="cuda")  # 2 heads of 4 channels, 4 windows of 16 keys, q_stride 4
    out, lse, q_argmax = FORWARD(qkv, 2, 4, 4)
    grad_out = torch.randn_like(out)
    want = BACKWARD(grad_out, qkv, out, lse, q_argmax, 2, 4, 4)
    bad = q_argmax.clone()
    bad[1, 3, 5] = 4  # batch 1, pooled query 0 of window 3 (row i * windows + w), channel 5
    got = BACKWARD(grad_out, qkv, out, lse, bad, 2, 4, 4)
    assert got.isfinite().all()
    candidates = [(s * 4 + 0) * 4 + 3 for s in range(4)]  # tokens (s * queries + i) * windows + w
    assert (got[1, candidates, 5] == 0).all()
    window = torch.zeros(2, 64, dtype=torch.bool, device="cuda")
    window[1, 3::4] = True  # batch 1's window 3: tokens n with n % windows == 3
    torch.testing.assert_close(got[~window], want[~window], atol=1e-6, rtol=0)


@needs_gpu
def test_float64_is_refused_with_a_reason():
    qkv = torch.randn(1, 64, 48, device="cuda", dtype=torch.float64)
    with pytest.raises(BackendError, match="dtype float64 is not supported"):
        ops.mask_unit_attention(qkv, 2, 1, 64, True, backend="cuda")
    with pytest.raises(RuntimeError, match="float64 runs on the 'torch' backend"):
        FORWARD(qkv, 2, 1, 1)
    assert hk.ops.mask_unit_attention(qkv, 2, 1, 64, True).dtype == torch.float64  # auto: torch


# ------------------------------------------------------------ window_attention on a GPU
# (batch, H, W, heads, head_dim, window_size, q_stride): SAM 2's blocks at smaller maps,
# where the CTA tiling differs from test_window_attention's tiny cases: 64-query windows
# (one CTA each), 196-query windows spanning CTAs (14, padded), a pool block whose
# windows are padded and whose last pooled row and column are cropped, long global
# sequences (several key blocks per CTA) over odd maps.
WINDOW_CASES = {
    "windowed_8": (2, 32, 40, 1, 96, 8, 1),
    "pool_block_padded_cropped": (2, 27, 29, 2, 96, 8, 2),
    "windowed_14_padded": (1, 30, 33, 4, 96, 14, 1),
    "windowed_7_hd56": (2, 16, 16, 2, 56, 7, 1),
    "global_odd_pool_hd72": (1, 23, 21, 2, 72, 0, 2),
    "global_long_generic_hd": (1, 45, 41, 3, 40, 0, 1),
    "pool_4x4": (1, 18, 18, 1, 16, 8, 4),
}


def window_case(case, dtype, seed=0):
    batch, H, W, heads, hd, window_size, q_stride = WINDOW_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    C = heads * hd
    qkv = torch.randn(batch, H, W, 3 * C, generator=gen).cuda()
    pad = torch.randn(3 * C, generator=gen).cuda()
    grad = torch.randn(batch, H // q_stride, W // q_stride, C, generator=gen).cuda()
    return (qkv, pad, grad), (heads, window_size, q_stride)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_attention_error_rule(case, dtype):
    (qkv, pad, grad), args = window_case(case, dtype)
    reference = window.forward_backward(qkv.double(), pad.double(), grad.double(), args, "torch")
    torch_low = window.forward_backward(qkv.to(dtype), pad.to(dtype), grad.to(dtype), args, "torch")
    kernel = window.forward_backward(qkv.to(dtype), pad.to(dtype), grad.to(dtype), args, "cuda")
    for name, r, t, k in zip(["out", "dqkv", "dpad"], reference, torch_low, kernel):
        verdict = error_rule.judge(k, t, r)
        assert verdict.passed, f"{case} {name} {dtype}: cuda {verdict.describe()}"


@needs_gpu
@pytest.mark.parametrize("case", ["pool_block_padded_cropped", "windowed_14_padded", "global_odd_pool_hd72"])
def test_window_attention_is_deterministic_and_matches_the_pooling_argmax(case):
    """Bitwise equal gradients run to run (grad_pad's per-CTA sums are added in a fixed
    order), every q the pooling never picks gets exactly 0, and the argmax names the
    candidate MaxPool2d picks (first maximum in scan order, ties made by rounding)."""
    (qkv, pad, grad), (heads, window_size, q_stride) = window_case(case, torch.bfloat16)
    qkv, pad, grad = qkv.round().bfloat16(), pad.bfloat16(), grad.bfloat16()
    runs = [window.forward_backward(qkv, pad, grad, (heads, window_size, q_stride), "cuda") for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    want = window.forward_backward(qkv, pad, grad, (heads, window_size, q_stride), "torch")
    C = qkv.shape[-1] // 3
    assert torch.equal(runs[0][1][..., :C] != 0, want[1][..., :C] != 0)
    assert not runs[0][2][:C].any()  # no stored query pools over padding
    if q_stride > 1:
        _, _, argmax = WINDOW(qkv, pad, heads, window_size, q_stride)
        B, H, W, _ = qkv.shape
        oh, ow = H // q_stride, W // q_stride
        q = qkv[:, : oh * q_stride, : ow * q_stride, :C].float().permute(0, 3, 1, 2)
        _, index = torch.nn.functional.max_pool2d(q, q_stride, q_stride, return_indices=True)  # flat y * W' + x
        row, col = index // (ow * q_stride), index % (ow * q_stride)
        candidate = (row % q_stride) * q_stride + col % q_stride
        assert torch.equal(argmax.long(), candidate.permute(0, 2, 3, 1))


@needs_gpu
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("part", ["k", "v"])
def test_a_non_finite_pad_stays_in_the_padded_windows(part, value):
    """pad is a key of every padded window only: a non-finite k or v there must not reach
    the windows that need no padding, which share CTAs and WMMA tiles with them."""
    (qkv, pad, grad), (heads, window_size, q_stride) = window_case("windowed_14_padded", torch.float16)
    C = qkv.shape[-1] // 3
    pad = pad.clone()
    pad[(1 if part == "k" else 2) * C + 5] = value  # head 0
    results = [ops.window_attention(qkv.half(), heads, window_size, q_stride, pad=pad.half(), backend=b) for b in ("torch", "cuda")]
    finite = [r.isfinite() for r in results]
    assert torch.equal(finite[0], finite[1])
    assert finite[1][0, :28, :28].all()  # windows (0..1, 0..1) need no padding
    unpadded = [r[0, :28, :28] for r in results]
    assert error_rule.judge(unpadded[1], unpadded[0], unpadded[0].double()).passed


@needs_gpu
def test_window_attention_sam2_stage1_full_size():
    """SAM 2 Hiera-T stage 1 at 1024x1024: 1024 windows of 64 queries, head dim 96."""
    qkv = torch.randn(1, 256, 256, 3 * 96, device="cuda")
    pad = torch.randn(3 * 96, device="cuda")
    grad = torch.randn(1, 256, 256, 96, device="cuda")
    reference = window.forward_backward(qkv.double(), pad.double(), grad.double(), (1, 8, 1), "torch")
    torch_low = window.forward_backward(qkv.bfloat16(), pad.bfloat16(), grad.bfloat16(), (1, 8, 1), "torch")
    kernel = window.forward_backward(qkv.bfloat16(), pad.bfloat16(), grad.bfloat16(), (1, 8, 1), "cuda")
    for name, r, t, k in zip(["out", "dqkv", "dpad"], reference, torch_low, kernel):
        verdict = error_rule.judge(k, t, r)
        assert verdict.passed, f"{name}: cuda {verdict.describe()}"
