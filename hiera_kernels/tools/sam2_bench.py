"""``python -m hiera_kernels bench --model sam2_hiera_tiny`` (``_small``, ``_base_plus``,
``_large``): SAM 2's image-encoder trunk (``sam2.modeling.backbones.hieradet.Hiera``, built
with the arguments of sam2's own ``configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml``) at SAM 2's
1024 x 1024, unpatched vs ``hiera_kernels.patch`` on ``"auto"``, each eager and under
``torch.compile``. One set of random weights, one batch; rows timed round-robin (medians).
Columns as ``bench``'s: "vs official" is against the unpatched eager row; the error is
every stage's features (concatenated) by the shared error rule against the unpatched
trunk in float64; bytes moved outside GEMM/conv (one forward, eager rows) and, with
``memory``, each eager row's peak memory over one step in a fresh process.
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from .peak_memory import peak_mb
from .traffic import bytes_moved

# bench's model name (timm's names for the same trunks) -> sam2's config file.
SAM2_MODELS = {
    "sam2_hiera_tiny": "sam2.1_hiera_t.yaml",
    "sam2_hiera_small": "sam2.1_hiera_s.yaml",
    "sam2_hiera_base_plus": "sam2.1_hiera_b+.yaml",
    "sam2_hiera_large": "sam2.1_hiera_l.yaml",
}
INPUT_SIZE = 1024  # SAM 2's image size (SAM2Base.image_size)


def trunk_kwargs(model_name: str) -> dict:
    """The trunk's arguments in sam2's own config for ``model_name`` (without ``_target_``)."""
    if model_name not in SAM2_MODELS:
        raise ValueError(f"bench: a SAM 2 model is one of {', '.join(SAM2_MODELS)}, got {model_name!r}")
    import sam2
    from omegaconf import OmegaConf  # sam2's own config library (hydra's)

    config = OmegaConf.load(os.path.join(os.path.dirname(sam2.__file__), "configs", "sam2.1", SAM2_MODELS[model_name]))
    kwargs = OmegaConf.to_container(config.model.image_encoder.trunk)
    kwargs.pop("_target_")
    return kwargs


def build_trunk(model_name: str, backend: Optional[str] = None) -> nn.Module:
    """SAM 2's trunk for ``model_name`` with seed-0 random weights; patched on ``backend`` if given."""
    from sam2.modeling.backbones.hieradet import Hiera

    from ..adapters import patch

    torch.manual_seed(0)
    model = Hiera(**trunk_kwargs(model_name))
    return patch(model, backend=backend) if backend else model


def features(out) -> torch.Tensor:
    """Every stage's features (the trunk's list of NCHW maps), flattened into one tensor."""
    return torch.cat([f.flatten() for f in out])


def bench_sam2(
    model_name: str,
    batch: int = 1,
    dtype: Optional[torch.dtype] = None,
    device: str = "cpu",
    mode: str = "infer",
    quick: bool = False,
    input_size: Optional[int] = None,
    memory: bool = True,
    print_fn: Callable[[str], None] = print,
):
    from .bench import default_dtype, failure_note, format_table, header, variant_rows

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    side = input_size or INPUT_SIZE
    base = build_trunk(model_name).to(device=device, dtype=dtype)
    x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
    print_fn(header(f"sam2 {model_name} trunk, patched vs unpatched", batch, dtype, device, mode) + f" input={side}x{side}")
    from ..adapters import patch

    unpatched, patched = "sam2 (eager)", "sam2 patched [auto] (eager)"
    models: Dict[str, nn.Module] = {
        unpatched: base,
        patched: patch(copy.deepcopy(base), backend="auto"),
        "sam2 + torch.compile": torch.compile(copy.deepcopy(base)),
        "sam2 patched [auto] + torch.compile": torch.compile(patch(copy.deepcopy(base), backend="auto")),
    }
    memory_backends = {unpatched: None, patched: "auto"}  # the eager rows, as tools/peak_memory rebuilds them

    def eager_figures(label: str, model: nn.Module, m: str) -> dict:
        """Bytes moved and peak memory, for the eager rows only: compiled code bypasses the
        dispatcher that counts the bytes, and peak_memory rebuilds eager models only."""
        if label not in memory_backends:
            return {}
        moved = bytes_moved(lambda: model.eval()(x)).total / 1e6
        peak, note = None, ""
        if memory:
            spec = dict(kind="sam2", backend=memory_backends[label], model=model_name, batch=batch,
                        image_shape=list(x.shape[1:]), dtype=str(dtype).replace("torch.", ""), device=str(device), mode=m)
            try:
                peak = peak_mb(spec)
            except Exception as exc:  # the timing stands; the note says why there is no peak
                note = failure_note(exc)
        return dict(moved_mb=moved, note=note, peak_mb=peak)

    rows = variant_rows(models, unpatched, x, lambda model, x: features(model.eval()(x)), mode, quick, eager_figures)
    print_fn(format_table(rows))
    for m in dict.fromkeys(r.mode for r in rows):
        by_name = {r.name: r for r in rows if r.mode == m}
        a, b = by_name[patched], by_name[unpatched]
        print_fn(f"{m}: patched vs unpatched (eager): {b.ms / a.ms:.2f}x the speed, "
                 f"{100 * a.moved_mb / b.moved_mb:.0f}% of the bytes moved outside GEMM/conv")
    return rows
