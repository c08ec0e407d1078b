"""Graph-safe MAE: the drop-in MAE and the patched official MAE run a masked forward and
loss (and its backward) under torch.compile(fullgraph=True), so with no graph break, no
host sync and no data-dependent shape, and equal the official model's loss."""

import copy
import warnings

import pytest
import torch

import hiera_kernels as hk

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import hiera as official

IMAGE = (2, 3, 128, 128)  # 32x32 tokens: 16 mask units, 6 kept at the default ratio 0.6
SMALL = dict(input_size=(128, 128), decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)


def models(kind):
    """(official MAE, the model under test) with the same random weights."""
    torch.manual_seed(0)
    theirs = official.mae_hiera_tiny_224(**SMALL)
    if kind == "dropin":
        ours = hk.mae_hiera_tiny_224(**SMALL)
        ours.load_state_dict(theirs.state_dict(), strict=True)
    else:
        ours = hk.patch(copy.deepcopy(theirs))
    return theirs, ours


def loss_and_grads(model, x, mask):
    model.zero_grad(set_to_none=True)
    loss, pred, label, _ = model(x, mask_ratio=0.6, mask=mask)
    loss.backward()
    return loss.detach(), pred.detach(), label, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["dropin", "patched-official"])
def test_compiled_masked_loss_fullgraph_equals_official(kind):
    theirs, ours = models(kind)
    x = torch.randn(IMAGE)
    mask = theirs.get_random_mask(x, 0.6)
    want = loss_and_grads(theirs, x, mask)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)  # any graph break raises
    got = loss_and_grads(compiled, x, mask)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)  # compiled normalisation fuses
    grads = {n.removeprefix("_orig_mod."): g for n, g in got[3].items()}
    assert grads.keys() == want[3].keys()
    torch.testing.assert_close(grads, want[3], rtol=1e-4, atol=1e-5)

    # The random-mask path compiles too: the mask is drawn inside, keeping int(16 * 0.4) units.
    loss, pred, label, drawn = compiled(x)
    assert drawn.sum(dim=1).tolist() == [6, 6] and pred.shape == label.shape == (2 * (1024 - 6 * 64) // 16, 3 * 16 * 16)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", ["dropin", "patched-official"])
def test_eager_mask_of_another_ratio_still_matches_official(kind):
    """Eager mode reads a given mask's count, as the official model does."""
    theirs, ours = models(kind)
    x = torch.randn(IMAGE)
    mask = theirs.get_random_mask(x, 0.25)  # 12 of 16 units kept, mask_ratio left at 0.6
    with torch.no_grad():
        want, got = theirs(x, mask=mask), ours(x, mask=mask)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
