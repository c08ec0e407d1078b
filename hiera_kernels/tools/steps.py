"""The step every bench row times (and peak_memory measures): one definition."""

import torch


def run_step(model, x: torch.Tensor, train: bool) -> None:
    """One bench step: a training forward and backward (loss = mean square of the
    logits), or an inference forward under ``torch.inference_mode``."""
    model.train(train)
    if train:
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
    else:
        with torch.inference_mode():
            model(x)
