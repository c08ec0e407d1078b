"""Per-op CPU microbenchmarks at every Hiera-B/224 block shape (pytest-benchmark).

    python -m pytest bench/bench_ops.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group is one op at one shape, batch, dtype and mode (fwd, or fwd+bwd); its rows
are the backends that can run it, plus the rooflines: ``clone`` (a plain copy of
the same tensor, two in fwd+bwd: the memory-bandwidth limit) for the memory-bound ops, and for
attention ``official`` (the official package's own code between its Linears: 5-D
SDPA, which runs PyTorch's math path); for LayerNorm, ``torch`` is ATen's and ``cpu`` the
C++ kernel (:mod:`hiera_kernels.layer_norm`). Compare rows within one group of one run:
the machines here are shared and noisy. Batch: HIERA_BENCH_BATCH (default 8).
"""

import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hiera_kernels import backends, ops
from hiera_kernels.backends import EXTENSION

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    try:
        import hiera as official
    except ImportError:
        official = None

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
    # A block's LayerNorms: "torch" is ATen's (nn.LayerNorm), "cpu" hiera_kernels.layer_norm's C++ kernel.
    ("layer_norm", "stage1 3136x96", 3136, 96, {}),
    ("layer_norm", "stage2 784x192", 784, 192, {}),
    ("layer_norm", "stage3 196x384", 196, 384, {}),
    ("layer_norm", "stage4 49x768", 49, 768, {}),
]
PROVIDERS = ["clone", "official", "torch", "cpu"]


def official_attention(channels, heads, q_stride, window_size, use_mask_unit_attn):
    """The official MaskUnitAttention with its Linears replaced by identities: exactly
    its code between qkv and proj."""
    dim_out = channels // 3
    module = official.MaskUnitAttention(dim_out, dim_out, heads, q_stride, window_size, use_mask_unit_attn)
    module.qkv, module.proj = nn.Identity(), nn.Identity()
    return module


def make_call(op, channels, kwargs, provider):
    """The function to time, x -> output; reasons to skip come back as a string."""
    if provider == "clone":
        return (lambda x: x.clone()) if op != "mask_unit_attention" else "attention is compute-bound: no copy roofline"
    if provider == "official":
        if op != "mask_unit_attention" or official is None:
            return "official: attention only, and it needs hiera-transformer"
        return official_attention(channels, **kwargs)
    if op == "layer_norm":
        if provider not in ("torch", "cpu"):
            return f"{provider}: layer_norm has a CPU kernel only"
        if provider == "cpu" and not EXTENSION.loaded:
            return f"cpu: the C++ extension is not built ({EXTENSION.error})"
        weight, bias = torch.randn(channels), torch.randn(channels)
        cast = {}  # the parameters in x's dtype, cast once (outside the timing)

        def params(x):
            return cast.setdefault(x.dtype, (weight.to(x.dtype), bias.to(x.dtype)))

        if provider == "torch":
            return lambda x: F.layer_norm(x, (channels,), *params(x), 1e-6)
        return lambda x: torch.ops.hiera_kernels.layer_norm(x, *params(x), 1e-6)[0]
    fn = getattr(ops, op)
    return lambda x: fn(x, **kwargs, backend=provider)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_op(benchmark, case, provider, dtype, mode):
    op, label, tokens, channels, kwargs = case
    call = make_call(op, channels, kwargs, provider)
    if isinstance(call, str):
        pytest.skip(call)
    if provider in backends.BACKENDS and op in backends.OP_NAMES:
        reasons = backends.BACKENDS[provider].not_supported_reasons(op, torch.device("cpu"), dtype)
        if reasons:
            pytest.skip(f"{provider}: {'; '.join(reasons)}")
    benchmark.group = f"{op} {label} B={BATCH} {str(dtype)[6:]} {mode}"
    x = torch.randn(BATCH, tokens, channels, dtype=dtype, requires_grad=(mode == "fwd+bwd"))
    if mode == "fwd":
        with torch.no_grad():
            benchmark(call, x)
    elif provider == "clone":
        # A permutation's forward and backward each move the tensor once; autograd's
        # clone backward moves nothing, so the roofline is two explicit copies.
        grad = torch.randn_like(x.detach())
        benchmark(lambda: (x.detach().clone(), grad.clone()))
    else:
        grad = torch.randn_like(call(x.detach()))
        # grad, not backward: nothing accumulates into x.grad inside the timing.
        benchmark(lambda: torch.autograd.grad(call(x), x, grad))
