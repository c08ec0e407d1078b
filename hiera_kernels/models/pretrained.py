"""Checkpoint loading the way the official ``pretrained_model`` decorator does it."""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn


def load_checkpoint(checkpoints: Optional[Dict[str, str]], checkpoint: Optional[str]) -> dict:
    """The checkpoint dict (``{"model_state": state_dict}``) for a named official
    checkpoint, a local file or a URL."""
    if checkpoint is None:
        raise RuntimeError("No checkpoint specified.")
    if checkpoints is not None and checkpoint in checkpoints:
        return torch.hub.load_state_dict_from_url(checkpoints[checkpoint], map_location="cpu", weights_only=True)
    if os.path.isfile(checkpoint):
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    if checkpoint.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(checkpoint, map_location="cpu", weights_only=True)
    names = list(checkpoints.keys()) if checkpoints else []
    raise RuntimeError(
        f"Invalid checkpoint specified ({checkpoint}): not a checkpoint name of this model {names}, "
        "an existing file, or an http(s) URL of a checkpoint in the official format."
    )


def pretrained_model(checkpoints: Optional[Dict[str, str]], default: Optional[str] = None) -> Callable:
    """Make ``model_func(**kw)`` accept ``pretrained=False, checkpoint=default, strict=True``.

    As in the official package: ``num_classes`` follows the checkpoint's head unless
    the caller sets it, and an encoder-decoder (MAE) checkpoint loads into an
    encoder-only model with ``strict=False``. Unlike it, a head of another size is
    dropped and left at its initialisation (the official loader then fails on the
    missing head keys).
    """

    def inner(model_func: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def model_def(pretrained: bool = False, checkpoint: Optional[str] = default, strict: bool = True, **kwdargs):
            state, dropped_head = None, False
            if pretrained:
                state = load_checkpoint(checkpoints, checkpoint)["model_state"]
                if "head.projection.weight" in state:
                    classes = state["head.projection.weight"].shape[0]
                    if "num_classes" not in kwdargs:
                        kwdargs["num_classes"] = classes
                    elif kwdargs["num_classes"] != classes:
                        state = {k: v for k, v in state.items() if not k.startswith("head.projection.")}
                        dropped_head = True
            model = model_func(**kwdargs)
            if state is not None:
                if "decoder_pos_embed" in state and not hasattr(model, "decoder_pos_embed"):
                    strict = False
                result = model.load_state_dict(state, strict=strict and not dropped_head)
                if strict and dropped_head:
                    wrong = [k for k in result.missing_keys if not k.startswith("head.projection.")]
                    if wrong or result.unexpected_keys:
                        raise RuntimeError(f"checkpoint does not fit the model: missing {wrong}, unexpected {result.unexpected_keys}")
            return model

        model_def.__name__ = model_func.__name__
        model_def.__qualname__ = model_func.__qualname__
        model_def.__doc__ = model_func.__doc__
        model_def.checkpoints = checkpoints
        model_def.default = default
        return model_def

    return inner
