"""The drop-in models against the real official package (hiera-transformer 0.1.4):
same weights in, same outputs, intermediates and MAE loss out (within ATOL), gradients by
the shared rule against the float64 official."""

import copy

import pytest
import torch

import hiera_kernels as hk
from hiera_kernels import error_rule
from hiera_kernels.models import AUTOENCODERS, CLASSIFIERS, FACTORIES

from helpers import official

ATOL = 1e-5  # float32 parity target
VIDEO_SMALL = dict(
    input_size=(8, 64, 64), q_stride=(1, 2, 2), mask_unit_size=(1, 8, 8), patch_kernel=(3, 7, 7),
    patch_stride=(2, 4, 4), patch_padding=(1, 3, 3), sep_pos_embed=True, num_classes=400,
)


def official_factory(name):
    return getattr(official, name)


def pair(name, **kwargs):
    """(official, ours) with identical random weights, loaded strictly."""
    if name == "video_small":
        theirs, ours = official.Hiera(**VIDEO_SMALL, **kwargs), hk.Hiera(**VIDEO_SMALL)
    elif name == "mae_video_small":
        theirs = official.MaskedAutoencoderHiera(q_pool=2, **VIDEO_SMALL, **kwargs)
        ours = hk.MaskedAutoencoderHiera(q_pool=2, **VIDEO_SMALL)
    else:
        theirs, ours = official_factory(name)(**kwargs), getattr(hk, name)()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def image_for(model, batch=2):
    size = [s * p for s, p in zip(model.tokens_spatial_shape, model.patch_stride)]
    return torch.randn(batch, 3, *size)


def logits(model, x, **kwargs):
    """Pre-softmax outputs: the official eval head returns softmax probabilities, which
    for a randomly initialised head are nearly uniform and would hide differences."""
    with torch.no_grad():
        return model.train()(x, **kwargs)


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def grads(model, loss):
    params = [p for p in model.parameters()]
    return torch.autograd.grad(loss, params, allow_unused=True)


def classifier_parity(theirs, ours, x):
    """Eval probabilities, every intermediate, and train-mode gradients w.r.t. input and params."""
    theirs.eval(), ours.eval()
    with torch.no_grad():
        out_t, inter_t = theirs(x, return_intermediates=True)
        out_o, inter_o = ours(x, return_intermediates=True)
    diffs = {"probs": max_diff(out_o, out_t), "logits": max_diff(logits(ours, x), logits(theirs, x))}
    assert len(inter_t) == len(inter_o)
    for i, (a, b) in enumerate(zip(inter_o, inter_t)):
        assert a.shape == b.shape
        diffs[f"intermediate{i}"] = max_diff(a, b)
    theirs.train(), ours.train()
    weights = torch.randn(x.shape[0], theirs.head.projection.out_features)
    results = []
    for model in (ours, theirs, copy.deepcopy(theirs).double()):  # the float64 official: the reference
        dtype = next(model.parameters()).dtype
        xi = x.detach().to(dtype, copy=True).requires_grad_()
        loss = (model(xi) * weights.to(dtype)).sum()
        results.append(torch.autograd.grad(loss, [xi] + list(model.parameters())))
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    return diffs, gradient_failures(names, *results)


def gradient_failures(names, ours, theirs, reference):
    """Gradients by the shared rule: ours against the float64 official, within twice the
    float32 official's own error plus the allowance (GEMM libraries may sum in any order:
    oneDNN's in our training epilogues, MKL's in the official addmm)."""
    failures = []
    for name, o, t, r in zip(names, ours, theirs, reference):
        assert (o is None) == (t is None), name
        if o is not None:
            verdict = error_rule.judge(o, t, r)
            if not verdict.passed:
                failures.append(f"grad {name}: {verdict.describe()}")
    return failures


@pytest.mark.parametrize("name", ["hiera_tiny_224", "hiera_base_plus_224", "video_small"])
def test_classifier_matches_official(name):
    theirs, ours = pair(name)
    diffs, failures = classifier_parity(theirs, ours, image_for(theirs))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= ATOL, f"{name}: {worst} differs by {diffs[worst]:.3g}"
    assert not failures, f"{name}: " + "; ".join(failures)


def mae_parity(theirs, ours, x, mask):
    out_t = theirs(x, mask=mask)
    out_o = ours(x, mask=mask)
    diffs = {}
    for label, a, b in zip(["loss", "pred", "label"], out_o[:3], out_t[:3]):
        assert a.shape == b.shape
        diffs[label] = max_diff(a, b)
    assert torch.equal(out_o[3], out_t[3])
    reference = copy.deepcopy(theirs).double()
    out_r = reference(x.double(), mask=mask)
    names = [n for n, _ in ours.named_parameters()]
    return diffs, gradient_failures(names, grads(ours, out_o[0]), grads(theirs, out_t[0]), grads(reference, out_r[0]))


@pytest.mark.parametrize("name", ["mae_hiera_tiny_224", "mae_video_small"])
def test_mae_matches_official_with_a_fixed_mask(name):
    theirs, ours = pair(name)
    x = image_for(theirs)
    mask = theirs.get_random_mask(x, 0.6)
    diffs, failures = mae_parity(theirs, ours, x, mask)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= ATOL, f"{name}: {worst} differs by {diffs[worst]:.3g}"
    assert not failures, f"{name}: " + "; ".join(failures)
    # The random mask comes from the same RNG draws as the official one.
    torch.manual_seed(7)
    _, _, _, mask_t = theirs(x)
    torch.manual_seed(7)
    _, _, _, mask_o = ours(x)
    assert torch.equal(mask_t, mask_o)


def test_stochastic_depth_matches_official_in_training():
    """Same seed, same Bernoulli draws: DropPath follows timm's exactly."""
    theirs = official.hiera_tiny_224(drop_path_rate=0.5, num_classes=10)
    ours = hk.hiera_tiny_224(drop_path_rate=0.5, num_classes=10)
    ours.load_state_dict(theirs.state_dict())
    x = image_for(theirs)
    torch.manual_seed(3)
    want = logits(theirs, x)
    torch.manual_seed(3)
    got = logits(ours, x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert hk.models.hiera.DropPath(1.0).train()(torch.ones(2, 3)).eq(0).all()  # no 0/0


def test_bad_masks_get_a_clear_error():
    model = hk.hiera_tiny_224()
    x = image_for(model)
    uneven = torch.zeros(2, 49, dtype=torch.bool)
    uneven[0, :10], uneven[1, :12] = True, True
    with pytest.raises(ValueError, match=r"every sample must keep the same number of mask units, got \[10, 12\]"):
        model(x, mask=uneven)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(B, num_mask_units\)=\(2, 49\), got torch.float32"):
        model(x, mask=uneven.float())


def test_masked_encoder_tokens_match_official():
    theirs, ours = pair("hiera_tiny_224")
    x = image_for(theirs)
    mask = theirs.get_random_mask(x, 0.6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask=mask), theirs(x, mask=mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backend_training_step_within_the_error_rule(dtype):
    """A training step on the C++ kernels: outputs, every intermediate and every
    parameter gradient pass the shared error rule against the float64 "torch" path."""
    _, model = pair("hiera_tiny_224")
    x = image_for(model)
    weights = torch.randn(x.shape[0], 1000)

    def step(m, backend, dt):
        m = m.to(dt).set_backend(backend).train()
        xi = x.to(dt).requires_grad_()
        out, inter = m(xi, return_intermediates=True)
        loss = (out * weights.to(dt)).sum() + sum(i.float().square().mean() for i in inter)
        return [out, *inter, *torch.autograd.grad(loss, [xi] + list(m.parameters()))]

    import copy
    reference = step(copy.deepcopy(model), "torch", torch.float64)
    torch_path = step(copy.deepcopy(model), "torch", dtype)
    cpu = step(copy.deepcopy(model), "cpu", dtype)
    names = ["logits"] + [f"stage {i}" for i in range(4)] + ["input"] + [n for n, _ in model.named_parameters()]
    for name, r, t, c in zip(names, reference, torch_path, cpu):
        verdict = error_rule.judge(c, t, r)
        assert verdict.passed, f"{name}: cpu {verdict.describe()}"


def test_patch_conv_runs_channels_last_on_the_kernel_backends():
    """On CPU the kernel backends feed the patch conv a channels-last image, so its
    tokens come out contiguous for the pos-embed add and unroll; "torch" keeps official's
    NCHW conv (transposed tokens). The values are checked by the error rule above and,
    against official, in test_classifier_matches_official."""
    model = hk.hiera_tiny_224()
    x = image_for(model, 2)
    model.set_backend("torch")
    assert not model.patch_embed(x).is_contiguous()
    for backend in ["cpu", "auto"]:
        model.set_backend(backend)
        assert model.patch_embed(x).is_contiguous(), backend
    assert model.patch_embed.backend == "auto"  # set_backend reaches it like every token op


def test_backend_argument_and_set_backend():
    model = hk.hiera_tiny_224(backend="torch")
    assert {m.backend for m in model.modules() if isinstance(m, hk.models.hiera.UsesBackend)} == {"torch"}
    model.set_backend("cuda")
    assert model.blocks[3].attn.backend == "cuda"
    x = image_for(model, 1)
    with pytest.raises(hk.BackendError, match="backend 'cuda' cannot run .*runs on cuda tensors, not cpu"):
        model(x)
    mae = hk.mae_hiera_tiny_224(backend="torch")
    assert mae.decoder_blocks[0].attn.backend == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        hk.hiera_tiny_224(backend="fast")


def test_pretrained_loads_an_official_checkpoint_file(tmp_path):
    theirs = official.hiera_tiny_224(num_classes=10).eval()
    path = tmp_path / "hiera_tiny_224.pth"
    torch.save({"model_state": theirs.state_dict()}, path)
    ours = hk.hiera_tiny_224(pretrained=True, checkpoint=str(path))
    assert ours.head.projection.out_features == 10  # num_classes follows the checkpoint
    x = image_for(ours, 1)
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=ATOL, rtol=0)
    # Asking for another head size keeps the trunk and drops the head.
    other = hk.hiera_tiny_224(pretrained=True, checkpoint=str(path), num_classes=3)
    assert other.head.projection.out_features == 3
    torch.testing.assert_close(other.blocks[5].attn.qkv.weight, theirs.blocks[5].attn.qkv.weight, atol=0, rtol=0)
    # An MAE checkpoint loads into the classifier non-strictly, as officially.
    mae_path = tmp_path / "mae_hiera_tiny_224.pth"
    torch.save({"model_state": official.mae_hiera_tiny_224().state_dict()}, mae_path)
    hk.hiera_tiny_224(pretrained=True, checkpoint=str(mae_path))
    with pytest.raises(RuntimeError, match=r"Invalid checkpoint specified \(nope\)"):
        hk.hiera_tiny_224(pretrained=True, checkpoint="nope")
    assert hk.hiera_tiny_224.default == "mae_in1k_ft_in1k"
    assert hk.hiera_tiny_224.checkpoints == official.hiera_tiny_224.checkpoints


def test_compiled_model_fullgraph():
    model = hk.hiera_tiny_224(num_classes=10).train()
    x = image_for(model, 1)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.extended
@pytest.mark.parametrize("name", FACTORIES)
def test_every_factory_has_official_keys_and_outputs(name):
    theirs, ours = official_factory(name)(), getattr(hk, name)()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = image_for(theirs, 1)
    with torch.no_grad():
        if name in CLASSIFIERS:
            torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=ATOL, rtol=0)
        else:
            assert name in AUTOENCODERS
            mask = theirs.get_random_mask(x, 0.9 if "16x" in name else 0.6)
            for a, b in zip(ours(x, mask=mask), theirs(x, mask=mask)):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
