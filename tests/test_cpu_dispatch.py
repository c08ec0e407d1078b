"""Run-time CPU dispatch of the C++ CPU kernels (csrc/cpu/cpu_dispatch.cpp).

One library holds a build of the kernels per instruction set (default x86-64, AVX2,
AVX-512, AVX-512 with BF16 dot products); the one in use follows ATen's capability
(ATEN_CPU_CAPABILITY), can be capped (HIERA_KERNELS_CPU_BUILD) and never exceeds what
the CPU has. Every build this CPU can run is run here, in a subprocess with both
variables set, against the "torch" path: permutations and pooling bit
for bit, attention and its gradient by the shared error rule. The built library is
disassembled to prove that no AVX2/AVX-512 instruction sits outside its own build.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from hiera_kernels._extension import EXTENSION

pytestmark = pytest.mark.skipif(not EXTENSION.loaded, reason=f"hiera_kernels._C is not built: {EXTENSION.error}")

BUILDS = ["default", "avx2", "avx512", "avx512_bf16"]  # HIERA_KERNELS_CPU_CAPABILITIES, least to most capable
ATEN_NAMES = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512", "avx512_bf16": "AVX512"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dispatch():
    from hiera_kernels import _C

    return _C.cpu_dispatch()


def test_reports_the_builds_and_the_one_in_use():
    info = dispatch()
    assert info["compiled"] == BUILDS
    assert info["supported"][0] == "default" and set(info["supported"]) <= set(BUILDS)
    assert info["path"] in info["supported"]
    assert [build in info["supported"] for build in BUILDS] == [lacks == "" for lacks in info["missing"]]
    import torch

    assert info["aten"] == torch.backends.cpu.get_cpu_capability()
    # Unforced, ATen takes the best it has, and so do the kernels (both use AVX2/AVX-512
    # only with FMA; the kernels' builds also need F16C, which every such CPU has).
    if "ATEN_CPU_CAPABILITY" not in os.environ and "HIERA_KERNELS_CPU_BUILD" not in os.environ:
        assert info["path"] == info["supported"][-1] and info["note"] == ""


@pytest.mark.parametrize(
    "aten_level, supported, chosen",
    [
        (2, [True, True, True, True], 3),
        (2, [True, True, True, False], 2),  # AVX-512 without BF16 (Skylake, Ice Lake)
        (1, [True, True, True, True], 1),  # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU
        (0, [True, True, True, True], 0),
        (2, [True, True, False, False], 1),  # asked for AVX-512 on an AVX2 CPU: never a build the CPU lacks
        (2, [True, False, False, False], 0),
        (1, [True, False, True, True], 0),
    ],
)
def test_the_rule_never_exceeds_aten_or_the_cpu(aten_level, supported, chosen):
    from hiera_kernels import _C

    assert _C.choose_cpu_build(aten_level, supported) == chosen


def test_an_unknown_build_cap_is_refused():
    env = dict(os.environ, HIERA_KERNELS_CPU_BUILD="avx1024")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", "from hiera_kernels import _C; _C.cpu_dispatch()"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "HIERA_KERNELS_CPU_BUILD=avx1024 is not a build of the CPU kernels (default, avx2, avx512, avx512_bf16)" in done.stderr


def test_the_rule_checks_its_input():
    from hiera_kernels import _C

    with pytest.raises(ValueError, match=r"choose_cpu_build: 2 flags for 4 builds"):
        _C.choose_cpu_build(2, [True, True])


# Run in a fresh interpreter per build: ATen reads ATEN_CPU_CAPABILITY once per process.
# Prints one JSON line: the dispatch report and every failure.
CHECK_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import hiera_kernels as hk
    from hiera_kernels import _C, ops
    from hiera_kernels.error_rule import judge

    torch.manual_seed(0)
    failures = []

    def exact(name, a, b):  # the same bytes (NaN included)
        if a.shape != b.shape or not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
            failures.append(f"{name}: not bit for bit equal to the torch path")

    def both(fn, x):
        results = []
        for backend in ["cpu", "torch"]:
            t = x.detach().clone().requires_grad_()
            out = fn(t, backend)
            grad = torch.arange(out.numel(), dtype=torch.float64).remainder(7).sub(3).view(out.shape).to(out.dtype)
            (g,) = torch.autograd.grad(out, t, grad)
            results.append((out.detach(), g))
        return results

    size, schedule = [16, 24], [(2, 2), (2, 2)]
    for dtype in [torch.float32, torch.float16, torch.bfloat16, torch.float64]:
        x = torch.randn(2, 16 * 24, 40).to(dtype)  # 40 channels: rows not a whole number of vectors
        for name, fn in [
            ("unroll", lambda t, b: ops.unroll(t, size, schedule, backend=b)),
            ("reroll", lambda t, b: ops.reroll(t, size, schedule, backend=b)),
        ]:
            (o1, g1), (o2, g2) = both(fn, x)
            exact(f"{name} {dtype}", o1, o2)
            exact(f"{name} backward {dtype}", g1, g2)
        x = torch.randint(-3, 4, (2, 4 * 300, 37)).to(dtype)  # ties; 300 * 37 elements: partial blocks
        x[0, 5, 3] = float("nan")
        x[1, 305, 3] = float("nan")
        (o1, g1), (o2, g2) = both(lambda t, b: ops.query_pool(t, 4, backend=b), x)
        exact(f"query_pool {dtype}", o1, o2)
        exact(f"query_pool backward {dtype}", g1, g2)

    # A pooled mask-unit block; global attention over several key blocks with an odd head
    # dim; a SAM 2 pooled window block with padded windows and a crop. (inputs, op)
    attention_cases = []
    for heads, head_dim, q_stride, window, use_mu, n in [(2, 48, 4, 16, True, 256), (3, 33, 1, 0, False, 300)]:
        attention_cases.append((f"mask_unit_attention {heads}x{head_dim} N={n}", torch.randn(2, n, 3 * heads * head_dim),
                                lambda t, b, a=(heads, q_stride, window, use_mu): ops.mask_unit_attention(t, *a, backend=b)))
    pad = torch.randn(3 * 2 * 40)
    attention_cases.append(("window_attention 2x40 13x11 window 8 pooled", torch.randn(2, 13, 11, 3 * 2 * 40),
                            lambda t, b: ops.window_attention(t, 2, 8, 2, pad=pad.to(t.dtype), backend=b)))
    for name, qkv, op in attention_cases:
        grad = torch.randn(op(qkv, "torch").shape)
        def run(dtype, backend):
            t = qkv.to(dtype).requires_grad_()
            out = op(t, backend)
            (g,) = torch.autograd.grad(out, t, grad.to(dtype))
            return out.detach(), g
        reference = run(torch.float64, "torch")
        for dtype in [torch.float32, torch.float16, torch.bfloat16]:
            for what, result, torch_result, ref in zip(["out", "dqkv"], run(dtype, "cpu"), run(dtype, "torch"), reference):
                verdict = judge(result, torch_result, ref)
                if not verdict.passed:
                    failures.append(f"{name} {dtype} {what}: {verdict.describe()}")
    # LayerNorm and its backward: rows of 40 and 7 channels (vector tails), 13 rows (partial
    # row blocks).
    for C in (40, 7):
        x, w, b, dy = torch.randn(13, C) * 3 + 2, torch.randn(C), torch.randn(C), torch.randn(13, C)
        def layer_norm_grads(fn, dtype):
            leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
            y = fn(*leaves)
            return [y.detach(), *torch.autograd.grad(y, leaves, dy.to(dtype))]
        plain = lambda *a: torch.nn.functional.layer_norm(a[0], (C,), *a[1:], 1e-6)
        kernel = lambda *a: torch.ops.hiera_kernels.layer_norm(*a, 1e-6)[0]
        reference = layer_norm_grads(plain, torch.float64)
        for dtype in [torch.float32, torch.float16, torch.bfloat16, torch.float64]:
            # float64's gradients: the reference is ATen's float64 itself, so only y (its
            # gradients are gradcheck's, in test_layer_norm.py).
            outputs = 1 if dtype == torch.float64 else 4
            for what, o, t, r in list(zip(["y", "dx", "dweight", "dbias"], layer_norm_grads(kernel, dtype),
                                          layer_norm_grads(plain, dtype), reference))[:outputs]:
                verdict = judge(o, t, r)
                if not verdict.passed:
                    failures.append(f"layer_norm {what} C={C} {dtype}: {verdict.describe()}")
        # The backward's fusions: y recomputed (the forward kernel's bits), a skip gradient
        # added to grad_x and its columns summed (the torch path: + skip, skip.sum(0)).
        skip = torch.randn(13, C)
        for dtype in [torch.float32, torch.float16, torch.bfloat16]:
            xs, ws, bs, dys, skips = (t.to(dtype) for t in (x, w, b, dy, skip))
            y, mean, rstd = torch.ops.hiera_kernels.layer_norm(xs, ws, bs, 1e-6)
            fused = torch.ops.hiera_kernels.layer_norm_backward(dys, xs, mean, rstd, ws, [True] * 3, bs, 1e-6, skips)
            exact(f"layer_norm_backward y C={C} {dtype}", fused[3], y)
            def skip_grads(dt):
                grads = torch.ops.aten.native_layer_norm_backward(
                    dys.to(dt), xs.to(dt), [C], mean.to(dt), rstd.to(dt), ws.to(dt), bs.to(dt), [True] * 3)
                return grads[0] + skips.to(dt), skips.to(dt).sum(0)
            for what, o, t, r in zip(["dx + skip", "skip sums"], (fused[0], fused[4]), skip_grads(dtype),
                                     skip_grads(torch.float64)):
                verdict = judge(o, t, r)
                if not verdict.passed:
                    failures.append(f"layer_norm_backward {what} C={C} {dtype}: {verdict.describe()}")
    # GELU recomputed with its backward and the bias gradient: 3 rows of 300 (vector and
    # block tails).
    h, g = torch.randn(3, 300) * 3, torch.randn(3, 300)
    def gelu_grads(dtype):
        grad_h = torch.ops.aten.gelu_backward(g.to(dtype), h.to(dtype))
        return torch.nn.functional.gelu(h.to(dtype)), grad_h, grad_h.sum(0)
    reference = gelu_grads(torch.float64)
    for dtype in [torch.float32, torch.float16, torch.bfloat16, torch.float64]:
        got = torch.ops.hiera_kernels.gelu_recompute_backward(g.to(dtype), h.to(dtype), True)
        for what, o, t, r in zip(["gelu", "grad_h", "grad_bias"], got, gelu_grads(dtype), reference):
            verdict = judge(o, t, r)
            if not verdict.passed:
                failures.append(f"gelu_recompute_backward {what} {dtype}: {verdict.describe()}")
    print(json.dumps({"dispatch": _C.cpu_dispatch(), "failures": failures}))
    """
)


def run_with_capability(build, script):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=ATEN_NAMES[build].lower(), HIERA_KERNELS_CPU_BUILD=build)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ATEN_CPU_CAPABILITY={build}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("build", BUILDS)
def test_every_build_matches_the_torch_path(build):
    info = dispatch()
    if build not in info["supported"]:
        lacks = info["missing"][info["compiled"].index(build)]
        pytest.skip(f"this CPU cannot run the {build} build: it lacks {lacks}")
    result = run_with_capability(build, CHECK_SCRIPT)
    assert result["dispatch"]["aten"] == ATEN_NAMES[build]
    assert result["dispatch"]["path"] == build, result["dispatch"]
    assert result["dispatch"]["note"] == f"HIERA_KERNELS_CPU_BUILD={build} caps the choice"
    assert not result["failures"], "\n".join(result["failures"])


# ----------------------------------------------------------------- the instructions
# In 64-bit mode an instruction whose first byte (after legacy prefixes) is 0x62 is
# EVEX-encoded (AVX-512), and one starting 0xC4/0xC5 is VEX-encoded (AVX/AVX2/FMA/F16C):
# those bytes mean nothing else there.
LEGACY_PREFIXES = {"66", "67", "f2", "f3", "f0", "2e", "36", "3e", "26", "64", "65"}
# The builds whose functions may hold each encoding.
MAY_HOLD = {"vex": ("avx2", "avx512", "avx512_bf16"), "evex": ("avx512", "avx512_bf16")}


def build_of(function):
    """The build a demangled function belongs to ("avx2" for "void
    hiera_kernels::cpu_avx2::(anonymous namespace)::gemm_rows<float>(long, ...)"), or None:
    the namespace before the parameter list, whatever the return type."""
    match = re.search(r"hiera_kernels::cpu_(\w+)::", function.split("(", 1)[0])
    return match.group(1) if match else None


def encodings_by_function(library):
    """{demangled function: {"vex", "evex"} it holds} over the library's code."""
    listing = subprocess.run(["objdump", "-d", "-C", "-w", library], capture_output=True, text=True, check=True).stdout
    found, function = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            found.setdefault(function, set())
            continue
        insn = re.match(r"^\s+[0-9a-f]+:\t([0-9a-f ]+)\t", line)
        if insn is None or function is None:
            continue
        code = [b for b in insn.group(1).split()]
        while code and code[0] in LEGACY_PREFIXES:
            code.pop(0)
        if code and code[0] == "62":
            found[function].add("evex")
        elif code and code[0] in ("c4", "c5"):
            found[function].add("vex")
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (GNU binutils) is not installed: cannot disassemble the library")
def test_no_avx_instruction_outside_its_build():
    """An inline function with external linkage compiled in the AVX-512 build could be
    the copy the linker keeps for every caller (csrc/cpu/kernels_impl.h): then the
    default or AVX2 build, or the entry points, would run AVX-512 code and fault on an
    AVX2 CPU. So: VEX only in the avx2/avx512/avx512_bf16 builds, EVEX only in the
    avx512 ones."""
    from hiera_kernels import _C

    found = encodings_by_function(_C.__file__)
    misplaced = [
        f"{encoding} in {function}"
        for function, encodings in found.items()
        for encoding in encodings
        if build_of(function) not in MAY_HOLD[encoding]
    ]
    assert not misplaced, "\n".join(misplaced[:20])
    # The check sees what it should: each build is there, and the vector builds hold
    # their instructions (the compiler did use the targets).
    def holding(build, encoding):
        return [f for f, e in found.items() if build_of(f) == build and encoding in e]

    assert any(build_of(f) == "default" for f in found)
    assert holding("avx2", "vex")
    assert holding("avx512", "evex") and holding("avx512_bf16", "evex")


def test_info_names_the_build_in_use():
    from hiera_kernels.tools.info import info

    lines = []
    info(print_fn=lines.append)
    d = dispatch()
    assert f"CPU kernels: {d['path']} (ATen {d['aten']}; compiled: {', '.join(d['compiled'])}; this CPU runs: {', '.join(d['supported'])})" in lines
