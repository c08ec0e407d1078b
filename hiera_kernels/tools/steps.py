"""The step every bench row times (and peak_memory measures): one definition."""

import torch


def run_step(model, x: torch.Tensor, train: bool) -> None:
    """One bench step: a training forward and backward (loss = mean square of the
    logits; of every output for a model that returns a list, SAM 2's per-stage
    features), or an inference forward under ``torch.inference_mode``."""
    model.train(train)
    if train:
        model.zero_grad(set_to_none=True)
        out = model(x)
        sum(o.float().square().mean() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
    else:
        with torch.inference_mode():
            model(x)
