"""``python -m hiera_kernels {bench,check,info,report}`` (also the ``hiera-kernels`` command)."""

from __future__ import annotations

import argparse
import sys

import torch

from .models import CLASSIFIERS
from .tools import no_gpu_refusal
from .tools.sam2_bench import SAM2_MODELS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hiera_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    b = sub.add_parser("bench", help="time the whole model: official vs each backend vs the GEMM floor (the default)")
    b.add_argument("--model", default="hiera_base_224", choices=CLASSIFIERS + tuple(SAM2_MODELS), metavar="MODEL",
                   help="a classifier factory name (default hiera_base_224), or SAM 2's trunk: " + ", ".join(SAM2_MODELS)
                   + " (its own rows: unpatched vs patched, eager and compiled, at 1024x1024 unless --input-size)")
    b.add_argument("--batch", type=int, help="default 8, or 1 with --input-size")
    b.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CPUs with bf16, float16 on GPUs, else float32")
    b.add_argument("--device", default="cpu")
    b.add_argument("--backends", help="comma-separated backend names (default: every backend that runs the model, and auto)")
    b.add_argument("--mode", choices=["infer", "train", "both"], default="infer")
    b.add_argument("--quick", action="store_true", help="1 warm-up step and 3 timed rounds instead of 3 and 10")
    b.add_argument("--out", help="directory for bench.csv, bench.json and bench.png (the chart needs Pillow)")
    b.add_argument("--profile", action="store_true", help="also print where the fastest row spends its time, by op")
    b.add_argument("--compile", action="store_true", help="add the official, hiera-optim and auto rows under torch.compile")
    b.add_argument("--patch", choices=["timm"], help="instead: timm's model vs the same model after hiera_kernels.patch, eager and compiled")
    b.add_argument("--input-size", type=int, metavar="N", help="N x N images (16 x N x N for video models; a multiple of 32), e.g. 448 or 1024; implies --memory")
    b.add_argument("--memory", action="store_true", help="add each eager row's peak memory over one step, measured in a fresh process per row")
    b.add_argument("--no-progress", action="store_true", help="no progress line on stderr (it is drawn only on a terminal anyway)")
    c = sub.add_parser("check", help="cross-check every available backend against the torch path")
    c.add_argument("--model", default="hiera_tiny_224", choices=CLASSIFIERS, metavar="MODEL", help="a classifier factory name")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", choices=list(DTYPES), default="float32")
    c.add_argument("--batch", type=int, default=2)
    sub.add_parser("info", help="versions, build, and why each backend is or is not available")
    r = sub.add_parser("report", help="every step (env, check, tests, microbenchmarks, bench, compile metadata) in one time-boxed run")
    r.add_argument("--device", choices=["cuda", "cpu"], required=True)
    r.add_argument("--quick", action="store_true", help="fewer configurations (on a CPU: ~30 s on 2 idle cores)")
    r.add_argument("--budget", type=float, metavar="MINUTES", help="the whole run's time (default 10; 5 with --quick)")
    r.add_argument("--out", required=True, metavar="DIR", help="directory for report.md, report.json and the logs")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["bench"])
    refusal = no_gpu_refusal(args.command, getattr(args, "device", "cpu"))  # info has no --device
    if refusal:
        print(refusal)
        return 2

    if args.command == "bench":
        from .tools.bench import bench, bench_patched

        batch = args.batch if args.batch is not None else (1 if args.input_size else 8)
        if args.model in SAM2_MODELS:
            from .tools.sam2_bench import bench_sam2

            ignored = [flag for flag, value in (("--patch", args.patch), ("--backends", args.backends), ("--compile", args.compile),
                                                ("--profile", args.profile), ("--out", args.out)) if value]
            if ignored:
                parser.error(f"bench --model {args.model} runs its own four rows and takes none of {', '.join(ignored)}")
            bench_sam2(
                args.model,
                batch=args.batch or 1,
                dtype=DTYPES[args.dtype] if args.dtype else None,
                device=args.device,
                mode=args.mode,
                quick=args.quick,
                input_size=args.input_size,
                memory=True,
            )
            return 0
        if args.patch:
            ignored = [flag for flag, value in (("--input-size", args.input_size), ("--memory", args.memory),
                                                ("--backends", args.backends), ("--compile", args.compile),
                                                ("--profile", args.profile), ("--out", args.out)) if value]
            if ignored:
                parser.error(f"bench --patch runs its own four rows and takes none of {', '.join(ignored)}")
            bench_patched(
                args.patch,
                model_name=args.model,
                batch=batch,
                dtype=DTYPES[args.dtype] if args.dtype else None,
                device=args.device,
                mode=args.mode,
                quick=args.quick,
            )
            return 0
        bench(
            model_name=args.model,
            batch=batch,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            device=args.device,
            backend_names=args.backends.split(",") if args.backends else None,
            mode=args.mode,
            quick=args.quick,
            out_dir=args.out,
            profile=args.profile,
            compile=args.compile,
            progress=not args.no_progress,
            input_size=args.input_size,
            memory=args.memory or args.input_size is not None,
        )
        return 0
    if args.command == "check":
        from .tools.check import check

        return 0 if check(args.model, args.device, DTYPES[args.dtype], args.batch) else 1
    if args.command == "report":
        from .tools.report import report

        return report(args.device, args.quick, args.budget, args.out)
    from .tools.info import info

    info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
