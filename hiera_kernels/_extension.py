"""Loads the C++ extension ``hiera_kernels._C``, warning once (with the fix) when it can't."""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Optional

from . import library  # noqa: F401  (schemas must exist before the kernels register)

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root"


@dataclass(frozen=True)
class Extension:
    loaded: bool
    with_cuda: bool
    error: Optional[str]


def _load() -> Extension:
    try:
        module = importlib.import_module("hiera_kernels._C")
    except ImportError as exc:
        warnings.warn(
            f"hiera_kernels: the C++ extension hiera_kernels._C is not available ({exc}); "
            f"the 'cpu' and 'cuda' backends are off and 'auto' uses the others. To fix, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return Extension(False, False, str(exc))
    return Extension(True, bool(getattr(module, "WITH_CUDA", 0)), None)


EXTENSION = _load()
