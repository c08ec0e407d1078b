"""``python -m hiera_kernels info``: versions, device, build, and every backend's status."""

from __future__ import annotations

import platform

import torch

from .. import __version__, backends, epilogues, layer_norm
from .._extension import EXTENSION


def info(print_fn=print) -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not importable ({exc})"
    print_fn(f"hiera_kernels {__version__}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {triton_version}")
    print_fn(f"python {platform.python_version()}  {platform.machine()}  CPU capability {torch.backends.cpu.get_cpu_capability()}  threads {torch.get_num_threads()}")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    print_fn(f"GPUs: {', '.join(gpus) if gpus else 'none'}")
    built = "loaded" if EXTENSION.loaded else f"NOT loaded ({EXTENSION.error})"
    print_fn(f"extension hiera_kernels._C: {built}; CUDA sources compiled in: {EXTENSION.with_cuda}")
    if EXTENSION.loaded:
        from .. import _C

        d = _C.cpu_dispatch()  # csrc/cpu/cpu_dispatch.h: the build of the CPU kernels in use
        print_fn(f"CPU kernels: {d['path']} (ATen {d['aten']}; compiled: {', '.join(d['compiled'])}; "
                 f"this CPU runs: {', '.join(d['supported'])})")
        for build, lacks in zip(d["compiled"], d["missing"]):
            if lacks:
                print_fn(f"  {build}: this CPU lacks {lacks}")
        if d["note"]:
            print_fn(f"  note: {d['note']}")
    print_fn(f"default backend: {backends.get_backend()}")
    for device in ["cpu", "cuda"]:
        order = backends.AUTO_ORDER[device]
        print_fn(f"{device} tensors (auto order: {' > '.join(order)}):")
        for name, backend in backends.BACKENDS.items():
            reasons = backends.backend_reasons(device)[name]
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            if not reasons and backend.by_name_only(torch.device(device)):
                status += " by name only (the Triton interpreter, for tests)"
            elif not reasons and name not in order:
                status += " by name only (auto skips it)"
            ops = ", ".join(backend.OPS) or "-"
            print_fn(f"  {name:7s} ops [{ops}]  {status}")
    print_fn(epilogues.status())
    print_fn(layer_norm.status())
