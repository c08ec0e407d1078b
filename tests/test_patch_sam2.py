"""hiera_kernels.patch on SAM 2's Hiera: the real sam2 package (``hieradet.Hiera``, alone and
as ``image_encoder.trunk`` of a SAM 2 model built from its own config) and timm's copy
(``sam2_hiera_*``, ``hieradet_small``).

Every stage's features (and timm's logits), the input's and every parameter's gradient,
patched vs unpatched: float32 features within 1e-5 of each tensor's scale (max |unpatched|;
gradients not: see compare), and everything in float32 and bfloat16 by the shared error rule (the unpatched model in float64 the
reference, in the same dtype the yardstick). Sizes: windows that tile the token grid
(224 for T/S/B+: 56, 28, 14, 7 tokens a side against windows 8, 4, 14, 7; 256 for L:
64, 32, 16, 8 against 8, 4, 16, 8) and windows that need padding (160: stages 3 and 4
padded, including the q-pool block that opens stage 4; 480; 1024, SAM 2's own size, in
the extended run). B+ and L run at their widths, heads (head dims 56 and 72) and window
specs with fewer blocks per stage (one global block kept); their full depths run at 1024
in the extended run.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import hiera_kernels as hk
from hiera_kernels import epilogues
from hiera_kernels.adapters import sam2_hieradet as sam2_adapter
from hiera_kernels.error_rule import judge

from helpers import check_patch_conv_runs_channels_last, run, tensors

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import timm
    from sam2.modeling.backbones.hieradet import Hiera

# sam2's trunk arguments, as in its configs (sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml).
CONFIGS = {
    "T": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9), window_pos_embed_bkg_spatial_size=(7, 7)),
    "S": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13), window_pos_embed_bkg_spatial_size=(7, 7)),
    "B+": dict(embed_dim=112, num_heads=2),  # the defaults: stages (2, 3, 16, 3), global (12, 16, 20), windows (8, 4, 14, 7)
    "L": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
              window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)),
}
# B+ and L at their widths, heads and windows, with one block per stage but stage 3's
# three: the q-pool blocks 1, 2 and 5 (each with the previous stage's window), block 3
# windowed with stage 3's window, block 4 global.
SHORT = dict(stages=(1, 1, 3, 1), global_att_blocks=(4,))


def trunk(config, drop_path_rate=0.0, short=False):
    torch.manual_seed(0)
    return Hiera(**{**CONFIGS[config], **(SHORT if short else {}), "drop_path_rate": drop_path_rate})


def stages(model, x):
    return model(x)  # sam2's Hiera returns every stage's features, NCHW


def assert_rule(what, result, torch_result, reference, dtype=None):
    """The shared error rule (hiera_kernels/error_rule.py); ``dtype``: the compute dtype (autocast's)."""
    v = judge(result, torch_result, reference, dtype)
    assert v.passed, f"{what}: {v.describe()}"


def assert_within_scale(got, want, what, rel=1e-5):
    """float32: |patched - unpatched| <= rel * max|unpatched|."""
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel:g} x scale {scale:.3g}"


def compare(base, shape, fn, dtype, backward=True, backend=None):
    """Patched vs unpatched ``base`` in ``dtype``: outputs and (with ``backward``) every
    gradient, under grad in train mode (the path training takes), then the outputs of an
    inference forward (no grad, eval: the Linears' epilogues on "auto"/"cpu").
    Returns the largest error relative to the output's scale."""
    torch.manual_seed(1)
    x = torch.randn(shape)
    base = base.train()
    ref = run(copy.deepcopy(base).double(), x.double(), fn, backward)
    unpatched = copy.deepcopy(base).to(dtype)
    patched = hk.patch(copy.deepcopy(base).to(dtype), backend=backend)
    results = {"train": (run(patched, x.to(dtype), fn, backward), run(unpatched, x.to(dtype), fn, backward), ref)}
    with torch.no_grad():
        infer = [tensors(fn(m.eval(), x.to(d))) for m, d in ((patched, dtype), (unpatched, dtype),
                                                               (copy.deepcopy(base).double(), torch.float64))]
    results["infer"] = ((infer[0], {}), (infer[1], {}), (infer[2], {}))
    worst = 0.0
    for mode, ((out, grad), (t_out, t_grad), (r_out, r_grad)) in results.items():
        assert len(out) == len(r_out) > 0 and grad.keys() == r_grad.keys()
        pairs = [(f"{mode} output {i}", o, t, r) for i, (o, t, r) in enumerate(zip(out, t_out, r_out))]
        pairs += [(f"{mode} grad {k}", grad[k], t_grad[k], r_grad[k]) for k in r_grad]
        for what, o, t, r in pairs:
            assert_rule(f"{dtype} {what}", o, t, r)
            if dtype == torch.float32 and "grad" not in what:
                # Gradients: the error rule only. A max pool routes its gradient to one input
                # of each window, and where two are within float32 rounding float32 and
                # float64 SAM 2 pick different ones (T at 160: float32 SAM 2's input gradient
                # 2.8% of scale off float64's); sums downstream (pos_embed) mix both routings.
                assert_within_scale(o, t, what)
            if what.startswith(f"{mode} output"):
                worst = max(worst, (o.double() - t.double()).abs().max().item() / t.abs().max().item())
    return worst, patched


CASES = [  # (config, short, input side)
    ("T", False, 224),   # windows tile every stage
    ("T", False, 160),   # stages 3 and 4 padded (10 -> 14, 5 -> 7), the stage-4 q-pool block in padded windows
    ("S", False, 160),
    ("B+", True, 224),   # head dim 56
    ("B+", True, 160),
    ("L", True, 256),    # head dim 72, windows 8, 4, 16, 8 tile 64, 32, 16, 8
    ("L", True, 160),    # 40, 20, 10, 5 tokens: stages 3 and 4 padded
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config,short,side", CASES, ids=[f"{c}{'-short' if s else ''}-{n}" for c, s, n in CASES])
def test_sam2_trunk_patched_equals_unpatched(config, short, side, dtype):
    worst, patched = compare(trunk(config, short=short), (1, 3, side, side), stages, dtype)
    linears = [m for m in patched.modules() if isinstance(m, nn.Linear)]
    assert all(epilogues.is_packed(m) for m in linears)  # the inference forward ran every Linear in oneDNN's epilogues
    print(f"\nsam2 {config}{' (short)' if short else ''} {side}x{side} {dtype}: max feature error {worst:.3g} of scale")


def test_sam2_trunk_480_forward():
    """480x480 (120, 60, 30, 15 tokens: stages 3 and 4 padded to 42 and 21), inference only."""
    worst, _ = compare(trunk("T"), (1, 3, 480, 480), stages, torch.float32, backward=False)
    print(f"\nsam2 T 480x480 float32: max feature error {worst:.3g} of scale")


@pytest.mark.extended
@pytest.mark.parametrize("config", list(CONFIGS))
def test_sam2_trunk_1024_full_configs(config):
    """SAM 2's own input size, full depth, float32 and bfloat16, forward; T also backward."""
    for dtype in (torch.float32, torch.bfloat16):
        worst, _ = compare(trunk(config), (1, 3, 1024, 1024), stages, dtype, backward=config == "T")
        print(f"\nsam2 {config} 1024x1024 {dtype}: max feature error {worst:.3g} of scale")


def test_sam2_torch_backend_by_name():
    compare(trunk("T"), (1, 3, 160, 160), stages, torch.float32, backend="torch")


def test_whole_sam2_model_image_encoder():
    """A SAM 2 model built from sam2's own config: patch finds image_encoder.trunk."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", mode="eval")
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = model.image_encoder(x)
        hk.patch(model)
        out = model.image_encoder(x)
    assert hk.adapters.RECORD in vars(model.image_encoder.trunk.blocks[0])
    patched_types = {type(m).__name__ for m in model.modules() if hk.adapters.RECORD in vars(m)}
    assert patched_types == {"MultiScaleBlock", "MultiScaleAttention", "PatchEmbed", "Hiera"}
    assert hk.adapters.RECORD in vars(model.image_encoder.trunk.patch_embed)  # the trunk's: SAM 2's only one
    for key in ("vision_features", "backbone_fpn"):
        for o, r in zip(tensors(out[key]), tensors(ref[key])):
            assert_within_scale(o, r, key)


# timm's copy: name -> (build, input shape, run). timm zero-initialises the head: the logits
# of a fresh head would be all zero, so the head is re-drawn (see bench_patched).
def timm_model(name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


TIMM_CASES = {
    "sam2_hiera_tiny-intermediates-224": (lambda: timm_model("sam2_hiera_tiny", num_classes=10), (1, 3, 224, 224),
                                          lambda m, x: m.forward_intermediates(x)),
    "sam2_hiera_tiny-logits-160": (lambda: timm_model("sam2_hiera_tiny", num_classes=10), (1, 3, 160, 160), lambda m, x: m(x)),
    # LayerScale (init_values), windows 8, 4, 16, 8; padded at 160
    "hieradet_small-short-160": (lambda: timm_model("hieradet_small", num_classes=10, stages=(1, 1, 3, 1), global_att_blocks=(4,)),
                                 (1, 3, 160, 160), lambda m, x: (m(x), m.forward_intermediates(x, coarse=False, output_fmt="NHWC"))),
    "sam2_hiera_base_plus-features_only-160": (
        lambda: timm_model("sam2_hiera_base_plus", features_only=True, stages=(1, 1, 3, 1), global_att_blocks=(4,)),
        (1, 3, 160, 160), lambda m, x: m(x)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_hieradet_patched_equals_unpatched(name, dtype):
    build, shape, fn = TIMM_CASES[name]
    worst, _ = compare(build(), shape, fn, dtype)
    print(f"\ntimm {name} {dtype}: max output error {worst:.3g} of scale")


def test_drop_path_training_matches_unpatched():
    """Stochastic depth in training: the same draws in the same order as the block's own code
    (in float64: what is checked is the drop pattern, not float32 max-pool near-ties)."""
    base = trunk("T", drop_path_rate=0.3, short=False).train().double()
    x = torch.randn(1, 3, 160, 160, dtype=torch.float64)
    torch.manual_seed(5)
    ref, ref_grad = run(copy.deepcopy(base), x, stages)
    patched = hk.patch(copy.deepcopy(base))
    torch.manual_seed(5)
    out, grad = run(patched, x, stages)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_within_scale(o, r, f"output {i}")
    for k in ref_grad:
        assert_within_scale(grad[k], ref_grad[k], f"grad {k}")


@pytest.mark.parametrize("family", ["sam2", "timm"])
def test_training_adds_the_mlp_skip_connection_in_fc2(family, monkeypatch):
    """In training on "cpu" a patched block whose MLP nothing wraps (its drop path Identity;
    no LayerScale) runs it as layer_norm_mlp with the skip connection in fc2's epilogue;
    under stochastic depth (drop_path_rate 0.3: every block but the first) the others add
    it after, through their drop path."""
    from hiera_kernels import recompute

    residuals = []
    mlp = recompute.layer_norm_mlp
    monkeypatch.setattr(recompute, "layer_norm_mlp", lambda *a, residual=False: residuals.append(residual) or mlp(*a, residual=residual))
    for rate in (0.0, 0.3):
        if family == "sam2":
            model = trunk("T", drop_path_rate=rate, short=True)
        else:
            model = timm_model("sam2_hiera_tiny", num_classes=10, stages=(1, 1, 3, 1), global_att_blocks=(4,), drop_path_rate=rate)
        model = hk.patch(model.train(), backend="cpu")
        blocks = [m for m in model.modules() if type(m).__name__ == "MultiScaleBlock"]
        residuals.clear()
        out = model(torch.randn(1, 3, 160, 160))
        sum(t.sum() for t in tensors(out)).backward()
        drops = [b.drop_path if family == "sam2" else b.drop_path2 for b in blocks]
        assert residuals == [isinstance(d, nn.Identity) for d in drops], (rate, residuals)
        assert all(residuals) if rate == 0 else sum(residuals) == 1


def test_autocast_bf16_and_compile():
    """Under CPU bf16 autocast by the error rule at bfloat16's allowance (float32
    parameters' gradients come out of bf16 products), every gradient included (the GEMMs
    run on the unpadded map, SAM 2's on the padded windows: a different M, so other
    rounding; the input is compare()'s);
    then torch.compile(fullgraph=True) of the patched trunk against eager."""
    base = trunk("B+", short=True).eval()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 160, 160)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grad = run(copy.deepcopy(base), x, stages)
        out, grad = run(hk.patch(copy.deepcopy(base)), x, stages)
    assert [o.dtype for o in out] == [r.dtype for r in ref]  # the residual stream stays float32, as unpatched
    exact, exact_grad = run(copy.deepcopy(base).double(), x.double(), stages)
    for i, (o, r, e) in enumerate(zip(out, ref, exact)):
        assert_rule(f"autocast output {i}", o, r, e, torch.bfloat16)
    for k in exact_grad:
        assert_rule(f"autocast grad {k}", grad[k], ref_grad[k], exact_grad[k], torch.bfloat16)

    model = hk.patch(copy.deepcopy(base))
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(x)
        eager = base(x)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


def test_patched_patch_conv_runs_channels_last_on_cpu():
    """(Values: test_sam2_trunk_patched_equals_unpatched.)"""
    check_patch_conv_runs_channels_last(trunk("T"), torch.randn(1, 3, 64, 64))


def test_patched_trunk_keeps_its_pos_embed():
    """The trunk's _get_pos_embed result is kept between inference calls (the same tensor,
    equal to the class's own), recomputed when a parameter changes in place or the map
    size changes, never kept where its gradient may be needed or on "torch"; unpatch
    drops it."""
    model = trunk("T")
    own = lambda hw: type(model)._get_pos_embed(model, hw)  # noqa: E731
    hk.patch(model)
    with torch.no_grad():
        first = model._get_pos_embed((16, 16))
        assert model._get_pos_embed((16, 16)) is first and torch.equal(first, own((16, 16)))
        assert model._get_pos_embed((24, 24)).shape == (1, 24, 24, 96)
        model.pos_embed.add_(1.0)  # in place: a new version
        again = model._get_pos_embed((16, 16))
        assert again is not first and torch.equal(again, own((16, 16)))
        model.pos_embed.data = model.pos_embed.data * 2  # a swapped tensor: compared by value
        assert torch.equal(model._get_pos_embed((16, 16)), own((16, 16)))
    with torch.inference_mode():
        kept = model._get_pos_embed((16, 16))
        assert kept.is_inference() and model._get_pos_embed((16, 16)) is kept
    with torch.no_grad():
        outside = model._get_pos_embed((16, 16))
        assert outside is not kept and not outside.is_inference()  # built outside inference mode again
    training = model._get_pos_embed((16, 16))
    assert training.requires_grad and training is not model._get_pos_embed((16, 16))
    training.sum().backward()
    assert model.pos_embed.grad is not None
    hk.unpatch(model)
    hk.patch(model, backend="torch")
    with torch.no_grad():
        assert model._get_pos_embed((16, 16)) is not model._get_pos_embed((16, 16))
    hk.unpatch(model)
    assert "_get_pos_embed" not in vars(model) and model not in sam2_adapter._POS_EMBEDS


def test_patched_timm_trunk_keeps_its_pos_embed():
    """timm's HieraDet._pos_embed(x) adds a kept map (the class's own of a -0.0 map): the
    bits of the class's own x + map, signed zeros and infinities included (NaN where it
    has NaN: ATen's bfloat16 add gives a NaN other bits on a contiguous map than on the
    class's permuted one); recomputed when a parameter changes; not kept in training;
    unpatch drops it."""
    model = timm_model("sam2_hiera_tiny", num_classes=10, stages=(1, 1, 3, 1), global_att_blocks=(4,)).eval()
    own = lambda x: type(model)._pos_embed(model, x)  # noqa: E731
    x = torch.randn(2, 16, 16, 96)
    x[0, 0, 0, :4] = torch.tensor([-0.0, 0.0, float("inf"), float("nan")])
    with torch.no_grad():
        model.pos_embed[0, :4] = 0.0  # zeros in the map too: +0.0 + -0.0 must stay +0.0
        model.pos_embed_window[0, :2] = -0.0
    hk.patch(model)

    def bits(t):  # NaNs as one value
        return torch.where(t.isnan(), float("nan"), t).view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)

    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with torch.no_grad():
            got = model._pos_embed(x.to(dtype))
            kept = sam2_adapter._POS_EMBEDS[model][2]
            assert torch.equal(bits(got), bits(own(x.to(dtype))))
            model._pos_embed(x.to(dtype))
            assert sam2_adapter._POS_EMBEDS[model][2] is kept
            model.pos_embed.add_(1.0)  # in place: recomputed
            assert torch.equal(bits(model._pos_embed(x.to(dtype))), bits(own(x.to(dtype))))
            assert sam2_adapter._POS_EMBEDS[model][2] is not kept
    model.float().train()
    forgotten = sam2_adapter._POS_EMBEDS.pop(model)
    training = model._pos_embed(x)  # grad mode, parameters requiring it: the class's own, not kept
    assert training.requires_grad and model not in sam2_adapter._POS_EMBEDS and forgotten is not None
    training.sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed_window.grad is not None
    hk.unpatch(model)
    assert "_pos_embed" not in vars(model) and model not in sam2_adapter._POS_EMBEDS


def test_patch_keeps_model_and_unpatch_restores_it():
    model = trunk("T").eval()
    x = torch.randn(1, 3, 160, 160)
    keys, params = list(model.state_dict()), dict(model.named_parameters())
    instance_attrs = {id(m): set(vars(m)) for m in model.modules()}
    calls = []
    model.blocks[1].attn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        before = model(x)
        hk.patch(model)
        assert type(model) is Hiera and list(model.state_dict()) == keys
        assert all(p is params[n] for n, p in model.named_parameters())
        assert all("forward" not in vars(m) for m in trunk("T").modules())  # per instance: a fresh one runs its class's code
        model(x)
        assert len(calls) == 2  # the attention is still called as a module: its hooks fire
        packed = [m for m in model.modules() if epilogues.is_packed(m)]
        assert packed  # CPU float32 inference on "auto": the Linears ran in the epilogues
        hk.unpatch(model)
        assert {id(m): set(vars(m)) for m in model.modules()} == instance_attrs
        assert not any(epilogues.is_packed(m) for m in packed)  # unpatch dropped the packed weights
        after = model(x)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_a_linear_with_a_hook_keeps_its_module_call():
    model = hk.patch(trunk("T").eval())
    seen = []
    model.blocks[0].mlp.layers[0].register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 160, 160))
    assert seen == [1] and epilogues.is_packed(model.blocks[0].attn.qkv)


def test_an_attention_wrapped_after_patching_keeps_its_call():
    """A forward set on a patched block's attention since patching (a wrapper, taking only
    x as SAM 2's own does): the block runs its own forward, which calls it so, in inference
    and in training."""
    model = hk.patch(trunk("T"), backend="cpu")
    attn = model.blocks[1].attn
    seen = []
    attn.forward = lambda x: seen.append(tuple(x.shape)) or type(attn).forward(attn, x)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        model.eval()(x)
    model.train()(x)[-1].sum().backward()
    assert len(seen) == 2 and attn.qkv.weight.grad is not None


def test_blocks_the_op_cannot_run_are_refused_and_nothing_is_patched():
    model = trunk("T")
    model.blocks[3].window_size = 7  # a q-pool block (stride 2) with an odd window
    with pytest.raises(ValueError, match=r"blocks\.3: window_size=7 is not divisible by the q stride 2"):
        hk.patch(model)
    assert not hk.adapters.is_patched(model)
    model = trunk("T")
    model.blocks[1].attn.q_pool = nn.MaxPool2d(3, 2)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn: the q pool must be a square MaxPool2d\(kernel_size=stride"):
        hk.patch(model)
    model = timm_model("sam2_hiera_tiny")
    model.blocks[0].attn.num_heads = 5
    with pytest.raises(ValueError, match=r"blocks\.0\.attn: dim_out=96 is not divisible by num_heads=5"):
        hk.patch(model)
    assert not hk.adapters.is_patched(model)
