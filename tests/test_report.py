"""`python -m hiera_kernels report`: the CPU plan end to end (every step), the budget
cutting a step short, `--device cuda` without a GPU, and the compile-metadata readers."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hiera_kernels.__main__ import main
from hiera_kernels.tools import report

from helpers import without_interpreter

GROUPS = ["env", "check", "tests", "microbench", "bench", "compile metadata"]


def run_report(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hiera_kernels", "report", "--device", "cpu", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=without_interpreter(),
                          cwd=report.ROOT)


def test_cpu_quick_report_runs_every_step_and_writes_both_files(tmp_path):
    # --budget 20: the quick plan's default 5 minutes is sized for 2 idle cores; a CI
    # machine busy with other work must not cut a step short here (the next test cuts).
    done = run_report(tmp_path, "--quick", "--budget", "20", timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    doc = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    planned = [s.name for s in report.plan("cpu", True, tmp_path)]
    steps = doc["steps"]
    assert [s["name"] for s in steps] == planned and doc["pending"] == []
    assert sorted({s["group"] for s in steps}) == sorted(GROUPS)
    for s in steps:
        assert s["status"] == "passed", s
        assert f"| {s['name']} | passed |" in md  # the steps table
        assert (tmp_path / s["log"]).is_file() and f"### {planned.index(s['name']) + 1}. {s['name']}: passed" in md
    checks = [s for s in steps if s["group"] == "check"]
    assert len(checks) >= 3 and any("mae" in s["name"] for s in checks)
    for s in checks:
        assert "PASS" in s["summary"] and " 0 FAIL" in s["summary"], s["summary"]
    assert doc["environment"]["summary"]["extension"] and "extension" in md
    tests = next(s for s in steps if s["group"] == "tests")
    assert " passed" in tests["summary"] and "failed" not in tests["summary"]
    assert json.loads((tmp_path / "microbench.json").read_text())["benchmarks"]
    assert (tmp_path / "bench-eager" / "bench.json").is_file()
    metadata = next(s for s in steps if s["group"] == "compile metadata")
    assert "No GPU kernel ran on cpu" in (tmp_path / metadata["log"]).read_text()
    assert metadata["summary"].startswith("CUDA C++: ") or metadata["summary"] == "no kernel metadata"
    assert "finished;" in md and "load average at start" in md


def test_a_step_past_its_share_of_the_budget_is_cut_short_and_the_rest_not_run(tmp_path):
    # 6 s in all: the first steps' shares (fractions of a second) cannot even import
    # torch; once under 3 s are left the rest are not started.
    done = run_report(tmp_path, "--quick", "--budget", "0.1", timeout=300)
    assert done.returncode == 1
    steps = json.loads((tmp_path / "report.json").read_text())["steps"]
    assert steps[0]["status"] == "cut short" and "cut short at its share of the budget" in steps[0]["summary"]
    assert len(steps) == len(report.plan("cpu", True, tmp_path))  # every step is listed, run or not
    assert {s["status"] for s in steps} == {"cut short", "not run (budget spent)"}
    assert steps[-1]["status"] == "not run (budget spent)"
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | environment | cut short |" in md and "not run (budget spent)" in md
    assert "== [1/" in done.stdout and ": cut short in " in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal without a GPU")
def test_cuda_report_without_a_gpu_exits_non_zero_at_once(tmp_path, capsys):
    assert main(["report", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "report --device cuda: no CUDA device is available here" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()  # nothing was run or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal without a GPU")
@pytest.mark.parametrize("command", [["check"], ["bench", "--quick"]])
def test_cuda_check_and_bench_without_a_gpu_exit_2_saying_why(command, capsys):
    assert main([*command, "--device", "cuda"]) == 2
    out = capsys.readouterr().out
    assert f"{command[0]} --device cuda: no CUDA device is available here" in out
    assert f"run `python -m hiera_kernels {command[0]} --device cpu`" in out


def test_cuda_kernel_usage_parses_cuobjdump():
    text = textwrap.dedent("""
        Fatbin elf code:
        ================
        arch = sm_90
        identifier = /src/csrc/cuda/query_pool.cu

        Resource usage:
         Common:
          GLOBAL:0
         Function _Z1fv:
          REG:40 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:448 TEXTURE:0 SURFACE:0 SAMPLER:0
        """)
    assert report.parse_res_usage(text) == [{"arch": "sm_90", "source": "query_pool.cu", "kernel": "_Z1fv", "registers": 40,
                                             "shared_bytes": 1024, "stack_bytes": 8, "local_bytes": 16}]


def test_triton_cache_kernels_reads_what_triton_compiled(tmp_path):
    """The compile-metadata step's reader, on a kernel compiled for sm_90 into an empty
    cache (no GPU needed; the interpreter must be off, so in a subprocess)."""
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from hiera_kernels.triton import aot
        from hiera_kernels.tools.report import triton_cache_kernels
        spec = next(s for s in aot.all_specializations() if s.kernel == "_query_pool_kernel")
        aot.compile_one(spec, 90)
        print(json.dumps(triton_cache_kernels(Path(sys.argv[1]))))
        """)
    env = dict(without_interpreter(), TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = json.loads(done.stdout.splitlines()[-1])
    assert len(kernels) == 1, kernels
    k = kernels[0]
    assert k["kernel"] == "_query_pool_kernel" and k["ours"] and k["arch"] == "sm_90"
    assert k["registers"] > 0 and k["spill_bytes"] == 0 and k["shared_bytes"] is not None and k["num_warps"] == 4


def test_window_attention_check_reports_a_backend_without_the_kernel_as_not_implemented(monkeypatch):
    """The GPU plan's window_attention step, on a tiny padded and cropped case on CPU
    tensors: a backend whose OPS lacks the op is "not implemented" (not a failure), one
    that cannot run here a SKIP with its reasons, and one that runs is judged and timed."""
    from hiera_kernels.backends import BACKENDS, MASK_UNIT_OPS

    monkeypatch.setattr(BACKENDS["triton"], "OPS", MASK_UNIT_OPS)
    lines = []
    ok = report.check_window_attention("cpu", ("float32",), backends=("torch", "triton", "cuda"),
                                       cases=[("tiny", 1, 9, 7, 2, 8, 4, 2)], reps=1, print_fn=lines.append)
    assert ok, "\n".join(lines)
    assert any(line.startswith("  n/a  triton") and "not implemented" in line for line in lines)
    assert any(line.startswith("  SKIP cuda") and "runs on cuda tensors, not cpu" in line for line in lines)
    assert sum(line.startswith("  PASS torch") for line in lines) == 3  # out, dqkv, dpad
    assert any(line.startswith("  time torch") for line in lines)
    assert lines[-1] == "summary: 3 PASS, 0 FAIL, 1 SKIP, 1 not implemented"
    assert "check window_attention SAM 2 blocks bfloat16" in [s.name for s in report.plan("cuda", True, Path("r"))]
