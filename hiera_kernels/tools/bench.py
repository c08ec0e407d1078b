"""``python -m hiera_kernels bench``: the whole model, side by side in one run.

Rows: the official package in eager mode (when installed), hiera-optim (when
installed: the official model patched by ``hiera_optim.optimize``), then
hiera_kernels on each backend that can run the whole model on the device, and
``"auto"``; with ``compile``, also the official model, hiera-optim and
hiera_kernels on ``"auto"`` under ``torch.compile`` (compiled during warm-up).
A row whose model cannot be built or run says why in its note. Every row
runs the same random weights on the same batch; after warm-up the rows are timed
round-robin, one step each per round, and each reports its median. The GEMM
floor is the time of the model's Linears and patch conv alone, each run on an
input of the shape it sees in the model: what no fusion of the other ops can
beat. Two device-independent columns come from
:mod:`hiera_kernels.tools.traffic`: bytes moved outside GEMM/conv in one forward
(what predicts memory-bound time on a GPU) and activation bytes saved for the
backward (training rows).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, TextIO

import torch
import torch.nn as nn

from .. import backends, error_rule, models
from .chart import write_chart
from .traffic import bytes_moved, saved_activation_bytes

FLOOR_NAME = "GEMM floor (Linears + conv alone)"


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


@dataclass
class Contender:
    """The model behind a timed row. ``backend`` is the hiera_kernels backend set before
    each step ("" for other packages' models); ``error`` is why the model could not be built."""

    label: str
    model: Optional[nn.Module]
    backend: str = ""
    error: Optional[Exception] = None


def built(label: str, build: Callable[[], nn.Module]) -> Contender:
    """A contender running ``build()``'s model, or one that carries why ``build()`` failed."""
    try:
        return Contender(label, build())
    except Exception as exc:
        return Contender(label, None, error=exc)


def build_hiera_optim(official_model: nn.Module) -> nn.Module:
    """hiera-optim's model: it builds none of its own but patches an official model in
    place (``optimize``: 4-D SDPA attention, gather instead of boolean-mask indexing), so
    it runs on a copy of the official row's model, weights included."""
    import hiera_optim

    return hiera_optim.optimize(copy.deepcopy(official_model), verbose=False)


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
                        before_round: Callable[[int], None] = lambda i: None) -> Dict[str, float]:
    """Median ms of each step, timed round-robin (every round runs every step once), so
    that the drift of a shared machine falls on all rows alike instead of on whichever
    row happened to run during a slow minute. ``before_round(i)`` is told each round's start."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for i in range(iters):
        before_round(i)
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def gemm_floor_step(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    """The model's Linears and convs alone, each on an input of the shape it sees."""
    calls = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: calls.append((mod, args[0].detach().clone())))
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
) -> List[Row]:
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    warmup, iters = (1, 3) if quick else (3, 10)
    if model_name not in models.CLASSIFIERS:
        raise ValueError(f"bench: --model must be one of {', '.join(models.CLASSIFIERS)}, got {model_name!r}")
    factory = getattr(models, model_name)
    torch.manual_seed(0)
    ours = factory().to(device=device, dtype=dtype)
    size = [s * p for s, p in zip(ours.tokens_spatial_shape, ours.patch_stride)]
    x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
    title = header(model_name, batch, dtype, device, mode)
    print_fn(title)

    contenders: List[Contender] = []
    official_model = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import hiera as official

        official_model = getattr(official, model_name)()
        official_model.load_state_dict(ours.state_dict())
        official_model.to(device=device, dtype=dtype)
        contenders.append(Contender("official (eager)", official_model))
        if compile:
            contenders.append(Contender("official + torch.compile", torch.compile(copy.deepcopy(official_model))))
    except ImportError:
        print_fn("(official package hiera-transformer not installed: no official or hiera-optim row)")
    if official_model is not None:
        try:
            import hiera_optim
        except ImportError as exc:  # not installed, or installed without something it imports
            print_fn(f"(no hiera-optim row: hiera_optim is not importable: {exc})")
        else:
            label = f"hiera-optim {hiera_optim.__version__}"
            contenders.append(built(f"{label} (eager)", lambda: build_hiera_optim(official_model)))
            if compile:
                contenders.append(built(f"{label} + torch.compile", lambda: torch.compile(build_hiera_optim(official_model))))
    names = backend_names or [n for n in backends.available_backends(device) if can_run_model(n, device, dtype)] + ["auto"]
    for name in names:
        contenders.append(Contender(f"hiera_kernels [{name}]", ours, name))
    if compile:
        # Own copies, their backend fixed before compiling: switching a compiled module's
        # backend between rounds would fail its guards and recompile every round.
        contenders.append(Contender("hiera_kernels [auto] + torch.compile", torch.compile(copy.deepcopy(ours).set_backend("auto"))))

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
    bar = Progress(len(modes) * (2 * len(contenders) + 1 + iters), enabled=progress)

    def say(text: str) -> None:
        bar.clear()
        print_fn(text)

    reported = set()  # rows whose failure was printed (once, not once per mode)

    for m in modes:
        train = m == "train"
        steps: Dict[str, Callable[[], object]] = {}
        failures: Dict[str, Exception] = {}
        for c in contenders:

            def step(model=c.model, backend=c.backend):
                if backend:
                    model.set_backend(backend)
                model.train(train)
                if train:
                    model.zero_grad(set_to_none=True)
                    model(x).float().square().mean().backward()
                else:
                    with torch.inference_mode():
                        model(x)

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
        for c in contenders:
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
            rows.append(Row(label, m, ms, batch / ms * 1e3, speedup, ms / floor, verdict.error, verdict.limit, moved, saved))
        rows.append(Row(FLOOR_NAME, m, floor, batch / floor * 1e3, None, 1.0, None))
    say(format_table(rows))
    if profile:
        fastest = min((r for r in rows if r.name.startswith("hiera_kernels") and r.ms is not None), key=lambda r: r.ms)
        backend = fastest.name[fastest.name.index("[") + 1 : -1]
        print_fn(f"\nWhere the time goes: hiera_kernels [{backend}], one {fastest.mode} step, by op (self CPU time)")
        print_fn(profile_table(ours.set_backend(backend), x, train=fastest.mode == "train"))
    ours.set_backend(None)
    if out_dir:
        save(rows, out_dir, model_name, batch, dtype, device, title, print_fn)
    return rows


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


def format_table(rows: List[Row]) -> str:
    cols = ["row", "mode", "ms/batch", "img/s", "vs official", "vs GEMM floor", "logits err vs float64 (limit)",
            "MB moved outside GEMM (fwd)", "saved activations MB", "note"]
    lines = []
    for r in rows:
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
