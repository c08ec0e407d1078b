"""The training stack on the drop-in model and on patched models: autocast (CPU bf16),
activation checkpointing per block, DistributedDataParallel over 2 processes, and
torch.compile of a whole training step."""

import functools
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import hiera_kernels as hk
from hiera_kernels.error_rule import judge

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import hiera as official
    import timm

IMAGE = (4, 3, 64, 64)
LABELS = torch.tensor([1, 3, 0, 7])


def build(kind):
    """A small Hiera-T (64x64 input, 10 classes) of the given kind; the same weights for a
    given seed: the drop-in gets the official model's state_dict."""
    torch.manual_seed(0)
    if kind == "timm":
        return timm.create_model("hiera_tiny_224", img_size=64, num_classes=10)
    theirs = official.hiera_tiny_224(input_size=(64, 64), num_classes=10)
    if kind == "official":
        return theirs
    ours = hk.hiera_tiny_224(input_size=(64, 64), num_classes=10)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours


def prepared(kind):
    """``kind`` is "dropin", or "patched-<official|timm>" (patched), or an unpatched family."""
    if kind.startswith("patched-"):
        return hk.patch(build(kind[len("patched-"):]))
    return build(kind)


def step(model, x, labels=LABELS):
    """Loss (mean over the batch), logits and every gradient of one training step."""
    model.train().zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def judge_all(result, torch_result, reference, dtype=None):
    """Every output and gradient by the rule; ``dtype``: the compute dtype (autocast's)."""
    (loss, logits, grads), (t_loss, t_logits, t_grads), (r_loss, r_logits, r_grads) = result, torch_result, reference
    assert grads.keys() == r_grads.keys()
    verdicts = [("loss", judge(loss, t_loss, r_loss, dtype)), ("logits", judge(logits, t_logits, r_logits, dtype))]
    verdicts += [(n, judge(grads[n], t_grads[n], r_grads[n], dtype)) for n in r_grads]
    for what, v in verdicts:
        assert v.passed, f"{what}: {v.describe()}"
    return max(v.error for what, v in verdicts if what not in ("loss", "logits"))


@pytest.mark.parametrize("kind", ["dropin", "patched-official", "patched-timm"])
def test_autocast_bf16(kind):
    """Under CPU bf16 autocast, against the unpatched model under the same autocast (the
    torch result) and the unpatched model in float64."""
    family = "timm" if kind.endswith("timm") else "official"
    x = torch.randn(IMAGE)
    reference = step(build(family).double(), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_result = step(build(family), x)
        result = step(prepared(kind), x)
    assert result[1].dtype == torch.bfloat16  # autocast reached the head
    worst = judge_all(result, torch_result, reference, torch.bfloat16)
    print(f"\nautocast bf16 {kind}: max grad error {worst:.3g}")


def checkpoint_every_block(model):
    """Per-block activation checkpointing: timm's own switch, or each block's call wrapped
    in torch.utils.checkpoint on the instance (keys and parameters unchanged)."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return model
    for blk in model.blocks:
        blk.forward = functools.partial(checkpoint, blk.forward, use_reentrant=False)
    return model


@pytest.mark.parametrize("kind", ["dropin", "patched-official", "patched-timm"])
def test_activation_checkpointing(kind):
    x = torch.randn(IMAGE)
    plain = step(prepared(kind), x)
    model = checkpoint_every_block(prepared(kind))
    recomputed = []
    model.blocks[1].attn.register_forward_hook(lambda *_: recomputed.append(1))
    ckpt = step(model, x)
    assert len(recomputed) == 2  # forward, then again in backward: the block was recomputed
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(ckpt[2], plain[2], rtol=0, atol=0)


def _ddp_worker(rank, kind, x, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(prepared(kind))
        half = x.shape[0] // 2
        _, _, grads = step(model, x[rank * half:(rank + 1) * half], LABELS[rank * half:(rank + 1) * half])
        if rank == 0:
            torch.save({n.removeprefix("module."): g for n, g in grads.items()}, os.path.join(out_dir, "grads.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["dropin", "patched-timm"])
def test_ddp_two_processes_equal_one_process(kind, tmp_path):
    """DDP over 2 gloo processes, each on half the batch: its averaged gradients equal
    one process's on the whole batch (the loss is a batch mean)."""
    x = torch.randn(IMAGE)
    mp.spawn(_ddp_worker, args=(kind, x, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "grads.pt")
    _, _, single = step(prepared(kind), x)
    assert ddp.keys() == single.keys()
    torch.testing.assert_close(ddp, single, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["dropin", "patched-official"])
def test_compiled_training_step(kind):
    """A whole training step under torch.compile(fullgraph=True) equals eager."""
    x = torch.randn(IMAGE)
    eager = step(prepared(kind), x)
    model = prepared(kind)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    result = step(compiled, x)
    grads = {n.removeprefix("_orig_mod."): g for n, g in result[2].items()}
    torch.testing.assert_close(result[1], eager[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, eager[2], rtol=1e-4, atol=1e-5)
