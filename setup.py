"""Builds hiera_kernels and its C++ extension ``hiera_kernels._C``.

Install with ``pip install --no-build-isolation -e .`` (the build needs the torch
that is already installed). Environment flags:

    HIERA_KERNELS_SKIP_CUDA=1   build only the C++ CPU kernels, even where nvcc exists
    HIERA_KERNELS_CUDA_ARCHS    CUDA architectures, default "8.0;9.0"
    MAX_JOBS                    parallel compile jobs (ninja)
    CUDA_HOME                   CUDA toolkit; found from the nvcc on PATH when unset
    DEBUG=1                     -O0 -g

The CUDA sources are built whenever torch has CUDA and nvcc is present, with or
without a GPU: a CPU-only machine can build and link them. csrc/cuda/*.cu hold the
kernels and their launchers (no torch headers, so nvcc compiles them quickly);
csrc/cuda/*.cpp hold the torch-facing entry points and their CUDA registrations,
compiled by the host compiler.

The C++ CPU kernels are compiled for baseline x86-64 plus, in one library, once per
instruction set they are tuned for (csrc/cpu/kernels_<name>.cpp: default, avx2,
avx512, avx512_bf16, each choosing its ISA with `#pragma GCC target`, so no -march flag is
passed); the library picks one at run time from the CPU's features and ATen's capability
(ATEN_CPU_CAPABILITY; HIERA_KERNELS_CPU_BUILD caps it), so a build made on one x86-64
machine runs on any other.
`python -m hiera_kernels info` says which one runs.
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def real_cuda_home():
    """The toolkit that ``nvcc`` really runs: the nvcc on PATH may be a wrapper script,
    so ask it (a ``--dryrun`` compile prints ``_HERE_=<toolkit>/bin``; ``--dryrun
    --version`` prints only the version) instead of trusting its path."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
    return os.path.dirname(match.group(1)) if match else os.path.dirname(os.path.dirname(nvcc))


def torch_cuda_include_dirs():
    """CUDA headers that ATen includes (cuBLAS, cuSPARSE, ...) ship in torch's own
    nvidia-* wheels rather than in the system toolkit: find them in the installed packages."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return dirs
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


cuda_home = real_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

debug = os.environ.get("DEBUG", "0") == "1"
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
use_cuda = (
    os.environ.get("HIERA_KERNELS_SKIP_CUDA", "0") != "1"
    and torch.version.cuda is not None
    and cuda_home is not None
    and bool(cuda_sources)
)

cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
# -fopenmp: without it at::parallel_for silently runs on one thread. No -march: the
# objects must run on any x86-64 CPU; csrc/cpu/kernels_<name>.cpp set their own ISA.
cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
cxx_flags += ["-fopenmp", "-DHIERA_KERNELS_WITH_CUDA=%d" % int(use_cuda)]
include_dirs = [os.path.join(ROOT, "csrc", "include")]

if use_cuda:
    archs = os.environ.get("HIERA_KERNELS_CUDA_ARCHS", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    extension = CUDAExtension(
        "hiera_kernels._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs + torch_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "hiera_kernels._C",
        cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    name="hiera_kernels",
    version="0.1.0",
    description="Fused kernels for the Hiera vision transformer, behind a drop-in model",
    packages=find_packages(include=["hiera_kernels", "hiera_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["hiera-kernels=hiera_kernels.__main__:main"]},
)
