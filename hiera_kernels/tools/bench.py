"""``python -m hiera_kernels bench``: the whole model, side by side in one run.

Rows: the official package in eager mode (when installed), hiera-optim (when
installed: the official model patched by ``hiera_optim.optimize``), then
hiera_kernels on each backend that can run the whole model on the device, and
``"auto"``; with ``compile``, also the official model, hiera-optim and
hiera_kernels on ``"auto"`` under ``torch.compile`` (compiled during warm-up).
A row whose model cannot be built or run says why in its note. Every row
runs the same random weights on the same batch; after warm-up the rows are timed
round-robin, one step each per round in an order shuffled each round (seeded: the same
on every run; see :func:`interleaved_medians`), and each reports its median. The GEMM
floor is the time of the model's Linears and patch conv alone, each run on an
input of the shape it sees in the model, the Linears as ``"auto"`` runs them (for
CPU inference: bias inside oneDNN's GEMM, :mod:`hiera_kernels.epilogues`): what no
fusion of the other ops can beat. With ``compile``, an inference-only row compiles
with inductor's freezing; with ``memory`` (and ``input_size``), each eager row's peak
memory over one step is measured in a fresh process (:mod:`.peak_memory`). Two device-independent columns come from
:mod:`hiera_kernels.tools.traffic`: bytes moved outside GEMM/conv in one forward
(what predicts memory-bound time on a GPU) and activation bytes saved for the
backward (training rows).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, TextIO

import torch
import torch.nn as nn

from .. import backends, epilogues, error_rule, models
from .chart import write_chart
from .steps import run_step
from .peak_memory import peak_mb
from .traffic import bytes_moved, saved_activation_bytes

FLOOR_NAME = "GEMM floor (Linears + conv alone)"
PEAK_COLUMN = "peak MB (one step, own process)"


@dataclass
class Row:
    name: str
    mode: str
    ms: Optional[float]  # None: the row failed (see note)
    images_per_s: Optional[float]
    speedup: Optional[float]  # against the official eager row
    vs_gemm_floor: Optional[float]
    max_abs_err: Optional[float]  # logits against hiera_kernels on "torch" in float64
    err_limit: Optional[float] = None  # the error rule's limit for max_abs_err (hiera_kernels.error_rule)
    moved_mb: Optional[float] = None  # bytes read + written outside GEMM/conv, one forward
    saved_mb: Optional[float] = None  # activations saved for the backward, one training forward
    note: str = ""
    peak_mb: Optional[float] = None  # --memory: peak memory growth over one step, in a fresh process (tools/peak_memory.py)


@dataclass
class Contender:
    """The model behind a timed row. ``backend`` is the hiera_kernels backend set before
    each step ("" for other packages' models); ``error`` is why the model could not be built."""

    label: str
    model: Optional[nn.Module]
    backend: str = ""
    error: Optional[Exception] = None
    note: str = ""  # how the row was run, when that needs saying
    infer_only: bool = False  # a row that means nothing under autograd (inductor freezing)
    memory: Optional[dict] = None  # how tools/peak_memory.py rebuilds this row ("kind", "backend"); None: not measured


def built(label: str, build: Callable[[], nn.Module], note: str = "") -> Contender:
    """A contender running ``build()``'s model, or one that carries why ``build()`` failed."""
    try:
        return Contender(label, build(), note=note)
    except Exception as exc:
        return Contender(label, None, error=exc)


# hiera-optim 0.2.1 on hiera-transformer 0.1.4, unmodified, needs two things (spec §12):
# it resolves the official symbols once, at its import, from ``hiera`` or ``hiera.hiera``,
# and this release keeps ``apply_fusion_head`` in ``hiera.hiera_mae`` only; and its
# patched forward reads ``_grad_checkpointing``, which this release's ``Hiera`` lacks.
HIERA_OPTIM_NOTE = "hiera.apply_fusion_head set for its import; _grad_checkpointing=False"


@contextlib.contextmanager
def official_symbols_for_hiera_optim(official) -> Iterator[None]:
    """``hiera.apply_fusion_head`` (from ``hiera.hiera_mae``) while hiera-optim is imported
    and applied; afterwards ``hiera`` is as it was, for every other row."""
    missing = object()
    saved = getattr(official, "apply_fusion_head", missing)
    if saved is missing:
        official.apply_fusion_head = official.hiera_mae.apply_fusion_head
    try:
        yield
    finally:
        if saved is missing:
            del official.apply_fusion_head


def build_hiera_optim(official_model: nn.Module) -> nn.Module:
    """hiera-optim's model: it builds none of its own but patches an official model in
    place (``optimize``: 4-D SDPA attention, gather instead of boolean-mask indexing), so
    it runs on a copy of the official row's model, weights included, with its default flags."""
    import hiera as official

    model = copy.deepcopy(official_model)
    model._grad_checkpointing = False  # read by hiera-optim's forward; on this instance only
    with official_symbols_for_hiera_optim(official):
        import hiera_optim

        return hiera_optim.optimize(model, verbose=False)


def failure_note(exc: Exception, limit: int = 80) -> str:
    """A failed row's note: the exception's class and the first line of its message, cut
    to ``limit`` characters (the whole message is printed above the table)."""
    first_line = next(iter(str(exc).splitlines()), "")
    note = f"failed: {type(exc).__name__}: {first_line}"
    return note if len(note) <= limit else note[: limit - 3] + "..."


class Progress:
    """One stderr line redrawn in place (carriage return): a bar, the step under way and
    the seconds since the start. Drawn only when enabled and stderr is a terminal, so
    logs, pipes and tests stay clean."""

    WIDTH = 20

    def __init__(self, total: int, enabled: bool = True, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.total, self.done, self.shown = total, 0, 0
        self.start = time.perf_counter()

    def step(self, what: str) -> None:
        """Show ``what`` as the step under way; the steps shown before it count as done."""
        if self.enabled:
            filled = self.WIDTH * self.done // self.total
            line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} {what} ({time.perf_counter() - self.start:.0f} s)"
            line = line[: shutil.get_terminal_size().columns - 1]  # a wrapped line could not be redrawn
            self.stream.write("\r" + line.ljust(self.shown))
            self.stream.flush()
            self.shown = len(line)
        self.done += 1

    def clear(self) -> None:
        """Erase the line, so that what is printed next starts on a clean one."""
        if self.enabled and self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0


def cpuinfo() -> str:
    """The text of /proc/cpuinfo; "" where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on GPUs; on CPUs bfloat16 where they have native bf16 arithmetic, else float32."""
    if device.type == "cuda":
        return torch.float16
    flags = cpuinfo()
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (its architecture where the OS does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines() if line.startswith("model name")), "")
    return model or platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(steps: Dict[str, Callable[[], object]], device, iters: int,
                        before_round: Callable[[int], None] = lambda i: None, seed: int = 0) -> Dict[str, float]:
    """Median ms of each step, timed round-robin (every round runs every step once), so
    that the drift of a shared machine falls on all rows alike instead of on whichever
    row happened to run during a slow minute; each round in its own order (shuffled with
    ``seed``: the same orders on every run), so that no row always runs right after the
    same one. A step's time depends on the state the step before leaves (caches, the
    allocator's heap): on Hiera-B bf16 training steps (CPU), compiled ``auto`` took 704.5
    ms median right after eager ``auto`` and 715.8 right after official eager, eager
    ``auto`` 721.2 after compiled and 715.6 after official (6 rounds each, interleaved).
    ``before_round(i)`` is told each round's start."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    order, shuffle = list(steps), random.Random(seed).shuffle
    for i in range(iters):
        before_round(i)
        shuffle(order)
        for name in order:
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def floor_module(mod: nn.Module) -> nn.Module:
    """The module the floor runs: a Linear pinned to "auto" (for inference, bias inside
    oneDNN's GEMM where hiera_kernels.epilogues is available: the fastest GEMM the model
    has), a shallow copy so that the backend the rows set on the shared model between
    rounds cannot change what the floor measures."""
    if isinstance(mod, epilogues.Linear):
        mod = copy.copy(mod)
        mod.backend = "auto"
    return mod


def gemm_floor_step(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    """The model's Linears and convs alone, each on an input of the shape it sees."""
    calls = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: calls.append((floor_module(mod), args[0].detach().clone())))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))
    ]
    try:
        with torch.no_grad():
            model.set_backend("torch")(x)  # any backend that runs: only the inputs' shapes matter
    finally:
        for h in hooks:
            h.remove()

    def run():
        for mod, inp in calls:
            if train:
                inp = inp.requires_grad_()
                out = mod(inp)
                torch.autograd.backward(out, torch.ones_like(out))
            else:
                with torch.no_grad():
                    mod(inp)

    return run


def bench(
    model_name: str = "hiera_base_224",
    batch: int = 8,
    dtype: Optional[torch.dtype] = None,
    device: str = "cpu",
    backend_names: Optional[List[str]] = None,
    mode: str = "infer",
    quick: bool = False,
    out_dir: Optional[str] = None,
    profile: bool = False,
    compile: bool = False,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
    input_size: Optional[int] = None,
    memory: bool = False,
) -> List[Row]:
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    warmup, iters = (1, 3) if quick else (3, 10)
    if model_name not in models.CLASSIFIERS:
        raise ValueError(f"bench: --model must be one of {', '.join(models.CLASSIFIERS)}, got {model_name!r}")
    factory = getattr(models, model_name)
    model_kwargs = model_size_kwargs(model_name, input_size)
    torch.manual_seed(0)
    ours = factory(**model_kwargs).to(device=device, dtype=dtype)
    size = [s * p for s, p in zip(ours.tokens_spatial_shape, ours.patch_stride)]
    check_input_size(ours, input_size)
    x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
    title = header(model_name, batch, dtype, device, mode) + (f" input={'x'.join(map(str, size))}" if input_size else "")
    print_fn(title)

    contenders: List[Contender] = []
    official_model = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import hiera as official

        official_model = getattr(official, model_name)(**model_kwargs)
        official_model.load_state_dict(ours.state_dict())
        official_model.to(device=device, dtype=dtype)
        contenders.append(Contender("official (eager)", official_model, memory=dict(kind="official")))
        if compile:
            contenders.append(Contender("official + torch.compile", torch.compile(copy.deepcopy(official_model))))
    except ImportError:
        print_fn("(official package hiera-transformer not installed: no official or hiera-optim row)")
    if official_model is not None:
        try:
            with official_symbols_for_hiera_optim(official):
                import hiera_optim
        except ImportError as exc:  # not installed, or installed without something it imports
            print_fn(f"(no hiera-optim row: hiera_optim is not importable: {exc})")
        else:
            label = f"hiera-optim {hiera_optim.__version__}"
            contenders.append(built(f"{label} (eager)", lambda: build_hiera_optim(official_model), HIERA_OPTIM_NOTE))
            contenders[-1].memory = dict(kind="hiera-optim")
            if compile:
                contenders.append(
                    built(f"{label} + torch.compile", lambda: torch.compile(build_hiera_optim(official_model)), HIERA_OPTIM_NOTE)
                )
    names = backend_names or [n for n in backends.available_backends(device) if can_run_model(n, device, dtype)] + ["auto"]
    for name in names:
        contenders.append(Contender(f"hiera_kernels [{name}]", ours, name, memory=dict(kind="hiera_kernels", backend=name)))
    if compile:
        # Own copies, their backend fixed before compiling: switching a compiled module's
        # backend between rounds would fail its guards and recompile every round.
        contenders.append(Contender("hiera_kernels [auto] + torch.compile", torch.compile(copy.deepcopy(ours).set_backend("auto"))))
        if mode != "train":
            contenders.append(Contender(FREEZING_ROW, compile_frozen(copy.deepcopy(ours).set_backend("auto")), infer_only=True))

    modes = ["infer", "train"] if mode == "both" else [mode]
    rows: List[Row] = []
    # Errors on the logits (train-mode head, no dropout here): the eval softmax of a
    # randomly initialised head is nearly uniform and would hide them.
    # Judged by the shared error rule: against the "torch" path in float64, with the
    # "torch" path in the run's dtype as the yardstick.
    with torch.no_grad():
        torch_logits = ours.set_backend("torch").train()(x)
        float64_logits = copy.deepcopy(ours).double().train()(x.double())
    forward_figures: Dict[str, tuple] = {}  # label -> (error verdict, MB moved): the same in every mode
    # Steps shown: per mode, each row's warm-up, the floor's, the timed rounds, each row's figures.
    # (and with --memory, each measured row's subprocess).
    per_mode = [[c for c in contenders if not (m == "train" and c.infer_only)] for m in modes]
    bar = Progress(sum(2 * len(cs) + (sum(c.memory is not None for c in cs) if memory else 0) + 1 + iters for cs in per_mode),
                   enabled=progress)

    def say(text: str) -> None:
        bar.clear()
        print_fn(text)

    reported = set()  # rows whose failure was printed (once, not once per mode)

    for m, mode_contenders in zip(modes, per_mode):
        train = m == "train"
        steps: Dict[str, Callable[[], object]] = {}
        failures: Dict[str, Exception] = {}
        for c in mode_contenders:

            def step(model=c.model, backend=c.backend):
                if backend:
                    model.set_backend(backend)
                run_step(model, x, train)

            bar.step(f"{m}: warm-up {c.label}")
            error = c.error
            if error is None:
                try:
                    for _ in range(warmup):
                        step()
                except Exception as exc:  # a row that cannot run says why instead of ending the table
                    error = exc
            if error is not None:
                failures[c.label] = error
                message = f"  {c.label}: failed: {type(error).__name__}: {error}"
                if message not in reported:
                    reported.add(message)
                    say(message)
                continue
            steps[c.label] = step
        bar.step(f"{m}: warm-up {FLOOR_NAME}")
        steps[FLOOR_NAME] = gemm_floor_step(ours, x, train)
        steps[FLOOR_NAME]()
        medians = interleaved_medians(steps, device, iters, lambda i: bar.step(f"{m}: timing, round {i + 1}/{iters}"))
        floor = medians[FLOOR_NAME]
        official_ms = medians.get("official (eager)")
        for c in mode_contenders:
            label, model = c.label, c.model
            bar.step(f"{m}: logits error and bytes of {label}")
            if label in failures:
                rows.append(Row(label, m, None, None, None, None, None, note=failure_note(failures[label])))
                continue
            ms = medians[label]
            if c.backend:
                model.set_backend(c.backend)
            eager = not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
            if label not in forward_figures:
                with torch.no_grad():
                    verdict = error_rule.judge(model.train()(x), torch_logits, float64_logits)
                # Traffic and saved tensors are counted on eager runs: compiled code bypasses the dispatcher.
                moved = bytes_moved(lambda: model.eval()(x)).total / 1e6 if eager else None
                forward_figures[label] = (verdict, moved)
            verdict, moved = forward_figures[label]
            saved = saved_activation_bytes(model, lambda: model.train()(x)) / 1e6 if train and eager else None
            speedup = official_ms / ms if official_ms else None
            peak, note = None, c.note
            if memory and c.memory is not None:
                bar.step(f"{m}: peak memory of {label} (subprocess)")
                spec = dict(c.memory, model=model_name, input_size=model_kwargs.get("input_size"), batch=batch,
                            image_shape=list(x.shape[1:]), dtype=str(dtype).replace("torch.", ""), device=str(device), mode=m)
                try:
                    peak = peak_mb(spec)
                except Exception as exc:  # the timing stands; the note says why there is no peak
                    note = "; ".join(filter(None, [note, failure_note(exc)]))
            rows.append(Row(label, m, ms, batch / ms * 1e3, speedup, ms / floor, verdict.error, verdict.limit, moved, saved,
                            note=note, peak_mb=peak))
        rows.append(Row(FLOOR_NAME, m, floor, batch / floor * 1e3, None, 1.0, None))
    say(format_table(rows))
    if profile:
        # Eager rows only: the profile runs the eager model (a compiled row's ops are inductor's).
        eager_rows = (r for r in rows if r.name.startswith("hiera_kernels") and "torch.compile" not in r.name and r.ms is not None)
        fastest = min(eager_rows, key=lambda r: r.ms)
        backend = fastest.name[fastest.name.index("[") + 1 : fastest.name.index("]")]
        print_fn(f"\nWhere the time goes: hiera_kernels [{backend}], one {fastest.mode} step, by op (self CPU time)")
        print_fn(profile_table(ours.set_backend(backend), x, train=fastest.mode == "train"))
    ours.set_backend(None)
    if out_dir:
        save(rows, out_dir, model_name, batch, dtype, device, title, print_fn)
    return rows


FREEZING_ROW = "hiera_kernels [auto] + torch.compile (freezing)"


def compile_frozen(model: nn.Module) -> nn.Module:
    """``torch.compile`` with inductor's freezing (weights folded in as constants, Linears
    packed for oneDNN/MKL with bias and GELU fused: its CPU inference path). ``options``
    patches the inductor config for this compiled module's compilations only, the global
    ``torch._inductor.config.freezing`` is left as it was. Inductor freezes only graphs
    compiled without grad (bench runs inference steps under ``torch.inference_mode``); the
    row is inference-only, its weights are frozen at the first call."""
    return torch.compile(model, options={"freezing": True})


def model_size_kwargs(model_name: str, input_size: Optional[int]) -> dict:
    """Factory arguments for ``--input-size N``: N x N images (16 x N x N for the video models)."""
    if input_size is None:
        return {}
    if input_size <= 0:
        raise ValueError(f"bench: --input-size must be positive, got {input_size}")
    return {"input_size": (16, input_size, input_size) if "16x" in model_name else (input_size, input_size)}


def check_input_size(model: nn.Module, input_size: Optional[int]) -> None:
    """Hiera needs whole mask units: input_size / patch stride a multiple of the mask unit (32 for the image models)."""
    if input_size is None:
        return
    tokens, unit, stride = model.tokens_spatial_shape[-1], model.mask_unit_size[-1], model.patch_stride[-1]
    if input_size % stride or tokens % unit:
        raise ValueError(f"bench: --input-size {input_size} gives {input_size / stride:g} tokens a side; "
                         f"Hiera needs a multiple of the mask unit ({unit}), i.e. an input size that is a multiple of {stride * unit}")


def profile_table(model: nn.Module, x: torch.Tensor, train: bool, rows: int = 15) -> str:
    """torch.profiler's table of one step by op, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    model.train(train)
    with profile(activities=activities) as prof:
        if train:
            model(x).float().square().mean().backward()
        else:
            with torch.inference_mode():
                model(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def can_run_model(name: str, device, dtype) -> bool:
    return all(not r for r in (backends.backend_reasons(device, op, dtype)[name] for op in backends.OP_NAMES))


def header(model_name, batch, dtype, device, mode) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return (
        f"{model_name} batch={batch} dtype={str(dtype).replace('torch.', '')} device={device} mode={mode} | "
        f"{machine_name(device)} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} triton={triton_version}"
    )


def format_error(row: Row) -> str:
    if row.max_abs_err is None:
        return "-"
    verdict = "<=" if row.max_abs_err <= row.err_limit else "> FAIL"
    return f"{row.max_abs_err:.2e} ({verdict} {row.err_limit:.1e})"


PATCH_FAMILIES = ("timm",)


def bench_patched(
    family: str,
    model_name: str = "hiera_base_224",
    batch: int = 8,
    dtype: Optional[torch.dtype] = None,
    device: str = "cpu",
    mode: str = "infer",
    quick: bool = False,
    print_fn: Callable[[str], None] = print,
) -> List[Row]:
    """``bench --patch timm``: timm's own ``model_name`` against the same model after
    ``hiera_kernels.patch`` (backend "auto"), eager and under torch.compile; one set of
    random weights, one batch. "vs official" is against the unpatched eager row; the
    logits are judged by the error rule against the unpatched model in float64."""
    if family not in PATCH_FAMILIES:
        raise ValueError(f"bench: --patch must be one of {', '.join(PATCH_FAMILIES)}, got {family!r}")
    import timm

    from ..adapters import patch

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    torch.manual_seed(0)
    base = timm.create_model(model_name)
    with torch.no_grad():  # timm zero-initializes the head: all-zero logits would make the error column vacuous
        for p in base.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    base = base.to(device=device, dtype=dtype)
    x = torch.randn(batch, *base.pretrained_cfg["input_size"], device=device, dtype=dtype)
    print_fn(header(f"timm {model_name}, patched vs unpatched", batch, dtype, device, mode))
    models = {
        "timm (eager)": base,
        "timm + torch.compile": torch.compile(copy.deepcopy(base)),
        "timm patched [auto] (eager)": patch(copy.deepcopy(base)),
        "timm patched [auto] + torch.compile": torch.compile(patch(copy.deepcopy(base))),
    }
    rows = variant_rows(models, "timm (eager)", x, lambda model, x: model.train()(x), mode, quick)
    print_fn(format_table(rows))
    return rows


def variant_rows(
    models: Dict[str, nn.Module],
    baseline: str,
    x: torch.Tensor,
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    mode: str,
    quick: bool,
    extra: Callable[[str, nn.Module, str], dict] = lambda label, model, m: {},
) -> List[Row]:
    """The rows of one model in a few fixed variants (``bench --patch``, SAM 2's trunk), per
    mode: every model warmed up (compiling the compiled ones), then timed round-robin.
    "vs official" is against the ``baseline`` row; ``output(model, x)`` (what a row's error
    is measured on) is judged by the error rule against the baseline model's, in ``x``'s
    dtype and in float64. ``extra(label, model, mode)``: the row's further fields, by name."""
    warmup, iters = (1, 3) if quick else (3, 10)
    batch = x.shape[0]
    with torch.no_grad():
        baseline_result = output(models[baseline], x)
        float64_result = output(copy.deepcopy(models[baseline]).double(), x.double())
    rows: List[Row] = []
    for m in (["infer", "train"] if mode == "both" else [mode]):
        train = m == "train"
        steps = {label: (lambda model=model: run_step(model, x, train)) for label, model in models.items()}
        for step in steps.values():  # warm-up, compiling the compiled rows
            for _ in range(warmup):
                step()
        medians = interleaved_medians(steps, x.device, iters)
        for label, model in models.items():
            with torch.no_grad():
                verdict = error_rule.judge(output(model, x), baseline_result, float64_result)
            ms = medians[label]
            rows.append(Row(label, m, ms, batch / ms * 1e3, medians[baseline] / ms, None, verdict.error, verdict.limit,
                            **extra(label, model, m)))
    return rows


def format_table(rows: List[Row]) -> str:
    cols = ["row", "mode", "ms/batch", "img/s", "vs official", "vs GEMM floor", "logits err vs float64 (limit)",
            "MB moved outside GEMM (fwd)", "saved activations MB", "note"]
    with_peak = any(r.peak_mb is not None for r in rows)  # bench --memory: one more column, before the note
    if with_peak:
        cols.insert(-1, PEAK_COLUMN)
    lines = []
    for r in rows:
        peak = [f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"] if with_peak else []
        lines.append(
            [
                r.name,
                r.mode,
                f"{r.ms:.1f}" if r.ms is not None else "-",
                f"{r.images_per_s:.1f}" if r.images_per_s is not None else "-",
                f"{r.speedup:.2f}x" if r.speedup else "-",
                f"{r.vs_gemm_floor:.2f}x" if r.vs_gemm_floor else "-",
                format_error(r),
                f"{r.moved_mb:.1f}" if r.moved_mb is not None else "-",
                f"{r.saved_mb:.1f}" if r.saved_mb is not None else "-",
                *peak,
                r.note,
            ]
        )
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(line) for line in lines])


def save(rows: List[Row], out_dir: str, model_name, batch, dtype, device, title: str, print_fn=print) -> None:
    """bench.csv and bench.json in ``out_dir``, and bench.png where Pillow is importable."""
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(model=model_name, batch=batch, dtype=str(dtype), device=str(device), torch=torch.__version__,
                threads=torch.get_num_threads(), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2)
    with open(os.path.join(out_dir, "bench.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])) + list(meta))
        writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), **meta})
    try:
        import PIL  # noqa: F401  (optional: only the chart needs it)
    except ImportError as exc:
        print_fn(f"wrote bench.csv and bench.json in {out_dir}; skipped bench.png: Pillow is not importable ({exc})")
        return
    write_chart(rows, FLOOR_NAME, title.split(" | "), os.path.join(out_dir, "bench.png"))
    print_fn(f"wrote bench.csv, bench.json and bench.png in {out_dir}")
