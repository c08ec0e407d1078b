"""Compile every Triton kernel specialization for real GPUs, with no GPU present.

``python -m hiera_kernels.triton.aot [--arch 80 90] [--jobs N] [--quick]`` compiles, for each
target, every specialization the launchers can produce and prints the compile
metadata (shared memory; registers and spills from ptxas). Must run without
``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).

A specialization is what the launchers choose: the dtype, the constexprs (head-dim
block, digit count, direction, ...) and, for autotuned kernels, every config. The
launchers are run on meta tensors under :func:`common.recording`, so the argument
types come from the launchers themselves; :func:`launcher_specializations` records
what they launch for real inputs, and the tests check it is covered here. Value
specializations the JIT adds at run time are compiled in their common case only:
runtime ints as i32 (the JIT passes i64 from 2**31 up, and makes ints equal to 1
constants) and pointers 16-byte aligned (torch's allocations).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, NamedTuple, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

# Triton's compile API moved between 3.2 (the oldest Triton that torch>=2.6 pins) and
# today's: both are spelled out here rather than dropping the older one.
try:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
except ImportError:  # Triton 3.2: the backend's own ptxas lookup; sm_90 compiles as sm_90a
    from triton.backends.nvidia.compiler import _path_to_binary

    def _ptxas_path(capability: int) -> str:
        return _path_to_binary("ptxas")[0]

    def _gpu_name(capability: int) -> str:
        return "sm_90a" if capability == 90 else f"sm_{capability}"
else:
    def _ptxas_path(capability: int) -> str:
        return get_ptxas(capability).path

    _gpu_name = sm_arch_from_capability
# Triton >= 3.3: every argument in the signature ("constexpr" for constexprs), the
# constexprs by name and attributes per argument index; 3.2: runtime arguments only,
# the constexprs as "constants" and an AttrsDescriptor.
_NEW_AST_SOURCE = "constexprs" in inspect.signature(ASTSource.__init__).parameters

from . import common, mask_unit_attention, query_pool, token_order, window_attention

_PTR = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
        torch.int32: "i32", torch.int16: "i16", torch.uint8: "u8"}


class Specialization(NamedTuple):
    kernel: str                 # the kernel function's name
    signature: Tuple            # ((arg name, type), ...) for runtime args, constexprs excluded
    constexprs: Tuple           # ((name, value), ...)
    options: Tuple              # (("num_warps", w), ("num_stages", s))


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, tuple):
        return tuple(_arg_type(v) for v in value)
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _jit_function(kernel):
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def _expand(kernel, args, constexprs) -> Iterable[Specialization]:
    """One launch -> its specializations: one per autotune config (the interpreter's
    single config excluded: these are the GPU configs)."""
    fn = _jit_function(kernel)
    runtime = [n for n in fn.arg_names if n not in constexprs and not _is_config_arg(kernel, n)]
    signature = tuple(zip(runtime, (_arg_type(a) for a in args)))
    configs = _gpu_configs(kernel)
    for config in configs:
        merged = dict(constexprs, **config.kwargs)
        yield Specialization(fn.__name__, signature, tuple(sorted(merged.items())),
                             (("num_warps", config.num_warps), ("num_stages", config.num_stages)))


def _gpu_configs(kernel):
    attention = (mask_unit_attention.KERNELS, window_attention.KERNELS)  # (forward, backward kv, backward q)
    for configs, tuned in ((mask_unit_attention.FORWARD_CONFIGS, [k[0] for k in attention]),
                           (mask_unit_attention.BACKWARD_CONFIGS, [b for k in attention for b in k[1:]])):
        if any(kernel is k for k in tuned):
            return configs
    return [triton.Config({}, num_warps=4, num_stages=3)]  # triton.jit's defaults


def _is_config_arg(kernel, name) -> bool:
    return any(name in c.kwargs for c in _gpu_configs(kernel))


def _record(run) -> List[Specialization]:
    launches: List = []
    with common.recording(launches):
        run()
    return [s for kernel, args, constexprs in launches for s in _expand(kernel, args, constexprs)]


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def all_specializations(quick: bool = False) -> List[Specialization]:
    """Every specialization the launchers can produce, from the launchers' own choices.
    ``quick``: SAM 2's window attention at head dim 96 only: its tiles and constexprs are
    mask-unit attention's, compiled at every head dim, so the other head dims add compile
    time (about 40% more in all), not coverage of the window index math."""
    specs: Dict[Specialization, None] = {}
    dtypes = list(common.TL_DTYPES)

    def add(run):
        for s in _record(run):
            specs[s] = None

    # unroll/reroll: rows move as int64/int32/int16 words (whichever tiles a row:
    # 8 fp32 channels, 1 fp32 channel, 1 fp16 channel), every digit-count bucket: a
    # 1-D schedule of `digits` steps of 2 over 2**digits tokens has exactly `digits`.
    for channels, dtype in ((8, torch.float32), (1, torch.float32), (1, torch.float16)):
        for digits in range(token_order.DIGIT_BUCKET, token_order.MAX_DIGITS + 1, token_order.DIGIT_BUCKET):
            size, strides = [2 ** digits], [2] * digits
            for fn in (token_order.unroll, token_order.reroll):
                add(lambda fn=fn: fn(_meta(1, 2 ** digits, channels, dtype=dtype), size, strides, False))
    for dtype in dtypes:
        add(lambda: query_pool.query_pool(_meta(1, 4, 8, dtype=dtype), 2))
        add(lambda: query_pool.query_pool_backward(_meta(1, 2, 8, dtype=dtype), _meta(1, 2, 8, dtype=torch.uint8), 2))
    # attention: every specialized head dim and every generic head-dim block, with and
    # without dq fused into the kv kernel.
    generic = (8, 40, 100)  # blocks of 32, 64 and 128
    for dtype in dtypes:
        for head_dim in mask_unit_attention.SPECIALIZED_HEAD_DIMS + generic:
            for tokens in (64, 256):  # 64 keys: one key block (dq fused); 256: a dq kernel too
                add(lambda: _attention(dtype, head_dim, tokens))
            # SAM 2 (the same constexprs): 8x8 windows (one key block, dq fused) and a
            # global 16x16 map (a dq kernel too).
            for window_size in (8, 0):
                if not quick or head_dim == 96:
                    add(lambda: _window_attention(dtype, head_dim, 16, window_size))
    return list(specs)


def _attention(dtype, head_dim, tokens, heads=1, q_stride=1, windows=1):
    qkv = _meta(1, tokens, 3 * heads * head_dim, dtype=dtype)
    out, lse, q_argmax = mask_unit_attention.forward(qkv, heads, q_stride, windows)
    mask_unit_attention.backward(torch.empty_like(out), qkv, out, lse, q_argmax, heads, q_stride, windows)


def _window_attention(dtype, head_dim, side, window_size, heads=1, q_stride=1):
    qkv = _meta(1, side, side, 3 * heads * head_dim, dtype=dtype)
    pad = _meta(3 * heads * head_dim, dtype=dtype)
    out, lse, q_argmax = window_attention.forward(qkv, pad, heads, window_size, q_stride)
    window_attention.backward(torch.empty_like(out), qkv, pad, out, lse, q_argmax, heads, window_size, q_stride)


def launcher_specializations(cases: Iterable) -> List[Specialization]:
    """What the launchers launch for ``cases``: callables running ops on meta tensors."""
    return [s for run in cases for s in _record(run)]


# -------------------------------------------------------------------- compiling
_KERNELS = {
    "_move_rows_kernel": token_order._move_rows_kernel,
    "_query_pool_kernel": query_pool._query_pool_kernel,
    "_query_pool_backward_kernel": query_pool._query_pool_backward_kernel,
    "_attention_forward_kernel": mask_unit_attention._attention_forward_kernel,
    "_attention_backward_kv_kernel": mask_unit_attention._attention_backward_kv_kernel,
    "_attention_backward_q_kernel": mask_unit_attention._attention_backward_q_kernel,
    "_window_forward_kernel": window_attention._window_forward_kernel,
    "_window_backward_kv_kernel": window_attention._window_backward_kv_kernel,
    "_window_backward_q_kernel": window_attention._window_backward_q_kernel,
}
# The backward kv kernels common.SM90_HALF_BACKWARD_ABORTS is about.
_ABORTING_KERNELS = ("_attention_backward_kv_kernel", "_window_backward_kv_kernel")


def compile_one(spec: Specialization, arch: int, ptxas_report: bool = False) -> Dict:
    """Compile one specialization for ``sm_<arch>``; return its metadata (registers and
    spills only with ``ptxas_report``: they take a second ptxas run)."""
    fn = _KERNELS[spec.kernel]
    start = time.perf_counter()
    compiled = triton.compile(_source(fn, dict(spec.signature), dict(spec.constexprs)),
                              target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
    seconds = time.perf_counter() - start
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch) if ptxas_report else (None, None)
    return {"kernel": spec.kernel, "arch": f"sm_{arch}", "constexprs": dict(spec.constexprs),
            "dtypes": sorted({t for _, t in spec.signature if isinstance(t, str) and t.startswith("*")}),
            **dict(spec.options), "shared_bytes": compiled.metadata.shared, "registers": registers,
            "spill_bytes": spills, "cubin_bytes": len(compiled.asm["cubin"]), "seconds": round(seconds, 2)}


def _source(fn, runtime: Dict, constexprs: Dict) -> ASTSource:
    """What the JIT would compile for these argument types and constexprs, with every
    pointer 16-byte aligned, as the JIT specializes them for torch's allocations."""
    pointers = [i for i, name in enumerate(fn.arg_names)
                if isinstance(runtime.get(name), str) and runtime[name].startswith("*")]
    if _NEW_AST_SOURCE:
        signature = {name: runtime[name] if name in runtime else "constexpr" for name in fn.arg_names}
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                         attrs={(i,): [["tt.divisibility", 16]] for i in pointers})
    from triton.backends.compiler import AttrsDescriptor

    signature = {name: runtime[name] for name in fn.arg_names if name in runtime}
    return ASTSource(fn=fn, signature=signature, constants=constexprs,
                     attrs=AttrsDescriptor.from_hints({i: 16 for i in pointers}))


def _ptxas_usage(ptx: str, capability: int):
    """Registers and spill stores per thread, from ``ptxas -v`` on the compiled PTX with
    the ptxas and target Triton used (its metadata has them only once loaded on a GPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([_ptxas_path(capability), "-v", f"--gpu-name={_gpu_name(capability)}",
                                 path, "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return (int(registers.group(1)) if registers else None, int(spills.group(1)) if spills else None)


def _aborts(spec: Specialization, arch: int) -> bool:
    """Whether this Triton's compiler is known to abort on ``spec`` for ``sm_<arch>``."""
    half = any(t in ("*fp16", "*bf16") for _, t in spec.signature if isinstance(t, str))
    return common.SM90_HALF_BACKWARD_ABORTS and arch // 10 == 9 and half and spec.kernel in _ABORTING_KERNELS


def _compile_job(job):
    return compile_one(*job)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hiera_kernels.triton.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default: 80 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--ptxas-report", action="store_true", help="also registers and spills (a second ptxas run)")
    parser.add_argument("--quick", action="store_true", help="window attention at head dim 96 only (see all_specializations)")
    args = parser.parse_args(argv)
    if common.INTERPRETED:
        print("error: TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it", file=sys.stderr)
        return 2
    specs = all_specializations(args.quick)
    if not common.TUPLE_ARGUMENTS:
        skipped = [s for s in specs if s.kernel == "_move_rows_kernel"]
        specs = [s for s in specs if s.kernel != "_move_rows_kernel"]
        print(f"skipping {len(skipped)} _move_rows_kernel specializations: {common.NO_TUPLE_ARGUMENTS}")
    jobs = [(s, arch, args.ptxas_report) for arch in args.arch for s in specs if not _aborts(s, arch)]
    aborting = [(s, arch) for arch in args.arch for s in specs if _aborts(s, arch)]
    if aborting:
        print(f"skipping {len(aborting)} attention backward kv specializations: {common.SM90_HALF_BACKWARD_ABORTS_REASON}")
    print(f"compiling {len(specs)} specializations x {len(args.arch)} targets, {len(jobs)} kernels, {args.jobs} jobs")
    start = time.perf_counter()
    results: List[Dict] = []
    failed: List = []   # (job, exception)
    crashed: List = []  # jobs of a pool that a dying compiler process broke
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_compile_job, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            try:
                results.append(future.result())
            except concurrent.futures.process.BrokenProcessPool:
                crashed.append(futures[future])
            except Exception as exc:  # report every failure, then fail
                failed.append((futures[future], exc))
    # A compiler that aborts (an assertion in Triton's C++) kills its process and breaks
    # the whole pool, failing every job still pending: rerun those one process each, so
    # that the ones that crash the compiler are named and the others still compile.
    if crashed:
        print(f"a compiler process died; compiling the {len(crashed)} jobs it left one process each", file=sys.stderr)
    for job in crashed:
        with concurrent.futures.ProcessPoolExecutor(1) as one:
            try:
                results.append(one.submit(_compile_job, job).result())
            except Exception as exc:
                failed.append((job, exc))
    for (spec, arch, _), exc in failed:
        dtypes = sorted({t for _, t in spec.signature if isinstance(t, str) and t.startswith("*")})
        what = "the compiler process died (its message is above)" if isinstance(exc, concurrent.futures.process.BrokenProcessPool) else f"{type(exc).__name__}: {exc}"
        print(f"FAILED {spec.kernel} sm_{arch} {','.join(dtypes)} {dict(spec.constexprs)} {dict(spec.options)}: {what}", file=sys.stderr)
    failures = len(failed)
    results.sort(key=lambda r: (r["arch"], r["kernel"], sorted(r["constexprs"].items()).__repr__(), r["dtypes"], r["num_warps"]))
    print(f"{'arch':6} {'kernel':32} {'dtypes':18} {'constexprs':60} {'warps':>5} {'stages':>6} "
          f"{'smem B':>7} {'regs':>5} {'spill B':>7}")
    for r in results:
        constexprs = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k != "PRECISION")
        print(f"{r['arch']:6} {r['kernel']:32} {','.join(r['dtypes']):18} {constexprs:60} {r['num_warps']:>5} "
              f"{r['num_stages']:>6} {r['shared_bytes']:>7} {str(r['registers']):>5} {str(r['spill_bytes']):>7}")
    print(f"{len(results)} compiled, {failures} failed, {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
