"""The command-line tools behind ``python -m hiera_kernels``: bench, check, info, report."""

from __future__ import annotations

from typing import Optional

import torch


def no_gpu_refusal(command: str, device: str) -> Optional[str]:
    """What ``command --device cuda`` says where no GPU is (None elsewhere): the commands
    refuse at once, running nothing, rather than fail inside torch on the first tensor."""
    if torch.device(device).type != "cuda" or torch.cuda.is_available():
        return None
    return (f"{command} --device {device}: no CUDA device is available here (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}); nothing was run. "
            f"On this machine run `python -m hiera_kernels {command} --device cpu`.")
