"""Bad input gets a clear error naming the op, the argument and the numbers; backend
choice says why it refused."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hiera_kernels as hk
from hiera_kernels import BackendError, library, ops
from hiera_kernels.backends import EXTENSION, choose

from helpers import assert_fake_refuses, kernel_for, without_interpreter

S2 = [(2, 2)] * 3


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: ops.unroll(torch.randn(2, 784, 4), [28, 28], S2), ValueError, r"unroll: size\[0\]=28 is not divisible by 8"),
        (lambda: ops.unroll(torch.randn(2, 780, 4), [56, 56], S2), ValueError, r"unroll: x has N=780 tokens but size=\(56, 56\) holds 3136"),
        (lambda: ops.unroll(torch.randn(3136, 4), [56, 56], S2), ValueError, r"unroll: x must be \[B, N, C\], got shape \(3136, 4\)"),
        (lambda: ops.unroll(torch.zeros(1, 64, 2, dtype=torch.int32), [8, 8], S2), TypeError, r"unroll: x has dtype torch.int32"),
        (lambda: ops.unroll([1, 2], [8, 8], S2), TypeError, r"unroll: x must be a torch.Tensor, got list"),
        (lambda: ops.unroll(torch.randn(1, 64, 2), [8, 8], [(2, 2, 1)]), ValueError, r"unroll: schedule\[0\]=\(2, 2, 1\) must have one stride per dim"),
        (lambda: ops.unroll(torch.randn(1, 64, 2), [8, 0], S2), ValueError, r"unroll: size\[1\] must be >= 1, got 0"),
        (lambda: ops.reroll(torch.randn(1, 64, 2), [8, 8], S2, torch.ones(1, 2)), TypeError, r"reroll: mask must be a bool tensor"),
        (lambda: ops.reroll(torch.randn(1, 64, 2), [16, 16], S2, torch.ones(1, 3, dtype=torch.bool)), ValueError, r"reroll: mask must have shape \(B, num_units\)=\(1, 4\), got \(1, 3\)"),
        (lambda: ops.reroll(torch.randn(1, 70, 2), [16, 16], S2, torch.ones(1, 4, dtype=torch.bool)), ValueError, r"reroll: with a mask, x must hold whole kept mask units of 64 tokens \(at most 4 units\), got N=70"),
        (lambda: ops.reroll(torch.randn(1, 63, 2), [8, 8], S2), ValueError, r"reroll: x has N=63 tokens"),
        (lambda: ops.query_pool(torch.randn(2, 10, 4), 4), ValueError, r"query_pool: N=10 is not divisible by stride=4"),
        (lambda: ops.query_pool(torch.randn(2, 8, 4), 0), ValueError, r"query_pool: stride must be >= 1, got 0"),
        (lambda: ops.query_pool(torch.randn(2, 8, 4), 2.0), TypeError, r"query_pool: stride must be an int, got float"),
        (lambda: ops.mask_unit_attention(torch.randn(2, 64, 50), 2, 1, 64, True), ValueError, r"mask_unit_attention: qkv width 50 is not divisible by 3 \* heads = 6"),
        (lambda: ops.mask_unit_attention(torch.randn(2, 60, 48), 2, 4, 4, True), ValueError, r"mask_unit_attention: N=60 is not a whole number of windows of q_stride \* window_size = 4 \* 4 tokens"),
        (lambda: ops.mask_unit_attention(torch.randn(2, 62, 48), 2, 4, 0, False), ValueError, r"mask_unit_attention: N=62 is not divisible by q_stride=4"),
        (lambda: ops.mask_unit_attention(torch.randn(2, 64, 48), 0, 1, 64, True), ValueError, r"mask_unit_attention: heads must be >= 1, got 0"),
        (lambda: ops.mask_unit_attention(torch.randn(2, 64, 48, 1), 2, 1, 64, True), ValueError, r"mask_unit_attention: qkv must be \[B, N, 3 \* dim_out\]"),
        (lambda: ops.mask_unit_attention(torch.randn(2, 0, 48), 2, 1, 16, True), ValueError, r"mask_unit_attention: qkv has no tokens \(N=0\)"),
    ],
)
def test_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_bad_input_fails_the_same_on_every_backend():
    for backend in ["torch", "cpu", "triton", "cuda"]:
        with pytest.raises(ValueError, match=r"size\[0\]=28 is not divisible by 8"):
            ops.unroll(torch.randn(2, 784, 4), [28, 28], S2, backend=backend)


def test_named_backend_says_why_it_cannot_run():
    with pytest.raises(BackendError, match=r"backend 'cuda' cannot run .*runs on cuda tensors, not cpu"):
        ops.query_pool(torch.randn(1, 64, 2), 4, backend="cuda")
    with pytest.raises(ValueError, match=r"unknown backend 'fast'; choose one of auto, torch, cpu, cuda, triton"):
        ops.query_pool(torch.randn(1, 64, 2), 4, backend="fast")
    reasons = hk.backend_reasons("cuda", "unroll", torch.float64)["cuda"]
    assert any("dtype float64 is not supported" in r for r in reasons)


def test_auto_picks_the_fastest_that_can_run():
    x = torch.randn(1, 64, 2)
    assert hk.available_backends("cpu") == ["cpu", "torch"]
    assert choose("unroll", x).NAME == "cpu"
    assert choose("query_pool", x, stride=4).NAME == "cpu"
    assert choose("query_pool", x, stride=300).NAME == "torch"  # past the one-byte argmax
    assert choose("mask_unit_attention", x).NAME == "cpu"
    assert choose("unroll", x.to("meta")).NAME == "torch"  # devices without kernels
    # Past the C++ kernels' bounds, "auto" still runs where "torch" can.
    assert choose("unroll", x, dims=5, steps=1).NAME == "torch"
    assert choose("reroll", x, dims=1, steps=9).NAME == "torch"
    x9 = torch.randn(1, 2**9, 3)
    torch.testing.assert_close(ops.unroll(x9, [2**9], [(2,)] * 9), ops.unroll(x9, [2**9], [(2,)] * 9, backend="torch"), atol=0, rtol=0)
    with pytest.raises(BackendError, match="9 unroll steps exceed the kernels' 8"):
        ops.unroll(x9, [2**9], [(2,)] * 9, backend="cpu")
    qkv = torch.randn(1, 300, 6)
    assert choose("mask_unit_attention", qkv, stride=300).NAME == "torch"
    ops.mask_unit_attention(qkv, 1, 300, 0, False)  # auto: the torch path pools 300 rows
    with pytest.raises(BackendError, match="stride=300 exceeds 256"):
        ops.mask_unit_attention(qkv, 1, 300, 0, False, backend="cpu")


def test_default_backend_setters():
    x = torch.randn(1, 64, 2)
    assert hk.get_backend() == "auto"
    with hk.use_backend("torch"):
        assert hk.get_backend() == "torch" and choose("unroll", x).NAME == "torch"
        with hk.use_backend("cuda"), pytest.raises(BackendError):
            ops.unroll(x, [8, 8], S2)
    assert hk.get_backend() == "auto"
    hk.set_backend("torch")
    try:
        assert choose("unroll", x).NAME == "torch"
        assert choose("unroll", x, "cpu").NAME == "cpu"  # an explicit argument wins
    finally:
        hk.set_backend("auto")
    with pytest.raises(ValueError, match="set_backend: unknown backend 'gpu'"):
        hk.set_backend("gpu")


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter as a user would (no Triton interpreter), with
    the HIERA_KERNELS_* variables of this process replaced by ``env``."""
    base = {k: v for k, v in without_interpreter().items() if not k.startswith("HIERA_KERNELS_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env={**base, **env}, timeout=300
    )


def test_environment_variable_sets_the_default():
    done = run_python("import hiera_kernels as hk; print(hk.get_backend())", HIERA_KERNELS_BACKEND="torch")
    assert done.returncode == 0 and done.stdout.strip() == "torch", done.stderr
    bad = run_python("import hiera_kernels", HIERA_KERNELS_BACKEND="fastest")
    assert bad.returncode != 0 and "HIERA_KERNELS_BACKEND: unknown backend 'fastest'" in bad.stderr
    bad_log = run_python("import hiera_kernels", HIERA_KERNELS_LOG="1")
    assert bad_log.returncode != 0 and "HIERA_KERNELS_LOG='1': use debug, info, warning or error" in bad_log.stderr


def test_debug_log_names_every_auto_choice():
    done = run_python(
        """
        import torch, hiera_kernels as hk
        hk.ops.unroll(torch.randn(1, 64, 2), [8, 8], [(2, 2)])
        hk.ops.query_pool(torch.randn(1, 600, 2), 300)
        """,
        HIERA_KERNELS_LOG="debug",
    )
    assert done.returncode == 0, done.stderr
    assert "unroll on float32[1, 64, 2] on cpu: auto chose 'cpu'" in done.stderr
    assert "query_pool on float32[1, 600, 2] on cpu: auto chose 'torch' 'cpu' refused: stride=300 exceeds 256" in done.stderr


def test_without_the_extension_torch_still_works_and_one_warning_says_how_to_build():
    done = run_python(
        """
        import sys, warnings
        sys.modules["hiera_kernels._C"] = None  # what a missing or broken build looks like
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hiera_kernels as hk, torch
        ours = [str(w.message) for w in caught if "hiera_kernels" in str(w.message)]
        assert len(ours) == 1, ours
        assert "pip install --no-build-isolation -e ." in ours[0], ours[0]
        x = torch.randn(1, 64, 2)
        assert hk.available_backends("cpu") == ["torch"]
        hk.ops.unroll(x, [8, 8], [(2, 2)])
        try:
            hk.ops.unroll(x, [8, 8], [(2, 2)], backend="cpu")
        except hk.BackendError as e:
            assert "the C++ extension is not built" in str(e), e
        else:
            raise AssertionError("cpu backend ran without its extension")
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_triton_on_cpu_tensors_needs_the_interpreter():
    done = run_python(
        """
        import torch, hiera_kernels as hk
        print(hk.available_backends("cpu"))
        hk.ops.unroll(torch.randn(1, 64, 2), [8, 8], [(2, 2)], backend="triton")
        """
    )
    assert "['cpu', 'torch']" in done.stdout, done.stderr
    assert done.returncode != 0
    assert "backend 'triton' cannot run on float32[1, 64, 2] on cpu: runs on cuda tensors (CPU tensors only in the interpreter: set TRITON_INTERPRET=1" in done.stderr


# ------------------------------------------------------------------ raw ops
# The kernel ops called directly (torch.ops.hiera_kernels.<op>.default, no Python
# checks in front): the C++ entry points check every tensor argument's dtype, shape and
# device with the host checks that the CPU and CUDA entry points share
# (csrc/include/hiera_kernels/*.h), so both give the same message. The CUDA entry points
# are reached by redispatch with CPU tensors: their shared checks run before the
# device check, and nothing touches the tensors' memory.
def attention_args(q_stride=4, dtype=torch.float32, **replace):
    """Valid mask_unit_attention_backward arguments (qkv [2, 64, 24], 2 heads, 4 windows:
    out [2, 64 / q_stride, 8], lse [2, 2, 4, 16 / q_stride]) with some replaced."""
    qkv = torch.randn(2, 64, 24, dtype=dtype)
    out, lse, q_argmax = library.OPS["mask_unit_attention"](qkv, 2, q_stride, 4)
    args = dict(grad_out=torch.randn_like(out), qkv=qkv, out=out, lse=lse, q_argmax=q_argmax)
    args.update(replace)
    return tuple(args.values()) + (2, q_stride, 4)


WIN = "hiera_kernels::window_attention"


def window_args(qkv=None, pad=None, heads=2, window_size=4, q_stride=1):
    """window_attention arguments: qkv [1, 4, 4, 48] (2 heads of 8 channels), pad [48], unless given."""
    qkv = torch.randn(1, 4, 4, 48) if qkv is None else qkv
    return qkv, torch.randn(48) if pad is None else pad, heads, window_size, q_stride


def window_backward_args(**replace):
    """Valid window_attention_backward arguments (qkv [1, 4, 4, 48], 2 heads, windows of 4
    pooled 2 x 2: out [1, 2, 2, 16], lse [1, 2, 1, 4]) with some replaced."""
    qkv, pad = torch.randn(1, 4, 4, 48), torch.randn(48)
    out, lse, q_argmax = library.OPS["window_attention"](qkv, pad, 2, 4, 2)
    args = dict(grad_out=torch.randn_like(out), qkv=qkv, pad=pad, out=out, lse=lse, q_argmax=q_argmax)
    args.update(replace)
    return tuple(args.values()) + (2, 4, 2)


def meta(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


BWD = "hiera_kernels::mask_unit_attention_backward"
ONE_OF = r"not one of float32, float16, bfloat16, float64"
RAW_OP_CHECKS = [
    ("unroll", lambda: (torch.randn(2, 60, 4), [8, 8], [2, 2], False), r"hiera_kernels::unroll: x has N=60 tokens but size \[8, 8\] holds 64"),
    ("unroll", lambda: (torch.zeros(2, 64, 4, dtype=torch.int32), [8, 8], [2, 2], False), rf"hiera_kernels::unroll: x has dtype int32, {ONE_OF}"),
    ("unroll", lambda: (torch.randn(2, 64), [8, 8], [2, 2], False), r"hiera_kernels::unroll: x must be \[B, N, C\], got 2 dims \[2, 64\]"),
    ("reroll", lambda: (torch.randn(2, 64, 4), [8, 8], [2, 2, 2], False), r"hiera_kernels::reroll: strides has 3 entries, not a multiple of the 2 spatial dims"),
    ("reroll", lambda: (torch.randn(2, 62, 4), [8, 8], [2, 2], True), r"hiera_kernels::reroll: N=62 is not a whole number of mask units of 4 tokens"),
    ("reroll", lambda: (torch.zeros(2, 64, 4, dtype=torch.bool), [8, 8], [2, 2], True), rf"hiera_kernels::reroll: x has dtype bool, {ONE_OF}"),
    ("unroll", lambda: (torch.randn(2, 32, 4), [2, 2, 2, 2, 2], [1] * 5, False), r"hiera_kernels::unroll: size must have 1 to 4 dims, got 5"),
    ("unroll", lambda: (torch.randn(2, 512, 4), [512], [2] * 9, False), r"hiera_kernels::unroll: at most 8 unroll steps, got 9"),
    ("query_pool", lambda: (torch.randn(2, 10, 4), 4), r"hiera_kernels::query_pool: N=10 is not divisible by stride=4"),
    ("query_pool", lambda: (torch.randn(2, 600, 4), 300), r"hiera_kernels::query_pool: stride must be in \[1, 256\] \(one-byte argmax\), got 300"),
    ("query_pool", lambda: (torch.zeros(2, 8, 4, dtype=torch.int32), 4), rf"hiera_kernels::query_pool: x has dtype int32, {ONE_OF}"),
    ("query_pool", lambda: (torch.randn(8, 4), 4), r"hiera_kernels::query_pool: x must be \[B, N, C\], got 2 dims \[8, 4\]"),
    ("query_pool_backward", lambda: (torch.randn(2, 4, 4), torch.zeros(2, 4, 3, dtype=torch.uint8), 4), r"hiera_kernels::query_pool_backward: argmax must have shape \[2, 4, 4\], got \[2, 4, 3\]"),
    ("query_pool_backward", lambda: (torch.randn(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64), 4), r"hiera_kernels::query_pool_backward: argmax must be uint8 \(query_pool's argmax\), got int64"),
    ("query_pool_backward", lambda: (torch.randn(2, 4, 4), meta((2, 4, 4), torch.uint8), 4), r"hiera_kernels::query_pool_backward: argmax must be on grad_out's device cpu, got one on meta"),
    ("query_pool_backward", lambda: (torch.zeros(2, 4, 4, dtype=torch.int64), torch.zeros(2, 4, 4, dtype=torch.uint8), 4), rf"hiera_kernels::query_pool_backward: grad_out has dtype int64, {ONE_OF}"),
    ("mask_unit_attention", lambda: (torch.zeros(2, 64, 24, dtype=torch.int64), 2, 4, 4), rf"hiera_kernels::mask_unit_attention: qkv has dtype int64, {ONE_OF}"),
    ("mask_unit_attention", lambda: (torch.randn(64, 24), 2, 4, 4), r"hiera_kernels::mask_unit_attention: qkv must be \[B, N, 3 \* dim_out\], got 2 dims \[64, 24\]"),
    ("mask_unit_attention", lambda: (torch.randn(2, 64, 24), 2, 4, 5), r"hiera_kernels::mask_unit_attention: N=64 does not split into 5 windows of a multiple of q_stride=4 tokens"),
    ("mask_unit_attention_backward", lambda: attention_args(grad_out=torch.randn(2, 16, 8).half()), rf"{BWD}: grad_out must be float32 like qkv, got float16"),
    ("mask_unit_attention_backward", lambda: attention_args(grad_out=torch.randn(2, 15, 8)), rf"{BWD}: grad_out must have shape \[2, 16, 8\], got \[2, 15, 8\]"),
    ("mask_unit_attention_backward", lambda: attention_args(grad_out=meta((2, 16, 8))), rf"{BWD}: grad_out must be on qkv's device cpu, got one on meta"),
    ("mask_unit_attention_backward", lambda: attention_args(out=torch.randn(2, 16, 8).half()), rf"{BWD}: out must be float32 like qkv, got float16"),
    ("mask_unit_attention_backward", lambda: attention_args(out=torch.randn(2, 16, 16)), rf"{BWD}: out must have shape \[2, 16, 8\], got \[2, 16, 16\]"),
    ("mask_unit_attention_backward", lambda: attention_args(out=meta((2, 16, 8))), rf"{BWD}: out must be on qkv's device cpu, got one on meta"),
    ("mask_unit_attention_backward", lambda: attention_args(lse=torch.randn(2, 2, 4, 4).half()), rf"{BWD}: lse must be float32 \(the forward's log-sum-exp\), got float16"),
    ("mask_unit_attention_backward", lambda: attention_args(lse=torch.randn(2, 2, 4, 3)), rf"{BWD}: lse must have shape \[2, 2, 4, 4\], got \[2, 2, 4, 3\]"),
    ("mask_unit_attention_backward", lambda: attention_args(lse=meta((2, 2, 4, 4))), rf"{BWD}: lse must be on qkv's device cpu, got one on meta"),
    ("mask_unit_attention_backward", lambda: attention_args(dtype=torch.float64, lse=torch.randn(2, 2, 4, 4)), rf"{BWD}: lse must be float64 \(the forward's log-sum-exp\), got float32"),
    ("mask_unit_attention_backward", lambda: attention_args(q_argmax=torch.zeros(2, 16, 8, dtype=torch.int64)), rf"{BWD}: q_argmax must be uint8 \(the forward's query argmax\), got int64"),
    ("mask_unit_attention_backward", lambda: attention_args(q_argmax=torch.zeros(2, 16, 7, dtype=torch.uint8)), rf"{BWD}: q_argmax must have shape \[2, 16, 8\], got \[2, 16, 7\]"),
    ("mask_unit_attention_backward", lambda: attention_args(q_argmax=meta((2, 16, 8), torch.uint8)), rf"{BWD}: q_argmax must be on qkv's device cpu, got one on meta"),
    ("mask_unit_attention_backward", lambda: attention_args(q_stride=1, q_argmax=torch.zeros(2, 64, 8, dtype=torch.uint8)), rf"{BWD}: q_argmax must have shape \[0\], got \[2, 64, 8\]"),
    ("mask_unit_attention_backward", lambda: attention_args(qkv=torch.randn(2, 64, 24).half()), rf"{BWD}: grad_out must be float16 like qkv, got float32"),
    ("mask_unit_attention", lambda: (torch.randn(2, 514, 24), 2, 257, 2), r"hiera_kernels::mask_unit_attention: q_stride must be in \[1, 256\], got 257"),
    ("mask_unit_attention", lambda: (torch.randn(2, 64, 24), 5, 1, 4), r"hiera_kernels::mask_unit_attention: qkv width 24 is not divisible by 3 \* heads = 15"),
    ("mask_unit_attention", lambda: (torch.randn(2, 64, 24), 2, 1, 0), r"hiera_kernels::mask_unit_attention: N=64 does not split into 0 windows"),
    ("window_attention", lambda: window_args(window_size=3, q_stride=2), rf"{WIN}: window_size must be 0 \(global\) or a multiple of q_stride=2, got 3"),
    ("window_attention", lambda: window_args(window_size=4, q_stride=5), rf"{WIN}: window_size must be 0 \(global\) or a multiple of q_stride=5, got 4"),
    ("window_attention", lambda: window_args(qkv=torch.randn(1, 20, 20, 48), window_size=0, q_stride=17), rf"{WIN}: q_stride must be in \[1, 16\] \(s \* s candidates, one-byte argmax\), got 17"),
    ("window_attention", lambda: window_args(qkv=torch.randn(1, 1, 1, 48), window_size=0, q_stride=2), rf"{WIN}: the 1x1 map is smaller than one 2x2 pooling window"),
    ("window_attention", lambda: window_args(pad=torch.randn(40)), rf"{WIN}: pad must have shape \[48\], got \[40\]"),
    ("window_attention", lambda: window_args(pad=torch.randn(48).half()), rf"{WIN}: pad must be float32 like qkv, got float16"),
    ("window_attention", lambda: window_args(heads=5), rf"{WIN}: qkv width 48 is not divisible by 3 \* heads = 15"),
    ("window_attention", lambda: window_args(qkv=torch.randn(4, 4, 48)), rf"{WIN}: qkv must be \[B, H, W, 3 \* dim_out\], got 3 dims \[4, 4, 48\]"),
    ("window_attention_backward", lambda: window_backward_args(lse=torch.randn(1, 1, 1, 4)), rf"{WIN}_backward: lse must have shape \[1, 2, 1, 4\], got \[1, 1, 1, 4\]"),
    ("window_attention_backward", lambda: window_backward_args(q_argmax=torch.zeros(1, 2, 2, 16, dtype=torch.int64)), rf"{WIN}_backward: q_argmax must be uint8 \(the forward's query argmax\), got int64"),
    ("window_attention_backward", lambda: window_backward_args(grad_out=torch.randn(1, 2, 3, 16)), rf"{WIN}_backward: grad_out must have shape \[1, 2, 2, 16\], got \[1, 2, 3, 16\]"),
]


@pytest.mark.parametrize("op, make_args, message", RAW_OP_CHECKS, ids=[f"{c[0]}-{i}" for i, c in enumerate(RAW_OP_CHECKS)])
def test_the_fakes_refuse_what_the_kernels_refuse(op, make_args, message):
    """Traced (FakeTensorMode: torch.compile, opcheck), each op's fake checks its arguments
    as the C++ entry points do, with their message (as a ValueError), instead of returning
    shapes for a call that would fail only once the kernel ran."""
    assert_fake_refuses(library.OPS[op], make_args(), message)


def test_the_triton_token_order_fakes_check_within_the_triton_bounds():
    """The Triton family's unroll/reroll fakes check the geometry, within the Triton kernels'
    own bounds: past the C++ kernels' MAX_STEPS (the AOT check compiles 12-step schedules)
    and for any dtype."""
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(1, 10, 2))
        with pytest.raises(ValueError, match=r"hiera_kernels::unroll_triton: x has N=10 tokens but size \[4, 4\] holds 16"):
            library.TRITON_OPS["unroll"](x, [4, 4], [2, 2], False)
        long = mode.from_tensor(torch.randn(1, 4096, 2))
        assert library.TRITON_OPS["reroll"](long, [4096], [2] * 12, False).shape == (1, 4096, 2)
        with pytest.raises(ValueError, match=r"hiera_kernels::reroll: at most 8 unroll steps, got 12"):
            library.OPS["reroll"](long, [4096], [2] * 12, False)


def test_the_stride_bounds_are_the_kernels():
    """library's MAX_POOL_STRIDE and MAX_WINDOW_Q_STRIDE are the C++ kernels' bounds: the
    largest stride runs, one more is refused (the messages above name the numbers)."""
    if not EXTENSION.loaded:
        pytest.skip("the C++ extension is not built")
    out, argmax = library.OPS["query_pool"](torch.randn(1, library.MAX_POOL_STRIDE, 2), library.MAX_POOL_STRIDE)
    assert out.shape == (1, 1, 2) and int(argmax.max()) < library.MAX_POOL_STRIDE
    s = library.MAX_WINDOW_Q_STRIDE
    out, _, argmax = library.OPS["window_attention"](torch.randn(1, s, s, 6), torch.zeros(6), 1, 0, s)
    assert out.shape == (1, 1, 1, 2) and argmax.dtype == torch.uint8
    for op, args in (("query_pool", (torch.randn(1, library.MAX_POOL_STRIDE + 1, 2), library.MAX_POOL_STRIDE + 1)),
                     ("window_attention", (torch.randn(1, s + 1, s + 1, 6), torch.zeros(6), 1, 0, s + 1))):
        with pytest.raises(RuntimeError, match="must be in"):
            library.OPS[op](*args)


@pytest.mark.parametrize("key", ["CPU", "CUDA"])
@pytest.mark.parametrize("op, make_args, message", RAW_OP_CHECKS, ids=[f"{c[0]}-{i}" for i, c in enumerate(RAW_OP_CHECKS)])
def test_raw_ops_check_every_argument(key, op, make_args, message):
    if key == "CUDA" and not torch._C._dispatch_has_kernel_for_dispatch_key(f"hiera_kernels::{op}", "CUDA"):
        pytest.skip("hiera_kernels._C was built without its CUDA entry points (no nvcc, or HIERA_KERNELS_SKIP_CUDA=1)")
    with pytest.raises(RuntimeError, match=message):
        kernel_for(key, op, *make_args())


def test_cpu_attention_backwards_refuse_an_argmax_past_the_candidates():
    """The C++ CPU backwards gather each pooled query from the candidate its q_argmax byte
    names: a byte at or past the candidate count (q_stride for mask units, q_stride^2 for
    SAM 2's windows) would read another row or past qkv, so it is refused with its value."""
    if not EXTENSION.loaded:
        pytest.skip("the C++ extension is not built")
    args = list(attention_args(q_stride=4))
    args[4] = args[4].clone()
    kernel_for("CPU", "mask_unit_attention_backward", *args)  # the forward's own argmax: fine
    args[4][1, 3, 5] = 4
    with pytest.raises(RuntimeError, match=rf"{BWD}: q_argmax must hold candidate indices in \[0, 4\) \(the forward's query argmax\), got 4"):
        kernel_for("CPU", "mask_unit_attention_backward", *args)
    qkv, pad = torch.randn(1, 5, 6, 48), torch.randn(48)
    out, lse, q_argmax = library.OPS["window_attention"](qkv, pad, 2, 4, 2)
    q_argmax = q_argmax.clone()
    q_argmax[0, 1, 2, 7] = 255
    with pytest.raises(RuntimeError, match=r"hiera_kernels::window_attention_backward: q_argmax must hold candidate indices in \[0, 4\) \(the forward's query argmax\), got 255"):
        kernel_for("CPU", "window_attention_backward", torch.randn_like(out), qkv, pad, out, lse, q_argmax, 2, 4, 2)


@pytest.mark.skipif(not EXTENSION.loaded, reason="the C++ extension is not built")
@pytest.mark.parametrize("op", ["query_pool", "mask_unit_attention", "window_attention"])
def test_kernel_backwards_refuse_double_backward(op):
    """The *_backward kernels are not differentiable: create_graph through them raises,
    naming the op, where PyTorch's fallback for an op without autograd would give wrong
    second derivatives; a first backward is unchanged."""
    x = torch.randn(1, 16, 6, dtype=torch.float64, requires_grad=True)
    run = {
        "query_pool": lambda t: ops.query_pool(t, 2, backend="cpu"),
        "mask_unit_attention": lambda t: ops.mask_unit_attention(t, 2, 1, 4, True, backend="cpu"),
        "window_attention": lambda t: ops.window_attention(t.view(1, 4, 4, 6), 2, 2, backend="cpu"),
    }[op]
    assert torch.autograd.grad(run(x).sum(), x)[0].shape == x.shape
    with pytest.raises(RuntimeError, match=fr"{op}: double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(run(x).square().sum(), x, create_graph=True)
