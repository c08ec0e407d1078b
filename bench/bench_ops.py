"""Per-op CPU microbenchmarks at every Hiera-B/224 block shape (pytest-benchmark).

    pytest bench/bench_ops.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group is one op at one shape, dtype and mode (fwd, or fwd+bwd); its rows are
the backends that can run it, plus the roofline: ``clone`` (a plain copy of the
same bytes, the memory-bandwidth limit) for the memory-bound ops. Compare rows
within one group of one run: the machines here are shared and noisy.
Batch: HIERA_BENCH_BATCH (default 8).
"""

import os

import pytest
import torch

from hiera_kernels import backends, ops

BATCH = int(os.environ.get("HIERA_BENCH_BATCH", "8"))
S = [(2, 2)] * 3
# (op, label, tokens, channels, kwargs) at Hiera-B/224, per image
CASES = [
    ("unroll", "56x56x96", 3136, 96, dict(size=[56, 56], schedule=S)),
    ("reroll", "stage1 56x56x96", 3136, 96, dict(size=[56, 56], schedule=S)),
    ("reroll", "stage2 28x28x192", 784, 192, dict(size=[28, 28], schedule=S[:2])),
    ("reroll", "stage3 14x14x384", 196, 384, dict(size=[14, 14], schedule=S[:1])),
    ("query_pool", "3136x192 /4", 3136, 192, dict(stride=4)),
    ("query_pool", "784x384 /4", 784, 384, dict(stride=4)),
    ("query_pool", "196x768 /4", 196, 768, dict(stride=4)),
    ("mask_unit_attention", "s1 49x64/64 h1", 3136, 288, dict(heads=1, q_stride=1, window_size=64, use_mask_unit_attn=True)),
    ("mask_unit_attention", "s2-pool 49x16/64 h2", 3136, 576, dict(heads=2, q_stride=4, window_size=16, use_mask_unit_attn=True)),
    ("mask_unit_attention", "s2 49x16/16 h2", 784, 576, dict(heads=2, q_stride=1, window_size=16, use_mask_unit_attn=True)),
    ("mask_unit_attention", "s3-pool 49x4/16 h4", 784, 1152, dict(heads=4, q_stride=4, window_size=4, use_mask_unit_attn=True)),
    ("mask_unit_attention", "s3 global 196 h4", 196, 1152, dict(heads=4, q_stride=1, window_size=4, use_mask_unit_attn=False)),
    ("mask_unit_attention", "s4-pool global 49/196 h8", 196, 2304, dict(heads=8, q_stride=4, window_size=1, use_mask_unit_attn=False)),
    ("mask_unit_attention", "s4 global 49 h8", 49, 2304, dict(heads=8, q_stride=1, window_size=1, use_mask_unit_attn=False)),
]
PROVIDERS = ["clone", "torch", "cpu"]


def call(op, x, kwargs, backend):
    if backend == "clone":
        return x.clone()
    return getattr(ops, op)(x, **kwargs, backend=backend)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_op(benchmark, case, provider, dtype, mode):
    op, label, tokens, channels, kwargs = case
    if provider == "clone" and op == "mask_unit_attention":
        pytest.skip("attention is compute-bound: its roofline is FLOPs, not a copy")
    if provider != "clone":
        reasons = backends.BACKENDS[provider].not_supported_reasons(op, torch.device("cpu"), dtype)
        if reasons:
            pytest.skip(f"{provider}: {'; '.join(reasons)}")
    benchmark.group = f"{op} {label} B={BATCH} {str(dtype)[6:]} {mode}"
    x = torch.randn(BATCH, tokens, channels, dtype=dtype, requires_grad=(mode == "fwd+bwd"))
    if mode == "fwd":
        with torch.no_grad():
            benchmark(call, op, x, kwargs, provider)
    else:
        grad = torch.randn_like(call(op, x.detach(), kwargs, provider))

        def step():
            out = call(op, x, kwargs, provider)
            # grad, not backward: no accumulation into x.grad inside the timing
            return torch.autograd.grad(out, x, grad)  # clone's backward is a copy of the gradient

        benchmark(step)
