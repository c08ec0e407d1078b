"""hiera_kernels: fused kernels for the Hiera vision transformer, behind a drop-in model.

Layers, one module or folder each:

* :mod:`hiera_kernels.reference` - the ``"torch"`` backend, plain PyTorch, the oracle;
* :mod:`hiera_kernels.library`   - the kernel ops' schemas, fake and autograd (torch.library);
* :mod:`hiera_kernels.backends`  - what each backend supports and which one runs;
* :mod:`hiera_kernels.ops`       - the public functional API;
* ``csrc/cpu``, ``csrc/cuda``       - the C++ kernels (``hiera_kernels._C``);
* :mod:`hiera_kernels.triton`    - the Triton kernels;
* :mod:`hiera_kernels.epilogues` - CPU inference: bias, GELU and skip adds inside oneDNN's GEMMs;
* :mod:`hiera_kernels.recompute` - training: LayerNorm and GELU outputs recomputed in the backward;
* :mod:`hiera_kernels.models`    - drop-in ``Hiera`` and ``MaskedAutoencoderHiera``;
* :mod:`hiera_kernels.adapters`  - ``patch``/``unpatch``: existing official, timm and transformers models on the ops.
"""

from . import ops
from .adapters import patch, unpatch
from .backends import BackendError, available_backends, backend_reasons, get_backend, set_backend, use_backend
from .models import *  # noqa: F401,F403  (the official factory names)
from .models import __all__ as _model_names

__version__ = "0.1.0"

__all__ = [
    "ops",
    "patch",
    "unpatch",
    "BackendError",
    "available_backends",
    "backend_reasons",
    "get_backend",
    "set_backend",
    "use_backend",
] + list(_model_names)
