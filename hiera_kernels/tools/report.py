"""``python -m hiera_kernels report``: verify and measure every path of a device in one
time-boxed run, and write what happened to ``report.md`` and ``report.json``.

A GPU may be lent for minutes, with no network and whatever is installed. So the report
runs a fixed plan of steps in order of value (the environment; ``check`` of every
backend at Hiera-T, B+, L, a video and a masked-MAE configuration in fp32/bf16/fp16;
on a GPU, SAM 2's window attention blocks on the cuda and triton backends; the GPU test files; the per-op microbenchmarks; the whole-model bench; the compile
metadata of the kernels that ran), and

* runs every step in its own subprocess (its own process group, killed on timeout), so
  that a hang, a crash or a segfault costs that step only and the next one runs;
* gives every step a share of the budget: its weight (the seconds it is expected to take)
  over the weights of the steps not yet run, times the time left, so time a step does not use goes to the later ones. A
  step that runs past its share is killed and marked ``cut short``; a step that finds
  under ``MIN_STEP_S`` left is ``not run (budget spent)``;
* rewrites report.md and report.json after every step, so whatever happens to the run,
  what it got so far is on disk.

``--device cpu`` runs the same plan for the CPU backends (what CI exercises); with
``--quick`` it takes ~30 s on 2 idle cores (several times that on a busy machine).

The step bodies that run in-process Python (the environment, a check, the masked-MAE
check, the compile metadata) are this module's ``python -m hiera_kernels.tools.report
<part>`` entry point; the others are ``pytest`` and ``python -m hiera_kernels bench``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

# The source checkout (tests/ and bench/ live beside the package there).
ROOT = Path(__file__).resolve().parents[2]
MIN_STEP_S = 3.0      # below this a step cannot even import torch: not started
KILL_GRACE_S = 5.0    # SIGTERM, then SIGKILL after this
TAIL_LINES = 40       # of each step's output in report.md (the whole log is in logs/)
CHECK_DTYPES = ("float32", "bfloat16", "float16")
STATUS_PASSED = "passed"
STATUS_FAILED = "failed"
STATUS_CRASHED = "crashed"
STATUS_CUT = "cut short"
STATUS_SKIPPED = "skipped"
STATUS_NO_BUDGET = "not run (budget spent)"


@dataclass
class Step:
    name: str
    group: str                  # env | check | tests | microbench | bench | compile metadata
    argv: List[str]
    weight: float               # the seconds it is expected to take: its share of the budget is in proportion
    env: Dict[str, str] = field(default_factory=dict)
    skip_reason: Optional[str] = None  # why it cannot run here: recorded, not run
    tail_lines: int = TAIL_LINES


@dataclass
class Outcome:
    name: str
    group: str
    command: str
    status: str
    seconds: float
    limit_s: float
    returncode: Optional[int]
    summary: str
    tail: str
    log: str                    # relative to the report directory
    data: Optional[dict] = None  # what the step wrote for the report (results/<slug>.json)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def python_part(part: str, *args: str) -> List[str]:
    """The command line of one of this module's in-process parts, run as a step."""
    return [sys.executable, "-m", "hiera_kernels.tools.report", part, *args]


# ------------------------------------------------------------------------ the plan
def plan(device: str, quick: bool, out: Path) -> List[Step]:
    """Every step for ``device``, in order of value."""
    gpu = device == "cuda"
    # Weights: the seconds each step is expected to take (CPU: measured on 2 idle cores;
    # GPU: guesses until a GPU report exists), so that a plan that fits its budget gives
    # every step its expected time and more.
    steps = [Step("environment", "env", python_part("env", "--device", device, "--out", str(out)), 8)]

    # check: every backend on the device against the torch path and float64.
    if gpu:
        models = [("hiera_tiny_224", 2, CHECK_DTYPES)]
        others = [("hiera_base_plus_224", 2), ("hiera_large_224", 2), ("hiera_base_16x224", 1)]
        models += [(m, b, ("bfloat16",) if quick else CHECK_DTYPES) for m, b in others]
    elif quick:
        models = [("hiera_tiny_224", 1, ("float32", "bfloat16"))]
    else:
        models = [(m, 1, CHECK_DTYPES) for m in ("hiera_tiny_224", "hiera_base_plus_224", "hiera_large_224", "hiera_base_16x224")]
    for model, batch, dtypes in models:
        for dtype in dtypes:
            weight = {"hiera_tiny_224": 15 if gpu else 12, "hiera_base_plus_224": 25}.get(model, 35)
            steps.append(Step(f"check {model} {dtype}", "check",
                              python_part("check", model, "--device", device, "--dtype", dtype, "--batch", str(batch), "--out", str(out)), weight))
    # SAM 2's window attention at its 1024x1024 blocks (no model check covers it yet).
    if gpu:
        dtypes = ("bfloat16",) if quick else CHECK_DTYPES
        steps.append(Step("check window_attention SAM 2 blocks " + " ".join(dtypes), "check",
                          python_part("window", "--device", device, "--dtypes", *dtypes, "--out", str(out)), 30))
    # The masked autoencoder (masked unroll/reroll and attention on kept units only),
    # image and video; check itself covers classifiers only. On a CPU the video MAE runs
    # at 4x64x64 (the full 16x224x224 is minutes there), and the quick plan builds both
    # MAEs --small (fewer blocks: building and copying 80M parameters is most of the time).
    maes = [("mae_hiera_tiny_224", None), ("mae_hiera_base_16x224", None if gpu else "4,64,64")]
    if gpu:
        mae_dtypes = ("bfloat16",) if quick else CHECK_DTYPES
    else:
        mae_dtypes = ("float32",) if quick else ("float32", "bfloat16")
    small = not gpu and quick
    for model, size in maes:
        for dtype in mae_dtypes if model == maes[0][0] else mae_dtypes[:1]:  # the video MAE: one dtype
            args = ["--device", device, "--dtype", dtype, "--batch", "2" if gpu else "1", "--out", str(out)]
            args += (["--input-size", size] if size else []) + (["--small"] if small else [])
            label = f"check {model}{' ' + size.replace(',', 'x') if size else ''}{' small' if small else ''} {dtype}"
            steps.append(Step(label, "check", python_part("mae", model, *args), 25 if gpu else 12))

    # tests: the GPU test files on a GPU; the CPU backends' tests on a CPU.
    tests_dir = ROOT / "tests"
    no_tests = None if tests_dir.is_dir() else f"no tests/ beside the package ({ROOT}): run from a source checkout"
    pytest = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    if gpu:
        files = ["tests/test_cuda_build.py", "tests/test_cuda_attention.py", "tests/test_window_attention.py", "tests/test_triton.py"]
        # The AOT compile of every specialization for sm_80/sm_90 is a build check (CI
        # runs it without a GPU): quick leaves it out.
        select = ["-k", "not every_specialization_compiles"] if quick else []
    elif quick:
        files = ["tests/test_query_pool.py", "tests/test_token_order.py", "tests/test_attention.py"]
        select = ["-k", "not test_attention.py or (cpu_kernel_error_rule and float32) or empty_and_single or non_contiguous"]
    else:
        files = ["tests/test_query_pool.py", "tests/test_token_order.py", "tests/test_attention.py",
                 "tests/test_errors_and_backends.py", "tests/test_models.py", "tests/test_cuda_build.py"]
        select = []
    steps.append(Step("tests " + " ".join(Path(f).stem for f in files), "tests", pytest + files + select, 90 if gpu else 50,
                      skip_reason=no_tests))

    # per-op microbenchmarks
    bench_file = "bench/bench_gpu_ops.py" if gpu else "bench/bench_ops.py"
    micro = pytest + [bench_file, "--benchmark-group-by=group", "--benchmark-columns=median,iqr,rounds",
                      "--benchmark-sort=name", f"--benchmark-json={out / 'microbench.json'}"]
    if gpu:
        micro += ["--benchmark-max-time=0.1", "--benchmark-min-rounds=10"] + (["-k", "bf16"] if quick else [])
        env = {}
    else:
        micro += ["--benchmark-max-time=0.05", "--benchmark-min-rounds=3", "--benchmark-warmup=off"]
        micro += ["-k", "fp32 and not bwd and (unroll or s2-pool)"] if quick else []
        env = {"HIERA_BENCH_BATCH": "2"} if quick else {}
    steps.append(Step(f"microbench {Path(bench_file).stem}", "microbench", micro, 90 if gpu else 20, env=env,
                      skip_reason=None if (ROOT / bench_file).is_file() else f"no {bench_file} beside the package ({ROOT})"))

    # whole model: eager rows (every backend, auto), then the torch.compile rows apart,
    # so that a slow compile cannot take the eager table with it.
    if gpu:
        model_args = ["--model", "hiera_base_224", "--batch", "32", "--dtype", "bfloat16", "--device", "cuda"]
    elif quick:
        # bench's CPU dtype (bf16 only where the CPU has it natively: emulated bf16 is
        # minutes) and inference only: a Hiera-T training step on 2 busy cores is minutes too.
        model_args = ["--model", "hiera_tiny_224", "--batch", "1", "--device", "cpu"]
    else:
        model_args = ["--model", "hiera_base_224", "--batch", "8", "--dtype", "bfloat16", "--device", "cpu"]
    mode = "infer" if quick and not gpu else "both"
    bench = [sys.executable, "-m", "hiera_kernels", "bench", *model_args, "--mode", mode, "--no-progress"]
    bench += ["--quick"] if quick else []
    steps.append(Step("bench whole model, eager", "bench", bench + ["--out", str(out / "bench-eager")], 60 if gpu or not quick else 35,
                      tail_lines=30))
    if gpu or not quick:  # compiling on 2 CPU cores is minutes: not in the CPU quick plan
        steps.append(Step("bench whole model, torch.compile", "bench",
                          bench + ["--compile", "--backends", "auto", "--out", str(out / "bench-compile")], 120, tail_lines=30))

    steps.append(Step("compile metadata", "compile metadata", python_part("metadata", "--device", device, "--out", str(out)), 20 if gpu else 6,
                      tail_lines=80))
    return steps


# ------------------------------------------------------------------ running steps
def child_env(out: Path, extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    # The report verifies compiled kernels: the interpreter would replace them (on a
    # GPU the test files' conftest decides for itself, by whether a GPU is there).
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"  # the lines show as they come
    # The report's own Triton cache: the compile-metadata step lists what the steps
    # before it compiled, and nothing older.
    env["TRITON_CACHE_DIR"] = str(out / "triton_cache")
    env.update(extra)
    return env


def run_step(step: Step, limit_s: float, out: Path, echo: Callable[[str], None]) -> Outcome:
    """Run ``step`` for at most ``limit_s`` seconds, echoing its output as it comes."""
    log_rel = f"logs/{slug(step.name)}.log"
    data_path = out / "results" / f"{slug(step.name)}.json"
    if data_path.exists():
        data_path.unlink()
    command = " ".join(step.argv)
    tail: collections.deque = collections.deque(maxlen=max(step.tail_lines, 200))
    start = time.monotonic()
    try:
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=child_env(out, dict(step.env, HIERA_REPORT_DATA=str(data_path))),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)  # its own process group: killed whole on timeout
    except OSError as exc:
        return Outcome(step.name, step.group, command, STATUS_FAILED, 0.0, limit_s, None,
                       f"could not start: {exc}", "", log_rel)

    def pump():
        with open(out / log_rel, "w") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                tail.append(line)
                echo("    " + line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    cut = False
    try:
        returncode = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        cut = True
        kill_group(proc)
        returncode = proc.returncode
    reader.join(timeout=KILL_GRACE_S)
    seconds = time.monotonic() - start
    lines = list(tail)
    data = None
    if data_path.exists():
        try:
            data = json.loads(data_path.read_text())
        except ValueError as exc:
            data = {"error": f"unreadable {data_path.name}: {exc}"}
    if cut:
        status, summary = STATUS_CUT, f"cut short at its share of the budget ({limit_s:.0f} s)"
    elif returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        status, summary = STATUS_CRASHED, f"killed by {sig}"
    else:
        status = STATUS_PASSED if returncode == 0 else STATUS_FAILED
        summary = "" if returncode == 0 else f"exit code {returncode}"
    found = summarize(step.group, lines)
    summary = "; ".join(s for s in (summary, found) if s)
    return Outcome(step.name, step.group, command, status, round(seconds, 1), round(limit_s, 1), returncode, summary,
                   "\n".join(lines[-step.tail_lines:]), log_rel, data)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group, SIGKILL it if it is still there after the grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


PYTEST_SUMMARY = re.compile(r"\b\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b")


def summarize(group: str, lines: List[str]) -> str:
    """One line on what a step found, from its output (the in-process parts print it as
    their last ``summary: `` line)."""
    own = [line[len("summary: "):] for line in lines if line.startswith("summary: ")]
    if own:
        return own[-1]
    if group == "check":
        passed = sum(1 for line in lines if line.lstrip().startswith("PASS"))
        failed = sum(1 for line in lines if line.lstrip().startswith("FAIL"))
        skipped = sum(1 for line in lines if line.lstrip().startswith("SKIP"))
        return f"{passed} PASS, {failed} FAIL" + (f", {skipped} SKIP" if skipped else "") if passed + failed + skipped else ""
    if group in ("tests", "microbench"):
        found = [line.strip("= ") for line in lines if PYTEST_SUMMARY.search(line)]
        return found[-1] if found else ""
    if group == "bench":
        rows = [line for line in lines if line.startswith("| ") and not line.startswith("| row ")]
        failed = [line for line in rows if "failed:" in line]
        return f"{len(rows)} rows" + (f", {len(failed)} failed" if failed else "") if rows else ""
    return ""


# ---------------------------------------------------------------------- the report
def report(device: str = "cpu", quick: bool = False, budget_min: Optional[float] = None, out_dir: str = "report",
           print_fn: Callable[[str], None] = print) -> int:
    """Run the plan for ``device`` within ``budget_min`` minutes (default 5 with ``quick``,
    else 10). Returns 0 when every step passed, 1 when any failed, crashed, was cut short
    or not run. (``python -m hiera_kernels`` refuses ``--device cuda`` without a GPU before
    calling this, exit 2: :func:`hiera_kernels.tools.no_gpu_refusal`.)"""
    if budget_min is None:
        budget_min = 5.0 if quick else 10.0
    if device not in ("cuda", "cpu"):
        raise ValueError(f"report: --device must be cuda or cpu, got {device!r}")
    if budget_min <= 0:
        raise ValueError(f"report: --budget must be > 0 minutes, got {budget_min}")
    out = Path(out_dir).resolve()
    shutil.rmtree(out / "triton_cache", ignore_errors=True)  # the metadata step lists this run's kernels only
    for sub in ("logs", "results"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    steps = plan(device, quick, out)
    meta = dict(command="python -m hiera_kernels report " + " ".join(
                    ["--device", device] + (["--quick"] if quick else []) + ["--budget", f"{budget_min:g}", "--out", str(out)]),
                device=device, quick=quick, budget_min=budget_min, machine=machine(device), cpus=os.cpu_count(),
                load_average=load_average(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), finished=None, seconds=None)
    start = time.monotonic()
    deadline = start + budget_min * 60
    outcomes: List[Outcome] = []
    print_fn(f"report on {device}{' (quick)' if quick else ''}: {len(steps)} steps in {budget_min:g} min, "
             f"writing {out / 'report.md'} and report.json after each")
    for i, step in enumerate(steps):
        header = f"== [{i + 1}/{len(steps)}] {step.name}"
        left = deadline - time.monotonic()
        if step.skip_reason:
            outcome = Outcome(step.name, step.group, " ".join(step.argv), STATUS_SKIPPED, 0.0, 0.0, None, step.skip_reason, "", "")
        elif left < MIN_STEP_S:
            outcome = Outcome(step.name, step.group, " ".join(step.argv), STATUS_NO_BUDGET, 0.0, 0.0, None,
                              f"{max(left, 0):.0f} s of the budget left", "", "")
        else:
            weights = sum(s.weight for s in steps[i:] if not s.skip_reason)
            limit = left * step.weight / weights
            print_fn(f"{header} (up to {limit:.0f} s): {' '.join(step.argv)}")
            outcome = run_step(step, limit, out, print_fn)
        print_fn(f"{header}: {outcome.status} in {outcome.seconds:.1f} s{': ' + outcome.summary if outcome.summary else ''}")
        outcomes.append(outcome)
        meta.update(seconds=round(time.monotonic() - start, 1))
        write(out, meta, outcomes, steps)
    meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"), seconds=round(time.monotonic() - start, 1),
                load_average_end=load_average())
    write(out, meta, outcomes, steps)
    counts = collections.Counter(o.status for o in outcomes)
    print_fn(f"report: {', '.join(f'{n} {s}' for s, n in counts.items())} in {meta['seconds']:.0f} s; "
             f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return 0 if counts[STATUS_PASSED] == len(outcomes) else 1


def machine(device: str) -> str:
    from .bench import machine_name

    return machine_name(torch.device(device))


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write(out: Path, meta: dict, outcomes: List[Outcome], steps: List[Step]) -> None:
    """report.json and report.md, written whole to a temporary file and renamed: a reader
    (or a run killed mid-write) never sees half a report."""
    env = next((o.data for o in outcomes if o.group == "env" and o.data), None)
    pending = [s.name for s in steps[len(outcomes):]]
    doc = {"meta": meta, "environment": env, "steps": [asdict(o) for o in outcomes], "pending": pending}
    atomic_write(out / "report.json", json.dumps(doc, indent=2, default=str))
    atomic_write(out / "report.md", markdown(meta, env, outcomes, pending))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(meta: dict, env: Optional[dict], outcomes: List[Outcome], pending: List[str]) -> str:
    counts = collections.Counter(o.status for o in outcomes)
    state = "finished" if meta.get("finished") else f"IN PROGRESS ({len(pending)} steps to go)"
    lines = [f"# hiera_kernels report: {meta['device']}{' (quick)' if meta['quick'] else ''}, {meta['machine']}", "",
             f"`{meta['command']}`", "",
             f"{state}; started {meta['started']}, {meta['seconds']} s of the {meta['budget_min']:g} min budget used; "
             f"{meta['cpus']} CPUs, load average at start {meta['load_average']}"
             + (f", at end {meta['load_average_end']}" if meta.get("load_average_end") else "") + ".", "",
             "**" + ", ".join(f"{n} {s}" for s, n in counts.items()) + "**", ""]
    if env:
        lines += ["## Environment", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in env.get("summary", {}).items()]
        lines.append("")
    lines += ["## Steps", "", "| # | step | status | seconds | limit s | summary |", "|---|---|---|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        lines.append(f"| {i} | {o.name} | {o.status} | {o.seconds:.1f} | {o.limit_s:.0f} | {o.summary.replace('|', '/')} |")
    for name in pending:
        lines.append(f"| | {name} | pending | | | |")
    lines += ["", "## Output of each step (the tail; the whole output is in logs/)", ""]
    for i, o in enumerate(outcomes, 1):
        lines += [f"### {i}. {o.name}: {o.status} ({o.seconds:.1f} s)", ""]
        if o.command:
            lines += [f"`{o.command}`" + (f" (log: {o.log})" if o.log else ""), ""]
        if o.summary:
            lines += [o.summary, ""]
        if o.tail:
            lines += ["```", o.tail, "```", ""]
    return "\n".join(lines) + "\n"


# ============================================= the in-process parts (run as steps)
def save_data(data: dict) -> None:
    """Hand ``data`` to the report (report.json) through the file it named."""
    path = os.environ.get("HIERA_REPORT_DATA")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def run_tool(argv: List[str], timeout: float = 60) -> str:
    """A tool's output, or why there is none (the report says so rather than stopping)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(could not run {argv[0]}: {exc})"
    return (done.stdout + done.stderr).strip()


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, CUDA_HOME, or the copy Triton ships with its NVIDIA backend."""
    candidates = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def extension_archs(path: str) -> Dict[str, List[str]]:
    """The GPU architectures compiled into the extension (cubins and PTX), by cuobjdump."""
    tool = find_cuobjdump()
    if tool is None:
        return {"error": "no cuobjdump (PATH, CUDA_HOME or Triton's): archs unknown"}
    elf = run_tool([tool, "--list-elf", path])
    ptx = run_tool([tool, "--list-ptx", path])
    return {"cubin": sorted(set(re.findall(r"\.(sm_\d+[af]?)\.cubin", elf))),
            "ptx": sorted(set(re.findall(r"\.(sm_\d+[af]?)\.ptx", ptx)))}


def env_part(device: str) -> int:
    from .._extension import EXTENSION
    from .info import info

    info()
    summary: Dict[str, str] = {}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not importable ({exc})"
    summary["python"] = f"{platform.python_version()} ({sys.executable})"
    summary["torch"] = f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}"
    summary["triton"] = triton_version
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        summary["GPU"] = (f"{torch.cuda.device_count()} x {props.name}, sm_{props.major}{props.minor}, "
                          f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
        summary["torch's CUDA archs"] = " ".join(torch.cuda.get_arch_list())
    else:
        summary["GPU"] = "none (torch.cuda.is_available() is False)"
    smi = shutil.which("nvidia-smi")
    summary["driver"] = (run_tool([smi, "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines() or ["?"])[0] if smi else "no nvidia-smi"
    nvcc = shutil.which("nvcc")
    summary["nvcc"] = (run_tool([nvcc, "--version"]).splitlines() or ["?"])[-1] if nvcc else "not on PATH"
    summary["CPU"] = f"{machine('cpu')}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}"
    module = sys.modules.get("hiera_kernels._C")
    so = getattr(module, "__file__", None)
    if EXTENSION.loaded and so:
        summary["extension"] = f"{so}; CUDA sources compiled in: {EXTENSION.with_cuda}"
        if EXTENSION.with_cuda:
            archs = extension_archs(so)
            summary["extension CUDA archs"] = archs.get("error") or f"cubin {' '.join(archs['cubin']) or 'none'}; PTX {' '.join(archs['ptx']) or 'none'}"
            if torch.cuda.is_available() and "cubin" in archs:
                major, minor = torch.cuda.get_device_capability()
                here = f"sm_{major}{minor}"
                if here not in archs["cubin"] and not archs["ptx"]:
                    summary["extension CUDA archs"] += (f": NO code for this GPU ({here}); the cuda backend will fail here: rebuild with "
                                                        f"HIERA_KERNELS_CUDA_ARCHS={major}.{minor}")
    else:
        summary["extension"] = f"NOT loaded: {EXTENSION.error}"
    flags = {k: v for k, v in os.environ.items() if k.startswith("HIERA_KERNELS") or k in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")}
    summary["build/run flags in the environment"] = " ".join(f"{k}={v}" for k, v in sorted(flags.items())) or "none"
    print()
    for k, v in summary.items():
        print(f"{k}: {v}")
    save_data({"summary": summary})
    print(f"summary: GPU {summary['GPU']}; extension CUDA archs: {summary.get('extension CUDA archs', 'none compiled in')}")
    if device == "cuda" and not torch.cuda.is_available():
        return 1
    return 0


def check_part(model: str, device: str, dtype: str, batch: int) -> int:
    from ..__main__ import DTYPES
    from .check import check

    return 0 if check(model, device, DTYPES[dtype], batch) else 1


def small_mae(name: str) -> dict:
    """--small: a one-block decoder; and for the video MAEs (their factories take
    ``stages``; the image ones fix it) every stage keeps a pooling and a plain block,
    at the shapes of the full model's blocks."""
    return dict(decoder_depth=1, **({"stages": (1, 2, 2, 2)} if "16x" in name else {}))


def check_autoencoder(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 1,
                      input_size: Optional[List[int]] = None, mask_ratio: float = 0.6, print_fn=print,
                      **overrides) -> bool:
    """The masked autoencoder on every backend that can run it, and on "auto", against the
    "torch" path and float64 by :mod:`hiera_kernels.error_rule`: the loss, the predictions
    of the masked units and the patch embedding's weight gradient (it flows back through
    every encoder op on the kept units). ``check`` covers the classifiers only: this is the
    masked path (masked unroll/reroll, attention over kept units, the decoder).
    ``overrides`` go to the factory (e.g. :func:`small_mae`)."""
    from .. import backends, models
    from ..error_rule import judge

    if name not in models.AUTOENCODERS:
        raise ValueError(f"check_autoencoder: model must be one of {', '.join(models.AUTOENCODERS)}, got {name!r}")
    device = torch.device(device)
    torch.manual_seed(0)
    model = getattr(models, name)(**({"input_size": tuple(input_size)} if input_size else {}), **overrides).to(device)
    size = [s * p for s, p in zip(model.tokens_spatial_shape, model.patch_stride)]
    x = torch.randn(batch, 3, *size, device=device)
    mask = model.get_random_mask(x, mask_ratio)
    kept = int(mask[0].sum())
    candidates = [n for n in backends.available_backends(device) if n != "torch"]
    print_fn(f"check {name}{' ' + str(overrides) if overrides else ''} input {size} on {device}, {str(dtype).replace('torch.', '')}, batch {batch}, "
             f"{kept} of {mask.shape[1]} mask units kept: backends {candidates} and auto")

    def run(m, backend, x):
        m.set_backend(backend).train()
        loss, pred, label, _ = m(x, mask=mask)
        (grad,) = torch.autograd.grad(loss, [m.patch_embed.proj.weight])
        return {"loss": loss.detach(), "pred": pred.detach(), "patch_embed grad": grad}

    reference = run(copy.deepcopy(model).double(), "torch", x.double())
    low = model.to(dtype)
    want = run(low, "torch", x.to(dtype))
    ok = True
    for backend in candidates + ["auto"]:
        reasons = [r for op in backends.OP_NAMES for r in backends.backend_reasons(device, op, dtype)[backend]] if backend != "auto" else []
        if reasons:
            print_fn(f"  SKIP {backend:6s} cannot run the model: {'; '.join(sorted(set(reasons)))}")
            continue
        try:
            got = run(low, backend, x.to(dtype))
        except Exception as exc:  # a backend that fails is a FAIL with its reason, then the next one
            ok = False
            print_fn(f"  FAIL {backend:6s} {type(exc).__name__}: {exc}")
            continue
        for what in got:
            verdict = judge(got[what], want[what], reference[what])
            ok &= verdict.passed
            print_fn(f"  {'PASS' if verdict.passed else 'FAIL'} {backend:6s} {what:17s} {verdict.describe()}")
    print_fn("all checks passed" if ok else "SOME CHECKS FAILED")
    return ok


def mae_part(model: str, device: str, dtype: str, batch: int, input_size: Optional[str], small: bool) -> int:
    from ..__main__ import DTYPES

    size = [int(s) for s in input_size.split(",")] if input_size else None
    return 0 if check_autoencoder(model, device, DTYPES[dtype], batch, size, **(small_mae(model) if small else {})) else 1


# (name, batch, H, W, heads, head_dim, window_size, q_stride): SAM 2 Hiera-T/S's attention
# blocks (head dim 96) at 1024x1024 (a 256x256 token map at stage 1).
SAM2_WINDOW_CASES = (
    ("stage 1, windowed 8", 1, 256, 256, 1, 96, 8, 1),
    ("stage 2 pool block, windowed 8, 2x2 q pool", 1, 256, 256, 2, 96, 8, 2),
    ("stage 3, windowed 14 (padded 64 -> 70)", 1, 64, 64, 4, 96, 14, 1),
    ("stage 3, global", 1, 64, 64, 4, 96, 0, 1),
)
WINDOW_BACKENDS = ("cuda", "triton")


def median_ms(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def check_window_attention(device: str = "cuda", dtypes=("bfloat16",), backends=WINDOW_BACKENDS, cases=SAM2_WINDOW_CASES,
                           reps: int = 10, print_fn=print) -> bool:
    """SAM 2's window attention (ops.window_attention) on each backend against the "torch"
    path and float64 by :mod:`hiera_kernels.error_rule` (out, dqkv, dpad), with the median
    forward and forward+backward times next to the torch path's. A backend whose ``OPS``
    lacks the op is reported "not implemented" (not a failure); one that cannot run here
    is a SKIP with its reasons."""
    from .. import ops
    from ..__main__ import DTYPES
    from ..backends import BACKENDS
    from ..error_rule import judge

    device = torch.device(device)
    ok, counts = True, collections.Counter()
    for name, batch, H, W, heads, hd, window_size, q_stride in cases:
        gen = torch.Generator().manual_seed(0)
        C = heads * hd
        qkv = torch.randn(batch, H, W, 3 * C, generator=gen).to(device)
        pad = torch.randn(3 * C, generator=gen).to(device)
        grad = torch.randn(batch, H // q_stride, W // q_stride, C, generator=gen).to(device)
        print_fn(f"window_attention {name}: qkv {list(qkv.shape)}, {heads} heads of {hd}, window {window_size or 'global'}, "
                 f"q_stride {q_stride}, on {device}")
        # (qkv, pad, grad) per dtype, converted once, outside the timed calls.
        inputs = {dtype: (qkv.to(dtype), pad.to(dtype), grad.to(dtype)) for dtype in [torch.float64] + [DTYPES[d] for d in dtypes]}

        def run(backend, dtype, backward=True):
            q, p = inputs[dtype][0].detach().requires_grad_(), inputs[dtype][1].detach().requires_grad_()
            out = ops.window_attention(q, heads, window_size, q_stride, pad=p, backend=backend)
            if not backward:
                return (out,)
            return (out.detach(), *torch.autograd.grad(out, (q, p), inputs[dtype][2]))

        reference = run("torch", torch.float64)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            want = run("torch", dtype)
            torch_ms = (median_ms(lambda: run("torch", dtype, False), device, reps), median_ms(lambda: run("torch", dtype), device, reps))
            for backend in backends:
                label = f"{backend:6s} {dtype_name:8s}"
                if "window_attention" not in BACKENDS[backend].OPS:
                    counts["not implemented"] += 1
                    print_fn(f"  n/a  {label} not implemented (the {backend!r} backend has no window_attention kernel)")
                    continue
                reasons = BACKENDS[backend].not_supported_reasons("window_attention", device, dtype, stride=q_stride * q_stride, head_dim=hd)
                if reasons:
                    counts["SKIP"] += 1
                    print_fn(f"  SKIP {label} {'; '.join(reasons)}")
                    continue
                try:
                    got = run(backend, dtype)
                    ms = (median_ms(lambda: run(backend, dtype, False), device, reps), median_ms(lambda: run(backend, dtype), device, reps))
                except Exception as exc:  # a backend that fails is a FAIL with its reason, then the next one
                    ok = False
                    counts["FAIL"] += 1
                    print_fn(f"  FAIL {label} {type(exc).__name__}: {exc}")
                    continue
                for what, g, t, r in zip(("out", "dqkv", "dpad"), got, want, reference):
                    verdict = judge(g, t, r)
                    ok &= verdict.passed
                    counts["PASS" if verdict.passed else "FAIL"] += 1
                    print_fn(f"  {'PASS' if verdict.passed else 'FAIL'} {label} {what:4s} {verdict.describe()}")
                print_fn(f"  time {label} forward {ms[0]:.3f} ms (torch {torch_ms[0]:.3f}), "
                         f"forward+backward {ms[1]:.3f} ms (torch {torch_ms[1]:.3f})")
    print_fn("summary: " + ", ".join(f"{counts[k]} {k}" for k in ("PASS", "FAIL", "SKIP", "not implemented") if counts[k] or k in ("PASS", "FAIL")))
    return ok


def window_part(device: str, dtypes: List[str]) -> int:
    return 0 if check_window_attention(device, tuple(dtypes)) else 1


# ------------------------------------------------------------ compile metadata
def cuda_kernel_usage(so: str) -> List[dict]:
    """Registers, static shared memory, stack and local (spill) bytes of every CUDA
    kernel compiled into the extension, per arch, by ``cuobjdump -res-usage``."""
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("no cuobjdump (PATH, CUDA_HOME or Triton's)")
    rows = parse_res_usage(run_tool([tool, "-res-usage", so], timeout=120))
    names = demangle([r["kernel"] for r in rows])
    for r in rows:
        r["kernel"] = names.get(r["kernel"], r["kernel"])
    return rows


def parse_res_usage(text: str) -> List[dict]:
    """``cuobjdump -res-usage``'s text -> one row per (arch, kernel), names as mangled."""
    rows, arch, source, function = [], None, None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("identifier = "):
            source = os.path.basename(line.split("=", 1)[1].strip())
        elif line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif function and line.startswith("REG:"):
            usage = dict(re.findall(r"([A-Z]+):(\d+)", line))
            rows.append({"arch": arch, "source": source, "kernel": function, "registers": int(usage.get("REG", 0)),
                         "shared_bytes": int(usage.get("SHARED", 0)), "stack_bytes": int(usage.get("STACK", 0)),
                         "local_bytes": int(usage.get("LOCAL", 0))})
            function = None
    return rows


def demangle(symbols: List[str]) -> Dict[str, str]:
    """``symbol -> 'namespace::kernel<args>'`` (the parameter list dropped) by c++filt, where there is one."""
    tool = shutil.which("c++filt")
    if not tool or not symbols:
        return {}
    unique = sorted(set(symbols))
    done = subprocess.run([tool], input="\n".join(unique), capture_output=True, text=True)
    names = done.stdout.splitlines()
    if done.returncode or len(names) != len(unique):
        return {}
    # The parameter list is the last "(...)" (template arguments come before it).
    short = lambda n: n[: n.rfind("(")].removeprefix("void ").replace("hiera_kernels::", "").replace("(anonymous namespace)::", "")  # noqa: E731
    return {s: short(n) for s, n in zip(unique, names)}


def triton_cache_kernels(cache_dir: Path) -> List[dict]:
    """The GPU kernels Triton compiled into ``cache_dir`` (each with its metadata JSON
    and PTX), with registers and spills by ptxas -v on that PTX."""
    from ..triton import aot

    found = []
    for meta_path in sorted(cache_dir.glob("*/*.json")):
        if meta_path.name.startswith("__grp__"):
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            continue
        target = meta.get("target") or {}
        ptx = meta_path.with_suffix(".ptx")
        if target.get("backend") != "cuda" or not ptx.exists():
            continue
        found.append((meta, ptx, int(target["arch"])))

    def one(item):
        meta, ptx, arch = item
        registers, spills = aot._ptxas_usage(ptx.read_text(), arch)
        # The metadata has no argument types or constexprs; the pointer types are in the TTIR.
        ttir = ptx.with_suffix(".ttir")
        dtypes = sorted(set(re.findall(r"!tt\.ptr<(\w+)>", ttir.read_text()))) if ttir.exists() else []
        return {"kernel": meta.get("name", ptx.stem), "ours": meta.get("name") in aot._KERNELS, "arch": f"sm_{arch}",
                "pointer_dtypes": ",".join(dtypes),
                "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages"),
                "shared_bytes": meta.get("shared"), "registers": registers, "spill_bytes": spills}

    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, found))


def metadata_part(device: str, out: Path) -> int:
    from .._extension import EXTENSION

    data: Dict[str, object] = {}
    ok = True
    cache = out / "triton_cache"
    if device == "cuda":
        try:
            kernels = triton_cache_kernels(cache)
        except Exception as exc:
            ok = False
            print(f"Triton kernels: FAILED to read the cache {cache}: {type(exc).__name__}: {exc}")
            kernels = []
        data["triton"] = kernels
        ours = [k for k in kernels if k["ours"]]
        print(f"Triton: {len(kernels)} GPU kernels compiled by this report's steps ({cache}), {len(ours)} of them hiera_kernels'; "
              f"{len(kernels) - len(ours)} others (torch.compile's), of which {sum(1 for k in kernels if not k['ours'] and k['spill_bytes'])} spill")
        print(f"{'arch':6} {'kernel':32} {'pointers':16} {'warps':>5} {'stages':>6} {'smem B':>7} {'regs':>5} {'spill B':>7}")
        for k in sorted(ours, key=lambda k: (k["kernel"], k["pointer_dtypes"], k["num_warps"], k["num_stages"], k["registers"] or 0)):
            print(f"{k['arch']:6} {k['kernel']:32} {k['pointer_dtypes']:16} {k['num_warps']:>5} {k['num_stages']:>6} "
                  f"{k['shared_bytes']!s:>7} {k['registers']!s:>5} {k['spill_bytes']!s:>7}")
    else:
        print("No GPU kernel ran on cpu: there are no Triton compile metadata to read (the Triton backend runs on CUDA "
              "tensors only; on a CPU it needs the interpreter, which compiles nothing). Instead: the static resource "
              "usage of the CUDA C++ kernels built into the extension, which needs no GPU. For the Triton kernels' "
              "registers and spills without a GPU run `python -m hiera_kernels.triton.aot --arch 80 90 --ptxas-report`.")
    module = sys.modules.get("hiera_kernels._C")
    so = getattr(module, "__file__", None)
    if not (EXTENSION.loaded and EXTENSION.with_cuda and so):
        print(f"CUDA C++ kernels: none to read (extension loaded: {EXTENSION.loaded}, CUDA compiled in: {EXTENSION.with_cuda})")
    else:
        try:
            rows = cuda_kernel_usage(so)
        except Exception as exc:
            ok = False
            print(f"CUDA C++ kernels: FAILED to read their resource usage: {type(exc).__name__}: {exc}")
            rows = []
        data["cuda"] = rows
        archs = sorted({r["arch"] for r in rows})
        if torch.cuda.is_available():  # the GPU's own arch: what ran
            major, minor = torch.cuda.get_device_capability()
            show = f"sm_{major}{minor}"
        else:
            show = archs[-1] if archs else None
        print(f"CUDA C++ kernels in {os.path.basename(so)} (cuobjdump -res-usage; shared memory is the static part, "
              f"dynamic shared memory is set at launch):")
        for arch in archs:
            of = [r for r in rows if r["arch"] == arch]
            print(f"  {arch}: {len(of)} kernels, registers {min(r['registers'] for r in of)}-{max(r['registers'] for r in of)}, "
                  f"{sum(1 for r in of if r['local_bytes'] or r['stack_bytes'])} with local memory or stack (spills)")
        if show:
            print(f"{show}, by kernel:")
            print(f"  {'regs':>4} {'smem B':>6} {'stack B':>7} {'local B':>7}  {'source':32} kernel")
            for r in sorted((r for r in rows if r["arch"] == show), key=lambda r: (r["source"] or "", r["kernel"])):
                kernel = r["kernel"] if len(r["kernel"]) <= 90 else r["kernel"][:87] + "..."
                print(f"  {r['registers']:>4} {r['shared_bytes']:>6} {r['stack_bytes']:>7} {r['local_bytes']:>7}  {r['source'] or '?':32} {kernel}")
    save_data(data)
    found = []
    if "triton" in data:
        triton_rows = data["triton"]
        found.append(f"Triton: {len(triton_rows)} kernels compiled, {sum(1 for k in triton_rows if k['ours'])} ours, "
                     f"{sum(1 for k in triton_rows if k['spill_bytes'])} spilling")
    if data.get("cuda"):
        cuda_rows = data["cuda"]
        found.append(f"CUDA C++: {len(cuda_rows)} kernels ({' '.join(sorted({r['arch'] for r in cuda_rows}))}), "
                     f"up to {max(r['registers'] for r in cuda_rows)} registers, "
                     f"{sum(1 for r in cuda_rows if r['local_bytes'] or r['stack_bytes'])} with local memory or stack")
    print("summary: " + ("; ".join(found) or "no kernel metadata"))
    return 0 if ok else 1


def part_main(argv: Optional[List[str]] = None) -> int:
    """``python -m hiera_kernels.tools.report <part> ...``: one step's body, as the report runs it."""
    parser = argparse.ArgumentParser(prog="python -m hiera_kernels.tools.report")
    sub = parser.add_subparsers(dest="part", required=True)
    e = sub.add_parser("env")
    c = sub.add_parser("check")
    c.add_argument("model")
    m = sub.add_parser("mae")
    m.add_argument("model")
    m.add_argument("--input-size", help="comma-separated, e.g. 4,64,64")
    m.add_argument("--small", action="store_true", help="fewer blocks (see small_mae)")
    w = sub.add_parser("window")
    w.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=CHECK_DTYPES)
    d = sub.add_parser("metadata")
    for p in (e, c, m, w, d):
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", default=".")
    for p in (c, m):
        p.add_argument("--dtype", default="float32", choices=CHECK_DTYPES)
        p.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if args.part == "env":
        return env_part(args.device)
    if args.part == "check":
        return check_part(args.model, args.device, args.dtype, args.batch)
    if args.part == "mae":
        return mae_part(args.model, args.device, args.dtype, args.batch, args.input_size, args.small)
    if args.part == "window":
        return window_part(args.device, args.dtypes)
    return metadata_part(args.device, Path(args.out))


if __name__ == "__main__":
    sys.exit(part_main())
