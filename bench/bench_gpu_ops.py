"""Per-op GPU microbenchmarks at every Hiera-B/224 block shape (pytest-benchmark).

    python -m pytest bench/bench_gpu_ops.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds

Needs a CUDA device; without one every case skips saying so. Each group is one op at
one shape, batch, dtype and mode; its rows are the backends that can run it (``triton``,
``cuda``, ``torch``) and the rooflines: ``copy`` (a device-to-device copy of the same
bytes; two in fwd+bwd) for the memory-bound ops, and for attention ``flash_sdpa``
(PyTorch's flash attention on q, k, v already arranged as 4-D [B * windows, heads,
tokens, head_dim] tensors: the best fused attention, without Hiera's layout work or
pooling). ``extra_info`` carries GB/s (bytes read + written by the op, over the
median) and, for attention, TFLOP/s. Batch: HIERA_BENCH_BATCH (default 8).
"""

import pytest
import torch
import torch.nn.functional as F

from hiera_kernels import backends, ops

from bench_ops import BATCH, CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU microbenchmarks: no CUDA device here (run them on a machine with a GPU)")
PROVIDERS = ["copy", "flash_sdpa", "torch", "triton", "cuda"]


def synchronized(fn):
    """pytest-benchmark times host wall clock: wait for the GPU inside the timed call."""
    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out
    return run


def attention_sizes(tokens, channels, kwargs):
    """(windows, keys per window, queries per window, heads, head_dim)."""
    heads, q_stride = kwargs["heads"], kwargs["q_stride"]
    windows = tokens // (q_stride * kwargs["window_size"]) if kwargs["use_mask_unit_attn"] else 1
    keys = tokens // windows
    return windows, keys, keys // q_stride, heads, channels // 3 // heads


def traffic_and_flops(op, tokens, channels, kwargs, dtype, mode):
    """Bytes read + written and FLOPs of one call, per the op's contract."""
    size = torch.finfo(dtype).bits // 8
    elements = BATCH * tokens * channels
    if op == "mask_unit_attention":
        windows, keys, queries, heads, head_dim = attention_sizes(tokens, channels, kwargs)
        out = BATCH * windows * queries * heads * head_dim
        flops = 4 * BATCH * windows * heads * queries * keys * head_dim  # QK^T and PV
        if mode == "fwd":
            return (elements + out) * size, flops
        return (2 * elements + 3 * out) * size, flops * 3.5  # + dO, O in; dqkv out; bwd = 2.5x fwd
    out = elements // kwargs.get("stride", 1)
    moved = (elements + out) * size
    return (moved if mode == "fwd" else 2 * moved), None


def flash_sdpa(tokens, channels, kwargs, dtype, mode):
    windows, keys, queries, heads, head_dim = attention_sizes(tokens, channels, kwargs)
    q = torch.randn(BATCH * windows, heads, queries, head_dim, device="cuda", dtype=dtype, requires_grad=mode != "fwd")
    k, v = (torch.randn(BATCH * windows, heads, keys, head_dim, device="cuda", dtype=dtype, requires_grad=mode != "fwd")
            for _ in range(2))

    def call():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
        if mode != "fwd":
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return out
    return call


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_gpu_op(benchmark, case, provider, dtype, mode):
    op, label, tokens, channels, kwargs = case
    moved, flops = traffic_and_flops(op, tokens, channels, kwargs, dtype, mode)
    benchmark.group = f"{op} {label} B={BATCH} {str(dtype)[6:]} {mode} (cuda)"
    x = torch.randn(BATCH, tokens, channels, device="cuda", dtype=dtype, requires_grad=mode != "fwd")
    if provider == "copy":
        if op == "mask_unit_attention":
            pytest.skip("attention is compared with flash_sdpa, not a copy")
        copies = 1 if mode == "fwd" else 2
        call = lambda: [x.detach().clone() for _ in range(copies)]  # noqa: E731
    elif provider == "flash_sdpa":
        if op != "mask_unit_attention":
            pytest.skip("flash_sdpa: attention only")
        call = flash_sdpa(tokens, channels, kwargs, dtype, mode)
    else:
        reasons = backends.BACKENDS[provider].not_supported_reasons(op, x.device, dtype, **{
            k: v for k, v in kwargs.items() if k == "stride"})
        if reasons:
            pytest.skip(f"{provider}: {'; '.join(reasons)}")
        fn = getattr(ops, op)
        if mode == "fwd":
            call = lambda: fn(x.detach(), **kwargs, backend=provider)  # noqa: E731
        else:
            grad = torch.randn_like(fn(x.detach(), **kwargs, backend=provider))
            call = lambda: torch.autograd.grad(fn(x, **kwargs, backend=provider), x, grad)  # noqa: E731
    call()  # compile / autotune outside the timing
    benchmark(synchronized(call))
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(moved / seconds / 1e9, 1)
    if flops:
        benchmark.extra_info["TFLOP/s"] = round(flops / seconds / 1e12, 2)
