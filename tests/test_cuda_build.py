"""The CUDA kernels (csrc/cuda) for unroll, reroll and query_pool.

Wherever torch has CUDA and nvcc is installed, GPU or not: the extension was built with
them, every kernel source (csrc/cuda/*.cu, attention one layout and head dim per file)
is compiled in, each op has a CUDA kernel registered, and the entry points run their
host-side checks (the attention ops': test_cuda_attention.py). On a GPU: the "cuda" backend equals the "torch" backend bit for bit, values and
gradients, at every Hiera geometry, ties and NaN included.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch

import hiera_kernels as hk
from hiera_kernels import library, ops
from hiera_kernels._extension import EXTENSION
from hiera_kernels.tools import report
from hiera_kernels.tools.info import info

from helpers import DTYPES, GEOMETRIES, kernel_for, mu_size, random_geometry, requires_gpu, stage_geometries, token_grid

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or shutil.which("nvcc") is None,
    reason="the CUDA kernels are built only where torch has CUDA and nvcc is on PATH",
)

KERNEL_OPS = ["unroll", "reroll", "query_pool", "query_pool_backward", "mask_unit_attention",
              "mask_unit_attention_backward", "window_attention", "window_attention_backward"]
CUDA_OPS = ("unroll", "reroll", "query_pool", "mask_unit_attention", "window_attention")  # the "cuda" backend's share of hk.ops


def test_extension_was_built_with_cuda():
    assert EXTENSION.loaded, EXTENSION.error
    assert EXTENSION.with_cuda, "hiera_kernels._C lacks csrc/cuda: rebuild with nvcc on PATH and HIERA_KERNELS_SKIP_CUDA unset"


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hiera_kernels::{op}", "CUDA")


@pytest.mark.skipif(report.find_cuobjdump() is None, reason="needs cuobjdump (PATH, CUDA_HOME or Triton's)")
def test_every_kernel_source_is_compiled_in():
    """Each csrc/cuda/*.cu put its kernels into the extension, the attention ones for
    their layout: a source missing from the build (setup.py globs them) or an
    instantiation missing from its file shows here, without a GPU."""
    assert EXTENSION.loaded, EXTENSION.error
    rows = report.cuda_kernel_usage(sys.modules["hiera_kernels._C"].__file__)
    sources = {p.name for p in (Path(report.ROOT) / "csrc" / "cuda").glob("*.cu")}
    assert sources <= {r["source"] for r in rows}
    for source in sources:
        kernels = {r["kernel"] for r in rows if r["source"] == source}
        layout = "WindowLayout" if source.startswith("window_attention") else "AttentionLayout" if "attention" in source else None
        if layout:  # forward, delta, dq, dk/dv (and grad_pad) in three dtypes
            for kernel in ("forward_kernel", "delta_kernel", "dq_kernel", "dkdv_kernel"):
                assert sum(kernel in k and layout in k for k in kernels) == 3, (source, kernel, sorted(kernels))


# The shared argument checks (geometry.h, pool_args.h, attention_checks.h) run in both
# the CPU and the CUDA entry points: tests/test_errors_and_backends.py
# (test_raw_ops_check_every_argument) calls each through both.


@pytest.mark.parametrize(
    "op, args, name",
    [
        ("unroll", (torch.randn(2, 64, 4), [8, 8], [2, 2], False), "x"),
        ("reroll", (torch.randn(2, 64, 4), [8, 8], [2, 2], True), "x"),
        ("query_pool", (torch.randn(2, 8, 4), 4), "x"),
        ("query_pool_backward", (torch.randn(2, 2, 4), torch.zeros(2, 2, 4, dtype=torch.uint8), 4), "grad_out"),
    ],
)
def test_cuda_entry_points_refuse_tensors_off_the_gpu(op, args, name):
    with pytest.raises(RuntimeError, match=rf"hiera_kernels::{op}: {name} must be a CUDA tensor, got one on cpu"):
        kernel_for("CUDA", op, *args)


def test_cuda_backend_is_built_and_chosen_by_name_only():
    cuda = hk.backends.BACKENDS["cuda"]
    assert set(CUDA_OPS) <= set(cuda.OPS)
    no_gpu = [] if torch.cuda.is_available() else ["no CUDA device is available (torch.cuda.is_available() is False)"]
    for op in CUDA_OPS:
        assert cuda.not_supported_reasons(op, torch.device("cuda"), torch.float16) == no_gpu
        assert cuda.not_supported_reasons(op, torch.device("cpu"), torch.float16) == ["runs on cuda tensors, not cpu"]
    assert "cuda" not in hk.backends.AUTO_ORDER["cuda"]  # until the kernels have run on a GPU


def test_info_shows_the_cuda_backend():
    lines = []
    info(print_fn=lines.append)
    assert "extension hiera_kernels._C: loaded; CUDA sources compiled in: True" in lines
    cpu_section, cuda_section = "\n".join(lines).split("cuda tensors (auto order:")
    assert "  cuda    ops [unroll, reroll, query_pool" in cpu_section
    assert "unavailable: runs on cuda tensors, not cpu" in next(line for line in cpu_section.splitlines() if line.startswith("  cuda "))
    cuda_line = next(line for line in cuda_section.splitlines() if line.startswith("  cuda "))
    if torch.cuda.is_available():
        assert "available by name only (auto skips it)" in cuda_line
    else:
        assert "unavailable: no CUDA device is available" in cuda_line


# --------------------------------------------------------------------------- on a GPU
def assert_cuda_matches_torch(fn, x):
    """``fn(x, backend)`` on the "cuda" backend equals it on the "torch" backend bit for
    bit: the output, and the gradient for one shared upstream gradient."""
    x_cuda, x_torch = (x.detach().clone().requires_grad_() for _ in range(2))
    out_cuda, out_torch = fn(x_cuda, "cuda"), fn(x_torch, "torch")
    torch.testing.assert_close(out_cuda, out_torch, atol=0, rtol=0, equal_nan=True)
    grad = torch.randn_like(out_torch)
    (g_cuda,) = torch.autograd.grad(out_cuda, x_cuda, grad)
    (g_torch,) = torch.autograd.grad(out_torch, x_torch, grad)
    torch.testing.assert_close(g_cuda, g_torch, atol=0, rtol=0, equal_nan=True)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_unroll_reroll_match_torch_every_stage(geometry, dtype):
    size, schedule = token_grid(geometry)
    x = torch.randn(2, torch.Size(size).numel(), 96, device="cuda").to(dtype)
    assert_cuda_matches_torch(lambda t, b: ops.unroll(t, size, schedule, backend=b), x)
    for _, size, schedule, _ in stage_geometries(geometry):
        x = torch.randn(2, torch.Size(size).numel(), 40, device="cuda").to(dtype)
        assert_cuda_matches_torch(lambda t, b: ops.reroll(t, size, schedule, backend=b), x)
        units = torch.Size(size).numel() // mu_size(schedule, len(size))
        mask = torch.ones(2, units, dtype=torch.bool, device="cuda")
        kept = torch.randn(2, max(1, units // 3) * mu_size(schedule, len(size)), 40, device="cuda").to(dtype)
        assert_cuda_matches_torch(lambda t, b: ops.reroll(t, size, schedule, mask, backend=b), kept)


@requires_gpu
@pytest.mark.parametrize("channels, dtype, offset", [(96, torch.bfloat16, 0), (100, torch.float16, 0), (5, torch.float32, 0), (3, torch.float16, 0), (96, torch.float16, 1), (96, torch.float32, 2)])
def test_unroll_every_access_width(channels, dtype, offset):
    """16-byte rows and base addresses take 16-byte accesses; odd row sizes and storage
    offsets take the narrower paths (8, 4, 2 bytes)."""
    size, schedule = [16, 24], [(2, 2), (2, 2)]
    base = torch.randn(2 * 16 * 24 * channels + offset, device="cuda").to(dtype)
    x = base[offset:].view(2, 16 * 24, channels)
    assert_cuda_matches_torch(lambda t, b: ops.unroll(t, size, schedule, backend=b), x)
    assert_cuda_matches_torch(lambda t, b: ops.reroll(t, size, schedule, backend=b), x)


@requires_gpu
@pytest.mark.parametrize("seed", range(16))
def test_random_sweep(seed):
    x, size, schedule = random_geometry(seed)
    x = x.cuda()
    assert_cuda_matches_torch(lambda t, b: ops.unroll(t, size, schedule, backend=b), x)
    assert_cuda_matches_torch(lambda t, b: ops.reroll(t, size, schedule, backend=b), x)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, stride", [((2, 3136, 96), 4), ((8, 784, 192), 4), ((3, 196, 56), 4), ((1, 49, 7), 1), ((2, 30, 5), 3), ((2, 392 * 4, 8), 4), ((1, 512, 3), 256)])
def test_query_pool_matches_torch(dtype, shape, stride):
    assert_cuda_matches_torch(lambda t, b: ops.query_pool(t, stride, backend=b), torch.randn(shape, device="cuda").to(dtype))


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_query_pool_ties_and_nan_route_like_pytorch(dtype):
    x = torch.randint(0, 3, (2, 64, 16), device="cuda").to(dtype)  # many ties
    x[0, 5, 3] = float("nan")
    x[1, 5 + 16, 3] = float("nan")
    x[1, 5 + 32, 3] = float("nan")  # two NaNs in one window: the first wins
    x[0, 9, :] = float("-inf")
    assert_cuda_matches_torch(lambda t, b: ops.query_pool(t, 4, backend=b), x)
    _, argmax = library.OPS["query_pool"](x, 4)
    assert argmax[1, 5, 3] == 1 and argmax[0, 5, 3] == 0


@requires_gpu
def test_query_pool_scalar_path_non_contiguous_and_empty():
    base = torch.randn(2 * 64 * 16 + 1, device="cuda")
    assert_cuda_matches_torch(lambda t, b: ops.query_pool(t, 4, backend=b), base[1:].view(2, 64, 16))  # misaligned
    assert_cuda_matches_torch(lambda t, b: ops.query_pool(t, 4, backend=b), torch.randn(2, 12, 64, device="cuda").transpose(1, 2))
    for shape in [(0, 16, 4), (2, 16, 0)]:
        assert ops.query_pool(torch.randn(shape, device="cuda"), 4, backend="cuda").shape == (shape[0], 4, shape[2])
        assert ops.unroll(torch.randn(shape, device="cuda"), [4, 4], [(2, 2)], backend="cuda").shape == shape


@requires_gpu
def test_float64_gradcheck_and_opcheck():
    """float64 (for gradcheck) through the kernel ops: the "cuda" backend itself takes the
    float dtypes the whole model runs in."""
    x = torch.randn(2, 32, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    for op in ["unroll", "reroll"]:
        assert torch.autograd.gradcheck(lambda t: library.OPS[op](t, [4, 8], [2, 2], False), (x,))
        torch.library.opcheck(library.OPS[op], (x, [4, 8], [2, 2], False))
    assert torch.autograd.gradcheck(lambda t: library.OPS["query_pool"](t, 4)[0], (x,))
    torch.library.opcheck(library.OPS["query_pool"], (x, 4))
    out, argmax = library.OPS["query_pool"](x.detach(), 4)
    torch.library.opcheck(library.OPS["query_pool_backward"], (torch.randn_like(out), argmax, 4))


@requires_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_device_and_checks_argmax_device():
    x = torch.randn(2, 64, 8, device="cuda:1")
    with torch.cuda.device(0):
        assert_cuda_matches_torch(lambda t, b: ops.unroll(t, [8, 8], [(2, 2)], backend=b), x)
        assert_cuda_matches_torch(lambda t, b: ops.query_pool(t, 4, backend=b), x)
        out, argmax = library.OPS["query_pool"](x, 4)
        with pytest.raises(RuntimeError, match=r"query_pool_backward: argmax must be on grad_out's device cuda:0, got one on cuda:1"):
            library.OPS["query_pool_backward"](out.to("cuda:0"), argmax, 4)
