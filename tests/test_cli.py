"""Smoke tests of `python -m hiera_kernels bench | check | info` on a tiny model."""

import importlib.util
import io
import json
import subprocess
import sys
import types

import pytest
import torch

from hiera_kernels.__main__ import main
from hiera_kernels.tools.bench import (FLOOR_NAME, FREEZING_ROW, HIERA_OPTIM_NOTE, PEAK_COLUMN, Progress, Row, bench,
                                        interleaved_medians, official_symbols_for_hiera_optim, save)
from hiera_kernels.tools.chart import FLOOR_COLOUR

TINY = dict(model_name="hiera_tiny_224", batch=1, dtype=torch.float32, quick=True)

from helpers import official, without_interpreter


def test_bench_quick_prints_the_table_and_writes_files(tmp_path, capsys):
    assert main(["bench", "--model", "hiera_tiny_224", "--batch", "1", "--dtype", "float32", "--quick", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "hiera_tiny_224 batch=1 dtype=float32" in out
    assert "\r" not in err  # no progress line when stderr is not a terminal
    for row in ["official (eager)", "hiera_kernels [torch]", "hiera_kernels [auto]", "GEMM floor"]:
        assert row in out
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    timed = [r for r in rows if r["name"].startswith("hiera_kernels")]
    assert timed and all(r["ms"] > 0 and r["max_abs_err"] <= r["err_limit"] for r in timed)  # the error rule
    assert all(r["moved_mb"] > 0 and r["saved_mb"] is None for r in timed)  # inference: nothing saved
    assert "MB moved outside GEMM (fwd)" in out
    assert (tmp_path / "bench.csv").read_text().startswith("name,mode,ms")
    assert (tmp_path / "bench.png").exists() == ("bench.png in" in out) == (importlib.util.find_spec("PIL") is not None)
    if importlib.util.find_spec("hiera_optim"):  # timed, with the two shims it needs on hiera-transformer 0.1.4
        line = next(line for line in out.splitlines() if line.startswith("| hiera-optim "))
        assert float(line.split("|")[3]) > 0 and HIERA_OPTIM_NOTE in line, line
        assert "(<=" in line.split("|")[7], line  # logits within the error rule: same weights, same input
        assert not hasattr(official, "apply_fusion_head")  # `hiera` left as bench found it
    else:
        assert "(no hiera-optim row: hiera_optim is not importable: No module named 'hiera_optim')" in out


def test_bench_compile_rows(capsys):
    import torch._inductor.config as inductor_config

    freezing = inductor_config.freezing
    main(["bench", "--model", "hiera_tiny_224", "--batch", "1", "--dtype", "float32", "--quick", "--backends", "cpu", "--compile"])
    out = capsys.readouterr().out
    assert inductor_config.freezing == freezing  # the freezing row's option stays scoped to its own compile
    for row in ["official + torch.compile", "hiera_kernels [auto] + torch.compile", FREEZING_ROW]:
        line = next(line for line in out.splitlines() if line.startswith(f"| {row} "))
        assert "failed" not in line, line
        cells = [c.strip() for c in line.split("|")]
        assert float(cells[3]) > 0 and "(<=" in cells[7], line  # ms/batch; logits error within the rule


def test_bench_input_size_times_and_measures_peak_memory(capsys):
    main(["bench", "--model", "hiera_tiny_224", "--dtype", "float32", "--quick", "--backends", "cpu,torch", "--input-size", "256"])
    out = capsys.readouterr().out
    assert "hiera_tiny_224 batch=1 dtype=float32" in out and "input=256x256" in out  # batch 1 by default with --input-size
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| row "))
    column = [c.strip() for c in header.split("|")].index(PEAK_COLUMN)
    peaks = {}
    for row in ["official (eager)", "hiera_kernels [cpu]", "hiera_kernels [torch]"]:
        cells = [c.strip() for c in next(line for line in lines if line.startswith(f"| {row} ")).split("|")]
        assert float(cells[3]) > 0 and "(<=" in cells[7], cells
        peaks[row] = float(cells[column])
    # One 256x256 forward's activations: stage 1 alone is [1, 4096, 96] floats (1.6 MB) several times over.
    assert all(1 < mb < 1000 for mb in peaks.values()), peaks
    floor = [c.strip() for c in next(line for line in lines if line.startswith(f"| {FLOOR_NAME}")).split("|")]
    assert floor[column] == "-"  # measured per row, not for the floor


def test_bench_input_size_must_fill_whole_mask_units():
    with pytest.raises(ValueError, match="--input-size 240 gives 60 tokens a side; .* a multiple of 32"):
        bench(**TINY, backend_names=["torch"], input_size=240)


def test_rows_are_timed_once_a_round_in_shuffled_orders():
    """Every round runs every row once, in its own order (no row always after the same
    one), the same orders on every run (seeded); each row's median comes back."""
    def record(runs):
        steps = {name: (lambda name=name: runs.append(name)) for name in "abcd"}
        return interleaved_medians(steps, torch.device("cpu"), 6)

    first, second = [], []
    medians = record(first)
    record(second)
    rounds = [first[i:i + 4] for i in range(0, 24, 4)]
    assert sorted(medians) == list("abcd") and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1 and first == second


def test_peak_memory_counts_what_a_step_allocates():
    from hiera_kernels.tools.peak_memory import peak_mb

    spec = dict(kind="hiera_kernels", backend="torch", model="hiera_tiny_224", input_size=None, batch=1,
                image_shape=[3, 224, 224], dtype="float32", device="cpu", mode="infer")
    one = peak_mb(spec)
    four = peak_mb(dict(spec, batch=4))
    assert 0 < one < four  # four images need more activation memory than one
    with pytest.raises(RuntimeError, match="peak memory subprocess failed: .*hiera_nope"):
        peak_mb(dict(spec, model="hiera_nope"))


def test_bench_profile_prints_the_op_table(capsys):
    main(["bench", "--model", "hiera_tiny_224", "--batch", "1", "--dtype", "float32", "--quick", "--backends", "cpu", "--profile"])
    out = capsys.readouterr().out
    assert "Where the time goes: hiera_kernels [cpu]" in out
    assert "hiera_kernels::mask_unit_attention" in out and "Self CPU" in out


def test_bench_reports_a_backend_that_cannot_run_instead_of_crashing(capsys):
    main(["bench", "--model", "hiera_tiny_224", "--batch", "1", "--dtype", "float32", "--quick", "--backends", "torch,cuda"])
    out = capsys.readouterr().out
    assert "hiera_kernels [cuda]" in out and "failed: " in out and "backend 'cuda' cannot run" in out


def test_bench_hiera_optim_row_that_cannot_be_built_says_why(monkeypatch, capsys):
    def optimize(model, **kwargs):
        raise RuntimeError("no adapter for this model\nsecond line")

    fake = types.ModuleType("hiera_optim")
    fake.__version__, fake.optimize = "9.9", optimize
    monkeypatch.setitem(sys.modules, "hiera_optim", fake)
    rows = bench(**TINY, backend_names=["torch"])
    failed = next(r for r in rows if r.name.startswith("hiera-optim"))
    assert failed.name == "hiera-optim 9.9 (eager)" and failed.note == "failed: RuntimeError: no adapter for this model"
    assert failed.ms is None  # nothing was timed
    assert [r.name for r in rows][-2:] == ["hiera_kernels [torch]", "GEMM floor (Linears + conv alone)"]
    assert "hiera-optim 9.9 (eager): failed: RuntimeError: no adapter for this model" in capsys.readouterr().out


def rows_of_both_modes():
    failed = Row("hiera-optim 0.2.1 (eager)", "infer", None, None, None, None, None, note="failed: TypeError: x")
    return [
        Row("official (eager)", "infer", 800.0, 10.0, 1.0, 2.0, 1e-5), failed, Row("hiera_kernels [auto]", "infer", 600.0, 13.3, 1.33, 1.5, 1e-5),
        Row(FLOOR_NAME, "infer", 400.0, 20.0, None, 1.0, None),
        Row("official (eager)", "train", 2000.0, 4.0, 1.0, 2.0, 1e-5), Row(FLOOR_NAME, "train", 1000.0, 8.0, None, 1.0, None),
    ]


def test_save_draws_the_chart_with_the_floor_line(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    save(rows_of_both_modes(), str(tmp_path), "hiera_tiny_224", 1, torch.float32, "cpu", "title line 1 | line 2")
    assert capsys.readouterr().out == f"wrote bench.csv, bench.json and bench.png in {tmp_path}\n"
    image = Image.open(tmp_path / "bench.png").convert("RGB")
    assert image.width > 800 and image.height > 200
    assert FLOOR_COLOUR in {colour for _, colour in image.getcolors(maxcolors=1 << 16)}


def test_save_says_why_it_skipped_the_chart_without_pillow(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` raise ImportError
    save(rows_of_both_modes(), str(tmp_path), "hiera_tiny_224", 1, torch.float32, "cpu", "title")
    out = capsys.readouterr().out
    assert out.startswith(f"wrote bench.csv and bench.json in {tmp_path}; skipped bench.png: Pillow is not importable (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv", "bench.json"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_is_redrawn_on_a_terminal_and_silent_elsewhere():
    terminal = Terminal()
    progress = Progress(total=4, stream=terminal)
    progress.step("infer: warm-up official (eager)")
    progress.step("infer: timing, round 1/3")
    progress.clear()
    drawn = terminal.getvalue()
    assert drawn.startswith("\r[....................] 0/4 infer: warm-up official (eager) (0 s)")
    assert "\r[#####...............] 1/4 infer: timing, round 1/3 (0 s)" in drawn
    assert "\n" not in drawn and drawn.endswith(" \r")  # cleared: the next print starts a clean line
    for stream, enabled in [(io.StringIO(), True), (Terminal(), False)]:  # a pipe, or --no-progress
        Progress(total=4, enabled=enabled, stream=stream).step("anything")
        assert stream.getvalue() == ""


def test_unknown_model_is_a_usage_error(capsys):
    for command in ["bench", "check"]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--model", "resnet50"])
        assert exit_info.value.code == 2
        assert "argument --model: invalid choice: 'resnet50'" in capsys.readouterr().err


def test_check_passes_and_lists_every_op(capsys):
    assert main(["check", "--model", "hiera_tiny_224", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "all checks passed" in out
    for op in ["unroll", "reroll", "query_pool", "whole model logits", "whole model stage 4 features"]:
        assert op in out


def test_info_reports_every_backend_and_why():
    done = subprocess.run([sys.executable, "-m", "hiera_kernels", "info"], capture_output=True, text=True, timeout=300,
                          env=without_interpreter())
    assert done.returncode == 0, done.stderr
    assert "extension hiera_kernels._C: loaded" in done.stdout
    assert "cuda    ops [unroll, reroll, query_pool, mask_unit_attention, window_attention]  unavailable: runs on cuda tensors, not cpu" in done.stdout
    assert "triton  ops [unroll, reroll, query_pool, mask_unit_attention, window_attention]  unavailable: runs on cuda tensors" in done.stdout
    assert "no CUDA device is available" in done.stdout
    assert "LayerNorm and GELU-backward CPU kernels (backends cpu/auto, CPU tensors): available" in done.stdout


def test_hiera_optim_shim_restores_the_official_module():
    assert not hasattr(official, "apply_fusion_head")
    with pytest.raises(RuntimeError, match="inside"):
        with official_symbols_for_hiera_optim(official):
            assert official.apply_fusion_head is official.hiera_mae.apply_fusion_head
            raise RuntimeError("inside")
    assert not hasattr(official, "apply_fusion_head")


def test_bench_patch_refuses_the_options_it_would_ignore(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--patch", "timm", "--input-size", "448"])
    assert "bench --patch runs its own four rows and takes none of --input-size" in capsys.readouterr().err


def test_bench_patch_timm(capsys):
    """bench --patch timm: timm's model against itself patched, eager and compiled."""
    assert main(["bench", "--patch", "timm", "--model", "hiera_tiny_224", "--batch", "1", "--dtype", "float32", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "timm hiera_tiny_224, patched vs unpatched batch=1 dtype=float32" in out
    for row in ["timm (eager)", "timm + torch.compile", "timm patched [auto] (eager)", "timm patched [auto] + torch.compile"]:
        line = next(line for line in out.splitlines() if line.startswith(f"| {row} "))
        cells = [c.strip() for c in line.split("|")]
        assert float(cells[3]) > 0 and "(<=" in cells[7], line  # ms/batch; logits within the rule vs float64 timm
        assert float(cells[7].split("(<= ")[1].rstrip(")")) > 0, line  # a real limit: the logits are not all zero
