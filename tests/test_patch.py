"""hiera_kernels.patch / unpatch on the real official, timm and transformers models.

Equality: the patched model against the unpatched one by the shared error rule
(hiera_kernels/error_rule.py): the unpatched model in float64 is the reference, the
unpatched model in the same dtype the torch result. Every output and intermediate, the
input's gradient and every parameter's gradient, in float32 and bfloat16, on small
inputs (random weights). Then what patching must leave alone: class, parameters,
state_dict keys, hooks, other instances, and bit-identical behaviour after unpatch.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hiera_kernels as hk
from hiera_kernels import epilogues
from hiera_kernels.error_rule import judge

from helpers import check_patch_conv_runs_channels_last, run, tensors

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import hiera as official
    import timm
    from transformers import HieraBackbone, HieraConfig, HieraForImageClassification, HieraForPreTraining, HieraModel

IMAGE = (2, 3, 64, 64)
VIDEO = (1, 3, 4, 64, 64)
VIDEO_ARGS = dict(
    q_stride=(1, 2, 2), mask_unit_size=(1, 8, 8), patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4),
    patch_padding=(1, 3, 3), sep_pos_embed=True,
)


def keep_mask(units, kept, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(batch, units, generator=g).argsort(dim=1)
    return order < kept  # [B, units], `kept` True per sample


def hf_config(**kw):
    base = dict(image_size=[64, 64], embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
    return HieraConfig(**{**base, **kw})


class WithBackbone(nn.Module):
    """A bigger model holding a Hiera: a timm trunk under a new head."""

    def __init__(self):
        super().__init__()
        self.trunk = timm.create_model("hiera_tiny_224", img_size=64, num_classes=0)
        self.head = nn.Linear(self.trunk.num_features, 5)

    def forward(self, x):
        return self.head(self.trunk(x))


_mae_mask = keep_mask(4, 1, IMAGE[0])  # 64x64: 2x2 mask units of 8x8 tokens, keep 1
_video_mae_mask = keep_mask(8, 3, VIDEO[0])  # 4x64x64: 2x2x2 units, keep 3

# name -> (build() -> model, input shape, run(model, x) -> output)
CASES = {
    "official-tiny": (
        lambda: official.hiera_tiny_224(input_size=(64, 64), num_classes=10),
        IMAGE, lambda m, x: m(x, return_intermediates=True)),
    "official-b+-hd56": (  # Hiera-B+ widths (embed 112, 2 heads: head dim 56), fewer blocks
        lambda: official.Hiera(input_size=(64, 64), embed_dim=112, num_heads=2, stages=(1, 1, 2, 1), num_classes=10),
        IMAGE, lambda m, x: m(x, return_intermediates=True)),
    "official-mae": (
        lambda: official.mae_hiera_tiny_224(input_size=(64, 64), decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2),
        IMAGE, lambda m, x: m(x, mask=_mae_mask)[:3]),
    "official-video": (
        lambda: official.Hiera(input_size=(4, 64, 64), embed_dim=32, stages=(1, 1, 2, 1), num_classes=10, **VIDEO_ARGS),
        VIDEO, lambda m, x: m(x, return_intermediates=True)),
    "official-video-mae": (
        lambda: official.MaskedAutoencoderHiera(
            input_size=(4, 64, 64), embed_dim=32, stages=(1, 1, 2, 1), q_pool=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2, **VIDEO_ARGS),
        VIDEO, lambda m, x: m(x, mask=_video_mae_mask)[:3]),
    "timm-tiny": (
        lambda: timm.create_model("hiera_tiny_224", img_size=64, num_classes=10),
        IMAGE, lambda m, x: m.forward_intermediates(x)),
    "timm-abswin": (  # abs-win pos embed, LayerScale, no expand proj (max+mean residual)
        lambda: timm.create_model("hiera_small_abswin_256", img_size=64, num_classes=10, stages=(1, 1, 2, 1)),
        IMAGE, lambda m, x: (m(x), m.forward_intermediates(x, coarse=False, output_fmt="NHWC"))),
    "timm-b+-hd56": (
        lambda: timm.create_model("hiera_base_plus_224", img_size=64, num_classes=10, stages=(1, 1, 2, 1)),
        IMAGE, lambda m, x: (m(x), m.forward_intermediates(x))),
    "timm-features-only": (
        lambda: timm.create_model("hiera_tiny_224", img_size=64, features_only=True),
        IMAGE, lambda m, x: m(x)),
    "timm-backbone-in-model": (WithBackbone, IMAGE, lambda m, x: m(x)),
    "hf-classification": (
        lambda: HieraForImageClassification(hf_config(num_labels=10)),
        IMAGE, lambda m, x: m(x, output_hidden_states=True)),
    "hf-model-hd56": (
        lambda: HieraModel(hf_config(embed_dim=112, num_heads=[2, 4, 8, 16])),
        IMAGE, lambda m, x: m(x, output_hidden_states=True)),
    "hf-backbone": (  # every stage's feature map, each through its hidden_states_norms LayerNorm
        lambda: HieraBackbone(hf_config(out_features=["stage1", "stage2", "stage3", "stage4"])),
        IMAGE, lambda m, x: m(x).feature_maps),
    "hf-pretraining": (
        lambda: HieraForPreTraining(hf_config(decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2)),
        IMAGE, lambda m, x: m(x, noise=torch.linspace(0, 1, 8).view(2, 4), output_hidden_states=True)),
}


# Cases whose unpatched model cannot run in bfloat16 at all: nothing to compare.
NO_BF16 = {
    "hf-pretraining": "transformers' HieraPatchEmbeddings.masked_conv multiplies the bf16 pixels by a float32 "
                      "mask, so the unpatched model fails in bfloat16 (input float, bias bfloat16)",
}
# torch has no bfloat16 CPU backward for the antialiased bicubic upsample of timm's
# abs-win pos embed: the unpatched model cannot take that gradient, so there is nothing to compare.
NO_BF16_BACKWARD = {"timm-abswin"}


def compare(name, dtype, backend=None):
    """Patched vs unpatched by the error rule; returns (worst output verdict, worst grad verdict)."""
    build, shape, fn = CASES[name]
    torch.manual_seed(0)
    base = build().train()
    x = torch.randn(shape)
    backward = not (dtype == torch.bfloat16 and name in NO_BF16_BACKWARD)
    ref_out, ref_grad = run(copy.deepcopy(base).double(), x.double(), fn, backward)
    torch_out, torch_grad = run(copy.deepcopy(base).to(dtype), x.to(dtype), fn, backward)
    patched = hk.patch(copy.deepcopy(base).to(dtype), backend=backend)
    out, grad = run(patched, x.to(dtype), fn, backward)

    assert len(out) == len(ref_out) > 0
    assert grad.keys() == ref_grad.keys() and (len(grad) > 1 or not backward)
    worst = {}
    for kind, results in (("output", zip(out, torch_out, ref_out)),
                          ("grad", ((grad[k], torch_grad[k], ref_grad[k]) for k in ref_grad))):
        for i, (r, t, f) in enumerate(results):
            v = judge(r, t, f)
            assert v.passed, f"{name} {dtype} {kind} {i}: {v.describe()}"
            if kind not in worst or v.error > worst[kind].error:
                worst[kind] = v
    grads = (f"max grad error {worst['grad'].error:.3g} (limit {worst['grad'].limit:.3g}), {len(grad)} grads"
             if backward else "no backward (see NO_BF16_BACKWARD)")
    print(f"\n{name} {dtype}: max output error {worst['output'].error:.3g} (limit {worst['output'].limit:.3g}), {grads}")
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_patched_equals_unpatched(name, dtype):
    if dtype == torch.bfloat16 and name in NO_BF16:
        pytest.skip(NO_BF16[name])
    compare(name, dtype)


def test_torch_backend_by_name():
    compare("timm-tiny", torch.float32, backend="torch")


@pytest.mark.parametrize("build", [lambda: official.hiera_tiny_224(input_size=(64, 64)),
                                   lambda: timm.create_model("hiera_tiny_224", img_size=64)], ids=["official", "timm"])
def test_patched_patch_conv_runs_channels_last_on_cpu(build):
    """(Values: test_patched_equals_unpatched.)"""
    check_patch_conv_runs_channels_last(build(), torch.randn(IMAGE))


def _forward_counts(model):
    """How many of the model's modules run on the ops (have a bound method)."""
    return sum(hk.adapters.RECORD in vars(m) for m in model.modules())


@pytest.mark.parametrize("name", ["official-mae", "timm-abswin", "hf-backbone", "hf-pretraining"])
def test_patch_keeps_model_and_unpatch_restores_it(name):
    build, shape, fn = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    cls, params = type(model), dict(model.named_parameters())
    keys = list(model.state_dict().keys())
    instance_attrs = {id(m): set(vars(m)) for m in model.modules()}
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        before = tensors(fn(model, x))

    assert hk.patch(model) is model
    assert type(model) is cls and _forward_counts(model) > 0
    assert list(model.state_dict().keys()) == keys
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    # Per instance: a fresh model of the same classes runs its classes' own methods.
    other = build()
    assert all(hk.adapters.RECORD not in vars(m) and "forward" not in vars(m) for m in other.modules())
    with torch.no_grad():
        fn(model, x)
    assert len(calls) == 2  # the hook registered before patching still fires

    assert hk.unpatch(model) is model
    assert {id(m): set(vars(m)) for m in model.modules()} == instance_attrs
    with torch.no_grad():
        after = tensors(fn(model, x))
    assert len(after) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_patched_model_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = official.hiera_tiny_224(input_size=(64, 64)), official.hiera_tiny_224(input_size=(64, 64))
    hk.patch(a)
    b.load_state_dict(a.state_dict(), strict=True)
    hk.patch(b)
    x = torch.randn(IMAGE)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    copied = copy.deepcopy(a)  # the bound methods follow the copy
    assert all(m.forward.__self__ is m for m in copied.modules() if "forward" in vars(m))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(TypeError, match=r"found no Hiera modules in Sequential; looked for official hiera: hiera\.hiera_mae\."
                                        r"MaskedAutoencoderHiera, hiera\.hiera_utils\.Unroll.*timm: timm\.models\.hiera\.Unroll.*transformers"):
        hk.patch(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="hiera_kernels model; it already runs on hiera_kernels.ops"):
        hk.patch(hk.hiera_tiny_224(input_size=(64, 64)))
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        hk.patch(official.hiera_tiny_224(input_size=(64, 64)), backend="gpu")
    with pytest.raises(ValueError, match="has no module patched"):
        hk.unpatch(official.hiera_tiny_224(input_size=(64, 64)))


def test_bad_model_patches_nothing():
    model = official.hiera_tiny_224(input_size=(64, 64))
    model.blocks[-1].attn.heads = 5  # the last block's attention cannot run: 768 % 5 != 0
    with pytest.raises(ValueError, match=r"blocks\.11\.attn: dim_out=768 is not divisible by heads=5"):
        hk.patch(model)
    assert not hk.adapters.is_patched(model)
    assert all("forward" not in vars(m) for m in model.modules())


def test_failure_while_binding_rolls_back(monkeypatch):
    model = timm.create_model("hiera_tiny_224", img_size=64)

    def fail(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(hk.adapters, "PatchRecord", fail)
    with pytest.raises(RuntimeError, match="boom"):
        hk.patch(model)
    assert all("forward" not in vars(m) and hk.adapters.RECORD not in vars(m) for m in model.modules())


def test_twice_and_foreign_instance_patches_are_refused():
    model = official.hiera_tiny_224(input_size=(64, 64))
    hk.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        hk.patch(model)
    other = official.hiera_tiny_224(input_size=(64, 64))
    other.blocks[0].forward = lambda x: x  # someone else's per-instance patch
    with pytest.raises(ValueError, match=r"blocks\.0 \(HieraBlock\) already has its own instance attribute 'forward'"):
        hk.patch(other)
    assert not hk.adapters.is_patched(other)


def test_hf_output_attentions_keeps_the_eager_weights():
    torch.manual_seed(0)
    model = HieraForImageClassification(hf_config(num_labels=10)).eval()
    x = torch.randn(IMAGE)
    with torch.no_grad():
        ref = model(x, output_attentions=True)
        hk.patch(model)
        out = model(x, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == 4
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out.attentions, ref.attentions))
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)


@pytest.mark.parametrize("name", ["official-tiny", "timm-tiny"])
def test_training_keeps_an_attention_wrapped_after_patching(name):
    """In training on a kernel backend a patched block computes its attention from the qkv
    on itself only where the attention's forward is the bound patch: a wrapper set on the
    instance since is called."""
    model = hk.patch(CASES[name][0]().train(), backend="cpu")
    attn = next(m for m in model.modules() if type(m).__name__ == "MaskUnitAttention" and m.q_stride == 1)
    own, seen = attn.forward, []
    attn.forward = lambda x: seen.append(1) or own(x)
    model(torch.randn(IMAGE)).sum().backward()
    assert seen == [1] and attn.qkv.weight.grad is not None


def skip_fusion_probe(monkeypatch):
    """A run(model) -> (layer_norm_attention calls, layer_norm_linear calls, the residual
    flag of each layer_norm_mlp call) over one forward and backward on IMAGE."""
    from hiera_kernels import recompute
    from torch.profiler import profile

    residuals = []
    mlp = recompute.layer_norm_mlp
    monkeypatch.setattr(recompute, "layer_norm_mlp", lambda *a, residual=False: residuals.append(residual) or mlp(*a, residual=residual))

    def run_counting(model, shape=IMAGE):
        residuals.clear()
        with profile() as prof:
            sum(t.sum() for t in tensors(model(torch.randn(shape)))).backward()
        counts = {e.key: e.count for e in prof.key_averages()}
        return counts.get("hiera_kernels::layer_norm_attention", 0), counts.get("hiera_kernels::layer_norm_linear", 0), list(residuals)

    return run_counting


@pytest.mark.parametrize("name", ["official-tiny", "timm-tiny", "timm-abswin"])
def test_training_adds_each_skip_connection_inside_its_branch(name, monkeypatch):
    """In training on "cpu", a patched official or timm block that nothing wraps (no drop
    path that may drop the branch: none, rate 0, or eval; no LayerScale; no hook on either)
    runs its attention branch, where it pools no queries, as layer_norm_attention and its
    MLP as layer_norm_mlp with the skip connection in fc2's epilogue; with stochastic depth
    (drop_path_rate 0.1: every block but the first), LayerScale (abswin) or a hook on the
    first block's wrapper (which then fires) neither, and the three-op path's
    layer_norm_linear instead. (The numbers: test_patched_equals_unpatched, in train mode,
    and test_drop_path_training_matches_unpatched.)"""
    run_counting = skip_fusion_probe(monkeypatch)

    def wrappers(block):
        return [getattr(block, n) for n in ("ls1", "ls2", "drop_path", "drop_path1", "drop_path2") if hasattr(block, n)]

    def build(**kw):
        if name.startswith("official"):
            return official.hiera_tiny_224(input_size=(64, 64), num_classes=10, **kw)
        return timm.create_model("hiera_small_abswin_256" if name == "timm-abswin" else "hiera_tiny_224", img_size=64,
                                 num_classes=10, **({"stages": (1, 1, 2, 1)} if name == "timm-abswin" else {}), **kw)

    def check(model, unwrapped, mlp_unwrapped=None):
        """unwrapped(block): nothing wraps its attention branch (and its MLP's, unless mlp_unwrapped says)."""
        blocks = [m for m in model.modules() if type(m).__name__ == "HieraBlock"]
        plain = [b.dim == b.dim_out and b.attn.q_stride == 1 for b in blocks]
        fused = [p and unwrapped(b) for p, b in zip(plain, blocks)]
        attention_ops, qkv_ops, mlp_residuals = run_counting(model)
        assert attention_ops == sum(fused) and qkv_ops == sum(plain) - sum(fused), (attention_ops, qkv_ops)
        assert mlp_residuals == [(mlp_unwrapped or unwrapped)(b) for b in blocks], mlp_residuals
        return fused, mlp_residuals

    identities = lambda b: all(isinstance(m, nn.Identity) for m in wrappers(b))  # noqa: E731
    fused, residuals = check(hk.patch(build().train(), backend="cpu"), identities)
    if name == "timm-abswin":
        assert not any(fused) and not any(residuals)  # LayerScale wraps every branch
        return
    assert all(residuals) and 0 < sum(fused) < len(residuals)
    dropping = hk.patch(build(drop_path_rate=0.1).train(), backend="cpu")
    fused, residuals = check(dropping, identities)
    assert sum(fused) == 1 and sum(residuals) == 1  # only the first block keeps rate 0
    # Drop paths that cannot drop: in eval (gradients still on), or at rate 0 (a schedule).
    no_ls = lambda b: not any(type(m).__name__ == "LayerScale" for m in wrappers(b))  # noqa: E731
    fused_eval, _ = check(dropping.eval(), no_ls)
    for m in dropping.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    assert check(dropping.train(), no_ls)[0] == fused_eval and sum(fused_eval) > 1
    # A hook on what wraps the first block's attention branch: the block's own adds, and the hook fires.
    model = hk.patch(build().train(), backend="cpu")
    first = next(m for m in model.modules() if type(m).__name__ == "HieraBlock")
    calls = []
    if name.startswith("official"):  # one drop path wraps both branches
        first.drop_path.register_forward_hook(lambda *_: calls.append(1))
        check(model, lambda b: b is not first and identities(b))
        assert len(calls) == 2
    else:
        first.ls1.register_forward_hook(lambda *_: calls.append(1))
        check(model, lambda b: b is not first and identities(b), identities)
        assert len(calls) == 1


@pytest.mark.parametrize("name", ["official-tiny", "timm-tiny"])
def test_drop_path_training_matches_unpatched(name):
    """Stochastic depth in training: the same draws in the same order as the blocks' own
    code, the first block (rate 0) fused and the others not (in float64: what is checked is
    the drop pattern)."""
    build = {"official-tiny": lambda: official.hiera_tiny_224(input_size=(64, 64), num_classes=10, drop_path_rate=0.3),
             "timm-tiny": lambda: timm.create_model("hiera_tiny_224", img_size=64, num_classes=10, drop_path_rate=0.3)}[name]
    torch.manual_seed(0)
    base = build().train().double()
    x = torch.randn(IMAGE, dtype=torch.float64)
    fn = CASES[name][2]
    torch.manual_seed(5)
    ref, ref_grad = run(copy.deepcopy(base), x, fn)
    torch.manual_seed(5)
    out, grad = run(hk.patch(copy.deepcopy(base), backend="cpu"), x, fn)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)
    assert grad.keys() == ref_grad.keys()
    for k in ref_grad:
        torch.testing.assert_close(grad[k], ref_grad[k], rtol=1e-10, atol=1e-12, msg=k)


def test_hf_training_keeps_the_attention_modules_own_call_where_asked():
    """In training on a kernel backend the patched HieraLayer runs norm and qkv as the
    recompute op, except where the attention module's own call is needed: with
    output_attentions (the eager weights), a hook on it, or a forward of its own."""
    torch.manual_seed(0)
    base = HieraForImageClassification(hf_config(num_labels=10)).train()
    x = torch.randn(IMAGE)
    ref = base(x, output_attentions=True)
    model = hk.patch(copy.deepcopy(base), backend="cpu")
    out = model(x, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == 4
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out.attentions, ref.attentions))
    attn = model.hiera.encoder.stages[2].layers[1].attn  # a layer of one width: recompute applies there
    calls = []
    handle = attn.register_forward_hook(lambda *_: calls.append("hook"))
    model(x).logits.sum().backward()
    assert calls == ["hook"]
    handle.remove()
    own = attn.forward
    attn.forward = lambda h, output_attentions=False: (calls.append("own") or own(h, output_attentions))
    model(x)
    assert calls == ["hook", "own"]


def test_compile_fullgraph_patched():
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", img_size=64, num_classes=10).eval()
    x = torch.randn(IMAGE)
    with torch.no_grad():
        ref = model(x)
        hk.patch(model)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mae_subclass_with_its_own_loss_is_refused():
    class MyMAE(official.MaskedAutoencoderHiera):
        def forward_loss(self, x, pred, mask):
            return super().forward_loss(x, pred, mask)

    model = MyMAE(input_size=(64, 64), embed_dim=32, stages=(1, 1, 1, 1), q_pool=2, decoder_depth=1)
    with pytest.raises(ValueError, match=r"<root> \(.*MyMAE\) overrides MaskedAutoencoderHiera\.forward_loss"):
        hk.patch(model)
    assert not hk.adapters.is_patched(model)


def test_activation_names_are_the_gelus_they_compute():
    """activation_name knows the GELU modules of torch, timm and transformers (each family's
    MLP builds one), only where the module computes F.gelu with that approximation (the
    same bits); anything else, a Python-formula GELU included, is None: not fused."""
    import timm.layers.activations as timm_act
    import transformers.activations as hf_act

    x = torch.randn(1000) * 4
    known = {
        "gelu": [nn.GELU(), timm_act.GELU(), hf_act.GELUActivation()],
        "gelu_tanh": [nn.GELU(approximate="tanh"), timm_act.GELUTanh(), hf_act.GELUTanh()],
    }
    for name, modules in known.items():
        approximate = {"gelu": "none", "gelu_tanh": "tanh"}[name]
        for act in modules:
            assert epilogues.activation_name(act) == name, type(act)
            assert torch.equal(act(x), F.gelu(x, approximate=approximate)), type(act)
    unknown = [nn.ReLU(), hf_act.GELUActivation(use_gelu_python=True), hf_act.GELUTanh(use_gelu_tanh_python=True),
               hf_act.NewGELUActivation()]
    hub_forward = hf_act.GELUActivation()
    hub_forward.forward = lambda t: t  # an instance forward of its own (as a hub kernel sets)
    for act in unknown + [hub_forward]:
        assert epilogues.activation_name(act) is None, type(act)
