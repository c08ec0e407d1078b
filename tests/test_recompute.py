"""Training ops that recompute LayerNorm and GELU outputs in the backward
(hiera_kernels.recompute): outputs and gradients pass the shared rule against float64, the ops keep only what they say, opcheck,
compile, and where the drop-in model uses them (and where it must not)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hiera_kernels as hk
from hiera_kernels import error_rule, recompute
from hiera_kernels.backends import EXTENSION
from hiera_kernels.tools.traffic import saved_activation_bytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def modules(dim=96, hidden=384, dtype=torch.float32, affine=True, bias=True):
    """LayerNorm -> fc1 -> fc2 with weights far from their defaults (a dropped term shows)."""
    norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)
    fc1, fc2 = nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, dim, bias=bias)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_(1.0 if p is norm.weight else 0.0, 0.5)
        for m in (fc1, fc2):
            m.weight.normal_(0, m.in_features**-0.5)
            if bias:
                m.bias.normal_(0, 0.5)
    return norm.to(dtype), fc1.to(dtype), fc2.to(dtype)


def plain(kind, norm, fc1, fc2, activation, x):
    """The modules as the plain block runs them."""
    if kind == "layer_norm_linear":
        return fc1(norm(x))
    mlp = fc2(F.gelu(fc1(norm(x)), approximate=APPROXIMATE[activation]))
    return x + mlp if kind == "layer_norm_mlp+residual" else mlp


def fused(kind, norm, fc1, fc2, activation, x):
    if kind == "layer_norm_linear":
        return recompute.layer_norm_linear(norm, fc1, x)
    if kind == "layer_norm_mlp+residual":  # the block's skip connection in fc2's epilogue
        return recompute.layer_norm_mlp(norm, fc1, activation, fc2, x, residual=True)
    return recompute.layer_norm_mlp(norm, fc1, activation, fc2, x)


def forward_and_grads(kind, mods, activation, x, grad_out, run):
    x = x.detach().requires_grad_()
    used = mods[:2] if kind == "layer_norm_linear" else mods  # fc2 is the MLP's
    params = [x] + [p for m in used for p in m.parameters()]
    out = run(kind, *mods, activation, x)
    return [out.detach(), *torch.autograd.grad(out, params, grad_out(out))]


KINDS = ["layer_norm_linear", "layer_norm_mlp"]


@pytest.mark.parametrize("kind, activation", [("layer_norm_linear", None), ("layer_norm_mlp", "gelu"), ("layer_norm_mlp", "gelu_tanh"),
                                              ("layer_norm_mlp+residual", "gelu")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_gradients_pass_the_rule(kind, dtype, activation):
    mods = modules()
    x = torch.randn(2, 150, 96)  # [B, N, C]; 300 rows, not a multiple of any GEMM block
    g = torch.Generator().manual_seed(1)
    grad_out = lambda out: torch.randn(out.shape, generator=g).to(out.dtype)  # noqa: E731

    def run(dt, how):
        g.manual_seed(1)
        return forward_and_grads(kind, [copy.deepcopy(m).to(dt) for m in mods], activation, x.to(dt), grad_out, how)

    reference, torch_path, ours = run(torch.float64, plain), run(dtype, plain), run(dtype, fused)
    names = ["out", "x"] + [f"{i}.{n}" for i, m in enumerate(mods) for n, _ in m.named_parameters()]
    for name, r, t, o in zip(names, reference, torch_path, ours):
        verdict = error_rule.judge(o, t, r)
        assert verdict.passed, f"{kind} {name}: {verdict.describe()}"


def op_args(kind, dtype=torch.float32, affine=True, bias=True, approximate="none"):
    norm, fc1, fc2 = modules(dim=8, hidden=16, dtype=dtype, affine=affine, bias=bias)
    x = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
    lin = (fc1.weight, fc1.bias)
    if kind == "layer_norm_linear":
        return (x, norm.weight, norm.bias, norm.eps, *lin)
    args = (x, norm.weight, norm.bias, norm.eps, *lin, fc2.weight, fc2.bias, approximate)
    return args + (True,) if kind == "layer_norm_mlp+residual" else args


@pytest.mark.parametrize("kind, approximate", [("layer_norm_linear", None), ("layer_norm_mlp", "none"), ("layer_norm_mlp", "tanh"),
                                               ("layer_norm_mlp+residual", "none")])
@pytest.mark.parametrize("affine_and_bias", [True, False])
def test_opcheck_and_float64_gradcheck(kind, approximate, affine_and_bias):
    """The exact GELU ("none") is the path on the C++ kernels (float64: their libm branch)."""
    op = getattr(torch.ops.hiera_kernels, kind.split("+")[0]).default
    for dtype in (torch.float32, torch.bfloat16):  # bfloat16: the Linears in oneDNN's epilogues
        torch.library.opcheck(op, op_args(kind, dtype, affine=affine_and_bias, bias=affine_and_bias, approximate=approximate))
    args = op_args(kind, torch.float64, affine=affine_and_bias, bias=affine_and_bias, approximate=approximate)
    assert torch.autograd.gradcheck(lambda *a: op(*a)[0], args)
    # Double backward (create_graph) runs ATen's differentiable ops inside the backward.
    assert torch.autograd.gradgradcheck(lambda *a: op(*a)[0], args)


def test_frozen_parameters_get_no_gradient_work():
    """Only what needs a gradient is computed (a frozen backbone: no weight GEMMs)."""
    norm, fc1, fc2 = modules()
    for p in (*norm.parameters(), *fc1.parameters()):
        p.requires_grad_(False)
    x = torch.randn(2, 10, 96, requires_grad=True)
    out = recompute.layer_norm_mlp(norm, fc1, "gelu", fc2, x)
    out.sum().backward()
    assert x.grad is not None and fc2.weight.grad is not None and fc1.weight.grad is None and norm.weight.grad is None


@pytest.mark.parametrize("kind", ["layer_norm_linear", "layer_norm_mlp+residual"])
@pytest.mark.parametrize("wanted", [("x",), ("2.bias",), ("x", "2.bias"), ("1.weight",), ("0.weight", "1.bias")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_subset_of_gradients(kind, wanted, dtype):
    """Whatever subset needs a gradient (x alone: the LayerNorm's backward without y; fc2's
    bias alone: no skip gradient to sum it from; the weight alone: y without a LayerNorm
    backward), the op gives the plain modules' gradients by the rule against float64."""
    mods = modules()
    x, g = torch.randn(2, 150, 96), torch.Generator()
    names = ["x"] + [f"{i}.{n}" for i, m in enumerate(mods) for n, _ in m.named_parameters()]
    if kind == "layer_norm_linear":  # norm and fc1 only
        wanted = tuple(w.replace("2.", "1.") for w in wanted)

    def grads(run, dt):
        used = [copy.deepcopy(m).to(dt) for m in mods]
        leaves = dict(zip(names, [x.to(dt)] + [p for m in used for p in m.parameters()]))
        for name, t in leaves.items():
            t.requires_grad_(name in wanted)
        out = run(kind, *used, "gelu", leaves["x"])
        g.manual_seed(1)
        return torch.autograd.grad(out, [leaves[w] for w in wanted], torch.randn(out.shape, generator=g).to(dt))

    for w, r, t, o in zip(wanted, grads(plain, torch.float64), grads(plain, dtype), grads(fused, dtype)):
        verdict = error_rule.judge(o, t, r)
        assert verdict.passed, f"{kind} {w}: {verdict.describe()}"


@pytest.mark.parametrize("kind", KINDS + ["layer_norm_mlp+residual"])
def test_backward_runs_one_layer_norm_pass(kind):
    """On the C++ kernels the backward's LayerNorm work is one hiera_kernels::layer_norm_backward
    call, which recomputes y (no separate hiera_kernels::layer_norm) and, with the skip
    connection, adds its gradient (no separate add)."""
    norm, fc1, fc2 = modules(dtype=torch.bfloat16)
    x = torch.randn(2, 150, 96, dtype=torch.bfloat16, requires_grad=True)
    out = fused(kind, norm, fc1, fc2, "gelu", x)
    from torch.profiler import profile
    with profile() as prof:
        out.backward(torch.randn(out.shape, dtype=out.dtype))
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("hiera_kernels::layer_norm_backward") == 1
    assert "hiera_kernels::layer_norm" not in calls and "aten::add_" not in calls, sorted(calls)


def test_mixed_dtype_norm_keeps_atens_layer_norm():
    """A bfloat16 model with its LayerNorms kept in float32 (a mixed-precision recipe ATen
    takes) trains on "cpu" as on "torch" (the kernels only take matching dtypes): logits and
    every gradient by the rule, with bfloat16 as the compute dtype."""
    model = hk.hiera_tiny_224(input_size=(64, 64), num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    results = {}
    for backend, dtype in (("reference", torch.float64), ("torch", torch.bfloat16), ("cpu", torch.bfloat16)):
        m = copy.deepcopy(model).to(dtype).set_backend("torch" if backend == "reference" else backend).train()
        for norm in m.modules():
            if isinstance(norm, nn.LayerNorm) and dtype != torch.float64:
                norm.float()
        logits = m(x.to(dtype))
        logits.float().square().mean().backward()
        results[backend] = [logits.detach()] + [p.grad for p in m.parameters()]
    for r, t, c in zip(results["reference"], results["torch"], results["cpu"]):
        verdict = error_rule.judge(c, t, r, torch.bfloat16)
        assert verdict.passed, verdict.describe()


def test_ops_keep_only_their_inputs_statistics_and_fc1_output():
    """What autograd saves: x (the caller's), mean and rstd [..., 1], and for the MLP fc1's
    output h [..., hidden]; never norm(x) nor gelu(h)."""
    norm, fc1, fc2 = modules()
    x = torch.randn(2, 150, 96, requires_grad=True)
    model = nn.ModuleList([norm, fc1, fc2])
    rows, stats = 2 * 150, 2 * 2 * 150 * 4  # mean and rstd, float32
    saved = saved_activation_bytes(model, lambda: recompute.layer_norm_linear(norm, fc1, x))
    assert saved == x.nbytes + stats
    saved = saved_activation_bytes(model, lambda: recompute.layer_norm_mlp(norm, fc1, "gelu", fc2, x))
    assert saved == x.nbytes + stats + rows * 384 * 4
    assert saved == saved_activation_bytes(model, lambda: recompute.layer_norm_mlp(norm, fc1, "gelu", fc2, x, residual=True))
    plain_saved = saved_activation_bytes(model, lambda: fc2(F.gelu(fc1(norm(x)))))
    assert plain_saved == saved + rows * (96 + 384) * 4  # the LayerNorm output and the GELU's


def test_backward_fills_no_zero_gradients_for_the_extra_outputs():
    """mean, rstd and h get no gradient: autograd hands None to the backward, where it
    would otherwise fill a zero tensor of each one's size (h: [rows, hidden]) first."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    norm, fc1, fc2 = modules()
    x = torch.randn(2, 150, 96, requires_grad=True)
    out = recompute.layer_norm_mlp(norm, fc1, "gelu", fc2, x, residual=True)
    with Calls() as calls:
        out.sum().backward()
    assert not [f for f in calls.seen if "zero" in f or "fill" in f], calls.seen
    assert x.grad is not None and fc1.bias.grad is not None


def test_residual_needs_the_input_width():
    norm, fc1, fc2 = modules()
    fc2 = nn.Linear(384, 50)
    with pytest.raises(RuntimeError, match=r"layer_norm_mlp: residual=True needs fc2's output width 50 == x's 96"):
        recompute.layer_norm_mlp(norm, fc1, "gelu", fc2, torch.randn(2, 10, 96), residual=True)


def test_drop_in_model_training_keeps_less_than_the_plain_path():
    """The drop-in model on "cpu" runs the ops in training: it saves what the "torch" path
    saves less each block's LayerNorm outputs and GELU output (and attention's own)."""
    model = hk.hiera_tiny_224(input_size=(64, 64), num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    saved = {}
    for backend in ("torch", "cpu"):
        model.set_backend(backend).train()
        saved[backend] = saved_activation_bytes(model, lambda: model(x))
    assert saved["cpu"] <= 0.7 * saved["torch"], saved  # measured: 0.62 (float32)


def test_where_the_model_does_not_use_them():
    norm, fc1, _ = modules()
    x = torch.randn(2, 10, 96, requires_grad=True)
    assert recompute.applies(norm, (fc1,), x, "cpu")
    assert not recompute.applies(norm, (fc1,), x, "torch")  # the oracle stays plain
    with torch.no_grad():
        assert not recompute.applies(norm, (fc1,), x, "cpu")
    assert recompute.applies(norm, (fc1,), x.detach(), "cpu")  # the parameters need gradients
    frozen = copy.deepcopy((norm, fc1))
    for p in (*frozen[0].parameters(), *frozen[1].parameters()):
        p.requires_grad_(False)
    assert not recompute.applies(frozen[0], frozen[1:], x.detach(), "cpu")  # nothing to differentiate
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not recompute.applies(norm, (fc1,), x, "cpu")
    fc1.register_forward_hook(lambda *a: None)
    assert not recompute.applies(norm, (fc1,), x, "cpu")
    assert not recompute.applies(nn.GroupNorm(1, 96), (nn.Linear(96, 8),), x, "cpu")


def test_model_hooks_still_see_their_calls_in_training():
    """A hook (forward, backward, on a submodule such as the GELU, or global) keeps that
    branch on the plain modules."""
    model = hk.hiera_tiny_224(input_size=(64, 64), num_classes=10, backend="cpu").train()
    seen = []
    blocks = model.blocks
    blocks[0].mlp.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    blocks[0].norm1.register_forward_hook(lambda m, args, out: seen.append("norm1"))
    blocks[1].mlp.act.register_forward_hook(lambda m, args, out: seen.append("act"))
    blocks[2].mlp.fc1.register_full_backward_hook(lambda m, gin, gout: seen.append("fc1 backward"))
    blocks[3].attn.register_forward_hook(lambda m, args, out: seen.append("attn"))
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert seen == ["norm1", torch.Size([2, 256, 96]), "act", "attn", "fc1 backward"]
    x = torch.randn(2, 10, 96, requires_grad=True)
    norm, fc1, _ = modules()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not recompute.applies(norm, (fc1,), x, "cpu")
    finally:
        handle.remove()
    assert recompute.applies(norm, (fc1,), x, "cpu")


def _official():
    import hiera
    return hiera.hiera_tiny_224(input_size=(64, 64), num_classes=10), (2, 3, 64, 64)


def _timm():
    import timm
    return timm.create_model("hiera_tiny_224", img_size=64, num_classes=10), (2, 3, 64, 64)


def _transformers():
    from transformers import HieraConfig, HieraForImageClassification
    config = HieraConfig(image_size=[64, 64], num_labels=10, return_dict=False)  # Hiera-T widths; outputs a tuple
    return HieraForImageClassification(config), (2, 3, 64, 64)


def _sam2():
    from sam2.modeling.backbones.hieradet import Hiera
    return Hiera(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                 window_pos_embed_bkg_spatial_size=(7, 7)), (1, 3, 128, 128)


def _timm_sam2():
    import timm
    return timm.create_model("sam2_hiera_tiny", num_classes=10), (1, 3, 128, 128)


@pytest.mark.parametrize("family", ["official", "timm", "transformers", "sam2", "timm-sam2"])
def test_patched_models_keep_less_in_training(family):
    """Patched models on a kernel backend run the ops in their blocks too: less saved
    than the same patched model on "torch" (the plain modules), same gradients by the rule."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model, shape = {"official": _official, "timm": _timm, "transformers": _transformers, "sam2": _sam2,
                        "timm-sam2": _timm_sam2}[family]()
    x = torch.randn(shape)
    saved, grads = {}, {}
    for backend in ("torch", "cpu", None):
        m = hk.patch(copy.deepcopy(model).train(), backend=backend or "torch")
        if backend is None:  # the float64 reference
            m, x_run = m.double(), x.double()
        else:
            x_run = x
        loss = lambda: sum(o.float().square().mean() for o in (lambda y: y if isinstance(y, (list, tuple)) else [y])(m(x_run)))  # noqa: E731
        if backend is not None:
            saved[backend] = saved_activation_bytes(m, loss)
        m.zero_grad()
        loss().backward()
        grads[backend] = {n: p.grad for n, p in m.named_parameters()}
    assert saved["cpu"] <= 0.7 * saved["torch"], saved  # measured: 0.64 (official, timm), 0.63 (transformers), 0.59 (SAM 2s)
    for n in grads[None]:
        verdict = error_rule.judge(grads["cpu"][n], grads["torch"][n], grads[None][n])
        assert verdict.passed, f"{family} {n}: {verdict.describe()}"


# ------------------------------------------------------------- gelu_recompute_backward
gelu_op = torch.ops.hiera_kernels.gelu_recompute_backward.default


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 15, 300, 5000])  # vector and 256-element block tails
def test_gelu_recompute_backward_passes_the_rule(dtype, n):
    if not EXTENSION.loaded:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(n)
    h, grad = torch.randn(n, generator=g) * 3, torch.randn(n, generator=g)
    h[: min(n, 4)] = torch.tensor([0.0, -0.0, 12.0, -12.0])[: min(n, 4)]
    want = (F.gelu(h.double()), torch.ops.aten.gelu_backward(grad.double(), h.double()))
    aten = (F.gelu(h.to(dtype)), torch.ops.aten.gelu_backward(grad.to(dtype), h.to(dtype)))
    got = gelu_op(grad.to(dtype), h.to(dtype))
    for what, o, t, r in zip(["gelu(h)", "grad_h"], got, aten, want):
        assert o.dtype == dtype
        verdict = error_rule.judge(o, t, r)
        assert verdict.passed, f"{what}: {verdict.describe()}"
    torch.testing.assert_close(gelu_op(grad.double(), h.double())[:2], want, atol=1e-14, rtol=0)  # float64: libm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 5000), (37, 300), (2000, 40)])  # one row; block tails; many chunks
def test_gelu_recompute_backward_sums_the_bias_gradient(dtype, rows, width):
    """bias_grad: grad_h summed over the rows (fc1's bias gradient), by the rule against
    ATen's gelu_backward(...).sum(0) and float64; the same gelu(h) and grad_h bits as
    without it; the same bits on one thread as on several."""
    if not EXTENSION.loaded:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(rows)
    h, grad = torch.randn(rows, width, generator=g) * 3, torch.randn(rows, width, generator=g)
    want = torch.ops.aten.gelu_backward(grad.double(), h.double()).sum(0)
    aten = torch.ops.aten.gelu_backward(grad.to(dtype), h.to(dtype)).sum(0)
    out, grad_h, grad_bias = gelu_op(grad.to(dtype), h.to(dtype), True)
    assert grad_bias.shape == (width,) and grad_bias.dtype == dtype
    verdict = error_rule.judge(grad_bias, aten, want)
    assert verdict.passed, verdict.describe()
    plain_out, plain_grad_h, nothing = gelu_op(grad.to(dtype), h.to(dtype))
    assert torch.equal(out, plain_out) and torch.equal(grad_h, plain_grad_h) and nothing.shape == (0,)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gelu_op(grad.to(dtype), h.to(dtype), True)[2]
        torch.set_num_threads(max(2, threads))
        several = gelu_op(grad.to(dtype), h.to(dtype), True)[2]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)


def test_gelu_recompute_backward_non_finite_empty_and_errors():
    if not EXTENSION.loaded:
        pytest.skip("the C++ extension is not built")
    h = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0] + [0.5] * 20)
    out, grad_h, _ = gelu_op(torch.ones_like(h), h)
    assert out[0].isnan() and out[2].isnan()  # NaN stays; gelu(-inf) = -inf * 0, as in ATen
    assert out[1] == float("inf")  # as float64 ATen (float32 ATen's vectorised erf gives NaN)
    assert grad_h[:3].isnan().all()  # inf * pdf(inf) = inf * 0, as ATen's gelu_backward
    assert out[3:].isfinite().all() and grad_h[3:].isfinite().all()  # nothing leaks to other elements
    empty = gelu_op(torch.empty(0, 4), torch.empty(0, 4))
    assert empty[0].shape == (0, 4)
    with pytest.raises(RuntimeError, match=r"gelu_recompute_backward: grad_out must have shape \[4\], got \[5\]"):
        gelu_op(torch.ones(5), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"gelu_recompute_backward: grad_out must be float32 \(like h\), got bfloat16"):
        gelu_op(torch.ones(4).bfloat16(), torch.ones(4))
    sums = gelu_op(torch.ones(2, 4), torch.tensor([[float("nan"), 1.0, 2.0, 3.0]] * 2), True)[2]
    assert sums[0].isnan() and sums[1:].isfinite().all()  # a NaN stays in its column
    assert torch.equal(gelu_op(torch.empty(0, 4), torch.empty(0, 4), True)[2], torch.zeros(4))
    with pytest.raises(RuntimeError, match=r"gelu_recompute_backward: bias_grad needs h with at least one dim"):
        gelu_op(torch.ones(()), torch.ones(()), True)
    with pytest.raises(RuntimeError, match=r"gelu_recompute_backward_: grad_out must be contiguous"):
        torch.ops.hiera_kernels.gelu_recompute_backward_(torch.ones(4, 6).t(), torch.ones(6, 4))
    shared = torch.ones(6, 4)
    with pytest.raises(RuntimeError, match="unsupported operation"):  # ATen's overlap check: h must not be overwritten
        torch.ops.hiera_kernels.gelu_recompute_backward_(shared, shared)
    torch.library.opcheck(gelu_op, (torch.randn(3, 7), torch.randn(3, 7)))
    torch.library.opcheck(gelu_op, (torch.randn(3, 7), torch.randn(3, 7), True))
    torch._dynamo.reset()
    compiled = torch.compile(lambda g, h: gelu_op(g, h)[1].sum(), fullgraph=True)
    g, h = torch.randn(64), torch.randn(64)
    torch.testing.assert_close(compiled(g, h), gelu_op(g, h)[1].sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_grad", [False, True])
def test_gelu_recompute_backward_in_place_gives_the_same_bits(dtype, bias_grad):
    """gelu_recompute_backward_ writes grad_h over grad_out (the MLP backward's temporary):
    the same gelu(h), grad_h and bias gradient bits as the functional op; opcheck and
    compile (its schema says it mutates grad_out)."""
    if not EXTENSION.loaded:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(3)
    h, grad = (torch.randn(37, 300, generator=g) * 3).to(dtype), torch.randn(37, 300, generator=g).to(dtype)
    out, grad_h, grad_bias = gelu_op(grad, h, bias_grad)
    grad_out = grad.clone()
    in_place_out, in_place_bias = torch.ops.hiera_kernels.gelu_recompute_backward_(grad_out, h, bias_grad)
    assert torch.equal(in_place_out, out) and torch.equal(grad_out, grad_h) and torch.equal(in_place_bias, grad_bias)
    torch.library.opcheck(torch.ops.hiera_kernels.gelu_recompute_backward_.default, (grad.clone(), h, bias_grad))
    torch._dynamo.reset()

    def step(g, h):
        g = g.clone()
        a, _ = torch.ops.hiera_kernels.gelu_recompute_backward_(g, h, bias_grad)
        return a, g

    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(grad, h), (out, grad_h)):
        assert torch.equal(got, want)


# ------------------------------------------------------------ layer_norm_attention
def attention_block(dim=48, heads=2, window_size=4, use_mask_unit_attn=True, dtype=torch.float32, affine=True, bias=True):
    """The drop-in block's norm1 and attention (no query pooling), weights far from their defaults."""
    from hiera_kernels.models.hiera import MaskUnitAttention
    norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)
    attn = MaskUnitAttention(dim, dim, heads, 1, window_size, use_mask_unit_attn)
    if not bias:
        attn.qkv.bias, attn.proj.bias = None, None
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_(1.0 if p is norm.weight else 0.0, 0.5)
        for m in (attn.qkv, attn.proj):
            m.weight.normal_(0, m.in_features**-0.5)
            if m.bias is not None:
                m.bias.normal_(0, 0.5)
    return norm.to(dtype), attn.to(dtype)


def attention_branch(fused, norm, attn, x):
    """The block's attention branch with its skip connection: the op, or the plain path
    (the drop-in modules on "torch")."""
    if fused:
        return recompute.layer_norm_attention(norm, attn, x)
    return attn.set_backend("torch")(norm(x), residual=x)


def attention_grads(fused, mods, x, wanted=None, seed=1):
    """(out, gradients of x and the parameters, or of ``wanted`` by name)."""
    norm, attn = (copy.deepcopy(m) for m in mods)
    leaves = {"x": x.detach().clone(), **{f"norm.{n}": p for n, p in norm.named_parameters()},
              **{n: p for n, p in attn.named_parameters()}}
    wanted = list(leaves) if wanted is None else wanted
    for name, t in leaves.items():
        t.requires_grad_(name in wanted)
    out = attention_branch(fused, norm, attn, leaves["x"])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, [leaves[w] for w in wanted], grad)], ["out", *wanted]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_mask_unit_attn", [True, False])  # 8 windows of 4 tokens; global
def test_layer_norm_attention_passes_the_rule(dtype, use_mask_unit_attn):
    mods = attention_block(use_mask_unit_attn=use_mask_unit_attn)
    x = torch.randn(3, 32, 48)
    reference, names = attention_grads(False, [m.double() for m in copy.deepcopy(mods)], x.double())
    torch_path, _ = attention_grads(False, [copy.deepcopy(m).to(dtype) for m in mods], x.to(dtype))
    ours, _ = attention_grads(True, [copy.deepcopy(m).to(dtype) for m in mods], x.to(dtype))
    for name, r, t, o in zip(names, reference, torch_path, ours):
        verdict = error_rule.judge(o, t, r)
        assert verdict.passed, f"{name}: {verdict.describe()}"


@pytest.mark.parametrize("wanted", [["x"], ["proj.bias"], ["x", "proj.bias"], ["qkv.weight"], ["norm.weight", "qkv.bias"],
                                    ["proj.weight"]])
def test_layer_norm_attention_any_subset_of_gradients(wanted):
    """x alone (proj's bias from nothing), proj's bias alone (no skip gradient to sum it
    from), a weight alone: the plain path's gradients by the rule against float64."""
    mods = attention_block(dtype=torch.float32)
    x = torch.randn(2, 32, 48)
    reference, _ = attention_grads(False, [m.double() for m in copy.deepcopy(mods)], x.double(), wanted)
    torch_path, _ = attention_grads(False, mods, x, wanted)
    ours, _ = attention_grads(True, mods, x, wanted)
    for name, r, t, o in zip(["out", *wanted], reference, torch_path, ours):
        verdict = error_rule.judge(o, t, r)
        assert verdict.passed, f"{name}: {verdict.describe()}"


@pytest.mark.parametrize("affine_and_bias", [True, False])
def test_layer_norm_attention_opcheck_and_float64_gradcheck(affine_and_bias):
    op = torch.ops.hiera_kernels.layer_norm_attention.default
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        norm, attn = attention_block(dim=8, heads=2, window_size=2, dtype=dtype, affine=affine_and_bias, bias=affine_and_bias)
        x = torch.randn(2, 4, 8, dtype=dtype, requires_grad=True)
        args = (x, norm.weight, norm.bias, norm.eps, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 2, 2)
        if dtype == torch.float64:
            assert torch.autograd.gradcheck(lambda *a: op(*a)[0], args)
        else:
            torch.library.opcheck(op, args)


def test_layer_norm_attention_backward_runs_one_layer_norm_pass():
    """The backward's LayerNorm work is one layer_norm_backward call (y recomputed in it,
    the skip gradient added in it: no separate LayerNorm, add or proj bias sum)."""
    norm, attn = attention_block(dtype=torch.bfloat16)
    x = torch.randn(2, 32, 48, dtype=torch.bfloat16, requires_grad=True)
    out = recompute.layer_norm_attention(norm, attn, x)
    from torch.profiler import profile
    with profile() as prof:
        out.backward(torch.randn(out.shape, dtype=out.dtype))
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("hiera_kernels::layer_norm_backward") == 1 and calls.get("hiera_kernels::mask_unit_attention_backward") == 1
    assert calls.get("aten::sum") == 1  # qkv's bias gradient only
    assert "hiera_kernels::layer_norm" not in calls and "aten::add_" not in calls and "aten::add" not in calls, sorted(calls)


def test_drop_in_model_runs_the_attention_branch_as_one_op():
    """In training on "cpu": every block but a stage's first (dim or q_stride changes) runs
    layer_norm_attention; on "torch" none does, nor a block whose stochastic depth may drop
    the branch (all but the first, whose rate is 0)."""
    model = hk.hiera_tiny_224(input_size=(64, 64), num_classes=10)
    x = torch.randn(2, 3, 64, 64)

    def expected(model):
        return sum(b.dim == b.dim_out and b.attn.q_stride == 1 and isinstance(b.drop_path, nn.Identity) for b in model.blocks)

    from torch.profiler import profile

    def calls(model):
        with profile() as prof:
            model(x).sum().backward()
        return sum(e.count for e in prof.key_averages() if e.key == "hiera_kernels::layer_norm_attention")

    assert 0 < expected(model) < len(model.blocks)
    assert calls(model.set_backend("cpu").train()) == expected(model)
    assert calls(model.set_backend("torch")) == 0
    dropping = hk.hiera_tiny_224(input_size=(64, 64), num_classes=10, drop_path_rate=0.1).set_backend("cpu").train()
    assert calls(dropping) == expected(dropping) < expected(model)


@pytest.mark.parametrize("kind", ["layer_norm_linear", "layer_norm_mlp+residual", "layer_norm_attention"])
def test_ops_compile_fullgraph(kind):
    """Each recompute op traces whole under torch.compile(fullgraph=True), its gradients
    through its backward, equal to eager's."""
    if kind == "layer_norm_attention":
        norm, attn = attention_block(dim=8, heads=2, window_size=2)
        x = torch.randn(2, 4, 8, requires_grad=True)
        args = (x, norm.weight, norm.bias, norm.eps, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 2, 2)
    else:
        args = op_args(kind)
    op = getattr(torch.ops.hiera_kernels, kind.split("+")[0]).default

    def loss(*a):
        return op(*a)[0].square().sum()

    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    want = torch.autograd.grad(loss(*args), leaves)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*args), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_layer_norm_attention_where_the_block_keeps_its_own_path():
    """The fused branch checks the geometry as ops.mask_unit_attention does (a block whose
    tokens are not whole windows raises the same ValueError), and leaves the three-op path
    to an attention on another backend than its block, a subclass of the attention, and
    refuses create_graph (the attention's backward is not differentiable)."""
    from hiera_kernels.models.hiera import HieraBlock, MaskUnitAttention
    from torch.profiler import profile

    def fused_calls(block, x):
        with profile() as prof:
            block(x).sum().backward()
        return sum(e.count for e in prof.key_averages() if e.key == "hiera_kernels::layer_norm_attention")

    x = torch.randn(2, 32, 16, requires_grad=True)
    block = HieraBlock(16, 16, 2, window_size=8, use_mask_unit_attn=True).set_backend("cpu").train()
    assert fused_calls(block, x) == 1
    with pytest.raises(ValueError, match=r"mask_unit_attention: N=36 is not a whole number of windows of q_stride \* window_size = 1 \* 8"):
        block(torch.randn(2, 36, 16, requires_grad=True))
    block.attn.set_backend("torch")  # the attention's own choice stands
    assert fused_calls(block, x) == 0

    class Scaled(MaskUnitAttention):
        def attention(self, qkv):
            return 2 * super().attention(qkv)

    subclassed = HieraBlock(16, 16, 2, window_size=8, use_mask_unit_attn=True)
    subclassed.attn.__class__ = Scaled
    subclassed.set_backend("cpu").train()
    assert fused_calls(subclassed, x) == 0

    norm, attn = attention_block(dim=16, heads=2, window_size=8)
    out = recompute.layer_norm_attention(norm, attn, x)
    with pytest.raises(RuntimeError, match="layer_norm_attention: double backward .* is not supported"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
