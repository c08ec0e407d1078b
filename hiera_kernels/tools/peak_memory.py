"""Peak memory of one bench step, measured in a fresh process (``bench --memory``).

torch's CPU allocations are plain malloc, invisible to tracemalloc, and a process's
high-water mark keeps whatever an earlier row (or building the models) reached, so each
row is measured alone: ``python -m hiera_kernels.tools.peak_memory '<json spec>'`` builds
that row's model and input, runs one warm-up step (as bench does: what it loads or caches
once is not the step's), then measures one step and prints ``{"peak_mb": ...}``.

* CPU: the growth of the resident set's high-water mark over the step. Linux's
  ``/proc/self/clear_refs`` (``5``) resets the mark to the current resident set after
  the warm-up (and freed heap is returned with ``malloc_trim``, so
  that the step cannot reuse already-resident pages unseen); the peak is ``VmHWM`` of
  ``/proc/self/status`` after the step. It counts activations and workspaces, not the
  weights, the input, or what the warm-up left resident (packed-weight caches, oneDNN's kernels).
* CUDA: ``torch.cuda.max_memory_allocated`` over the step, less what was allocated before.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
from typing import Optional

import torch

from .steps import run_step

STATUS = "/proc/self/status"


def _kib(field: str) -> int:
    with open(STATUS) as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"peak memory: no {field} in {STATUS}")
    return int(match.group(1))


def _reset_cpu_peak() -> int:
    """Return freed heap to the OS, reset the high-water mark; the resident KiB now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed heap stays resident and a step reusing it is not counted (an underestimate)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise RuntimeError(f"peak memory on CPU needs Linux's /proc/self/clear_refs to reset the high-water mark ({exc})") from exc
    return _kib("VmRSS")


def build(spec: dict):
    """The row's model and input, as bench builds them (weights are random: memory does
    not depend on their values)."""
    from .. import models

    torch.manual_seed(0)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    kwargs = {"input_size": tuple(spec["input_size"])} if spec.get("input_size") else {}
    if spec["kind"] == "hiera_kernels":
        model = getattr(models, spec["model"])(**kwargs).set_backend(spec["backend"])
    elif spec["kind"] == "sam2":  # SAM 2's trunk, patched on spec["backend"] (None: unpatched)
        from .sam2_bench import build_trunk

        model = build_trunk(spec["model"], spec["backend"])
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import hiera as official
        model = getattr(official, spec["model"])(**kwargs)
        if spec["kind"] == "hiera-optim":
            from .bench import build_hiera_optim

            model = build_hiera_optim(model)
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(spec["batch"], *spec["image_shape"], device=device, dtype=dtype)
    return model, x


def measure(spec: dict) -> float:
    """Peak MB of one step of the row described by ``spec`` (in this process: call it in a fresh one)."""
    model, x = build(spec)
    train = spec["mode"] == "train"
    model.train(train)
    cuda = x.device.type == "cuda"
    run_step(model, x, train)  # warm-up, as bench's: one-time code pages, oneDNN kernels, packed-weight caches
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_cpu_peak() * 1024
    run_step(model, x, train)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _kib("VmHWM") * 1024
    return (peak - before) / 1e6


def peak_mb(spec: dict, timeout: Optional[float] = None) -> float:
    """Run :func:`measure` in a fresh Python process; raise RuntimeError with its stderr if it fails."""
    # The child imports this very copy of hiera_kernels, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "hiera_kernels.tools.peak_memory", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"peak memory subprocess failed: {last[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


if __name__ == "__main__":
    print(json.dumps({"peak_mb": measure(json.loads(sys.argv[1]))}))
