"""Linear epilogues in the GEMM (hiera_kernels.epilogues): where they run, what they
compute (the shared error rule against float64), the packed-weight cache, the probe."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hiera_kernels as hk
from hiera_kernels import epilogues, error_rule

pytestmark = pytest.mark.skipif(epilogues.UNAVAILABLE is not None, reason=f"fused path unavailable: {epilogues.UNAVAILABLE}")

DTYPES = [torch.float32, torch.bfloat16]
ACTS = {"none": lambda y: y, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}


def linear(in_features=96, out_features=288, backend="cpu", dtype=torch.float32):
    m = epilogues.Linear(in_features, out_features).to(dtype)
    nn.init.normal_(m.bias, std=0.5)  # a bias large enough that a dropped or doubled bias shows
    m.backend = backend
    return m


def plain(m, x, activation):
    """The "torch" path in x's dtype: F.linear, then the activation, rounded in between."""
    return ACTS[activation](F.linear(x, m.weight.to(x.dtype), m.bias.to(x.dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ACTS))
def test_fused_linear_passes_the_error_rule(dtype, activation):
    m = linear(dtype=dtype)
    x = torch.randn(2, 200, 96).to(dtype)  # [B, N, C] as in the model; 200 rows: not a multiple of any block
    with torch.no_grad():
        assert m.fuses(x)
        fused = m(x, activation)
        assert epilogues.is_packed(m)  # it took the fused path
        reference = ACTS[activation](F.linear(x.double(), m.weight.double(), m.bias.double()))
        verdict = error_rule.judge(fused, plain(m, x, activation), reference)
    assert fused.dtype == dtype and verdict.passed, verdict.describe()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_residual_add_passes_the_error_rule(dtype):
    m = linear(dtype=dtype)
    x, skip = torch.randn(2, 200, 96).to(dtype), torch.randn(2, 200, 288).to(dtype)
    with torch.no_grad():
        assert m.fuses(x, skip)
        fused = m(x, residual=skip)
        reference = F.linear(x.double(), m.weight.double(), m.bias.double()) + skip.double()
        verdict = error_rule.judge(fused, skip + plain(m, x, "none"), reference)
    assert epilogues.is_packed(m) and verdict.passed, verdict.describe()
    with pytest.raises(ValueError, match="a residual goes with activation 'none', got 'gelu'"):
        m(x, "gelu", residual=skip)
    assert not m.fuses(x, skip.requires_grad_())  # the skip connection needs a gradient: autograd's path
    assert not m.fuses(x, skip.detach().double())


def test_packed_weight_follows_in_place_updates_and_dtype_changes():
    m = linear()
    x = torch.randn(3, 17, 96)
    with torch.no_grad():
        first = m(x)
        packed = epilogues._PACKED[m][2]
        m(x)
        assert epilogues._PACKED[m][2] is packed  # packed once, reused
        m.weight.mul_(-2)  # in place: same pointer, new version
        torch.testing.assert_close(m(x), plain(m, x, "none"), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(m(x), first)
        m.bias.add_(1)  # the bias is read on every call
        torch.testing.assert_close(m(x), plain(m, x, "none"), atol=1e-5, rtol=1e-5)
        m.weight.data = torch.randn(288, 96)  # a new tensor under the same Parameter
        torch.testing.assert_close(m(x), plain(m, x, "none"), atol=1e-5, rtol=1e-5)
        m.load_state_dict(linear().state_dict())
        torch.testing.assert_close(m(x), plain(m, x, "none"), atol=1e-5, rtol=1e-5)
        m.to(torch.bfloat16)
        assert not epilogues.is_packed(m)
        xb = x.bfloat16()
        out = m(xb)
        assert out.dtype == torch.bfloat16 and epilogues._PACKED[m][2].dtype == torch.bfloat16
        verdict = error_rule.judge(out, plain(m, xb, "none"), F.linear(x.double(), m.weight.double(), m.bias.double()))
        assert verdict.passed, verdict.describe()
    assert set(m.state_dict()) == {"weight", "bias"}  # the cache is no parameter or buffer
    clone = copy.deepcopy(m)  # the opaque oneDNN tensor is not copied but rebuilt on use
    assert not epilogues.is_packed(clone)


def test_plain_path_where_fusing_is_not_valid():
    x = torch.randn(2, 5, 96)
    for m, inputs in [
        (linear(backend="torch"), x),  # the oracle never fuses
        (linear(backend="cuda"), x),
        (linear(dtype=torch.float64), x.double()),  # oneDNN has no float64 GEMM
        (linear(dtype=torch.float16), x.half()),
    ]:
        with torch.no_grad():
            assert not m.fuses(inputs)
            torch.testing.assert_close(m(inputs, "gelu"), plain(m, inputs, "gelu"), atol=0, rtol=0)
        assert not epilogues.is_packed(m)
    m = linear()
    assert not m.fuses(x)  # grad enabled and the weight requires grad: training keeps autograd's path
    y = m(x, "gelu")
    y.sum().backward()
    assert m.weight.grad is not None and not epilogues.is_packed(m)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype rules stay F.linear's
        assert not m.fuses(x)
        assert m(x).dtype == torch.bfloat16
    with hk.use_backend("torch"):  # backend None follows the global default
        m.backend = None
        with torch.no_grad():
            assert not m.fuses(x)
    with torch.no_grad(), pytest.raises(ValueError, match="activation must be one of none, gelu, gelu_tanh, got 'relu'"):
        m(x, "relu")


def test_run_in_chunks_splits_evenly_within_the_bound():
    """Chunks as even as they come: the largest is ceil(items / chunks), never more (9
    images in 4 chunks: 2, 2, 2, 3, not 3, 3, 3)."""
    sizes = []
    out = epilogues.run_in_chunks(lambda part: sizes.append(part.stop - part.start) or torch.full((part.stop - part.start,), len(sizes)),
                                  9, 4, torch.zeros(9))
    assert sizes == [2, 2, 2, 3] and out.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 4]


def test_chunk_count_bounds_the_intermediate():
    fp32_hidden = 25088 * 384 * 4  # Hiera-B/224 stage-1 MLP at batch 8: 36.75 MiB
    assert epilogues.chunk_count(25088, 384, torch.float32) == -(-fp32_hidden // epilogues.CHUNK_BYTES) == 7
    assert epilogues.chunk_count(25088, 384, torch.bfloat16) == 4
    assert epilogues.chunk_count(1568, 1536, torch.bfloat16) == 1  # stage 3, 4.6 MiB: whole
    assert epilogues.chunk_count(1568, 1536, torch.float32) == 2  # 9.2 MiB
    assert epilogues.chunk_count(8, 3136 * 576, torch.float32) == 8  # the first pooled block's qkv, 55 MiB: an image each
    assert epilogues.chunk_count(0, 384, torch.float32) == 1 and epilogues.chunk_count(3, 1 << 30, torch.float32) == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_fused_mlp_in_chunks_passes_the_error_rule(monkeypatch, dtype, residual):
    """fc2(gelu(fc1(x))) (+ residual) in chunks of rows: 4-D input (SAM 2's maps), 2 x 7 x
    10 = 140 rows in 6 uneven chunks (23 or 24 rows; the bound is 24); the chunked and the
    whole-at-once fused paths each against the "torch" path and float64 by the shared rule."""
    fc1, fc2 = linear(40, 160, dtype=dtype), linear(160, 40, dtype=dtype)
    x, skip = torch.randn(2, 7, 10, 40).to(dtype), torch.randn(2, 7, 10, 40).to(dtype)
    skip = skip if residual else None
    monkeypatch.setattr(epilogues, "CHUNK_BYTES", 24 * 160 * x.element_size())
    assert epilogues.chunk_count(140, 160, dtype) == 6
    with torch.no_grad():
        assert fc1.fuses(x) and fc2.fuses(x, skip)
        chunked = epilogues.fused_mlp(fc1, "gelu", fc2, x, skip)
        monkeypatch.setattr(epilogues, "CHUNK_BYTES", 1 << 40)
        whole = epilogues.fused_mlp(fc1, "gelu", fc2, x, skip)
        torch_path = plain(fc2, plain(fc1, x, "gelu"), "none") + (0 if skip is None else skip)
        reference = F.linear(F.gelu(F.linear(x.double(), fc1.weight.double(), fc1.bias.double())),
                             fc2.weight.double(), fc2.bias.double()) + (0 if skip is None else skip.double())
    assert chunked.shape == x.shape and chunked.dtype == dtype
    for got in (chunked, whole):
        verdict = error_rule.judge(got, torch_path, reference)
        assert verdict.passed, verdict.describe()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_whole_model_inference_passes_the_error_rule(dtype, backend):
    model = hk.hiera_tiny_224(num_classes=10).train()  # logits: the eval softmax would hide errors
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = copy.deepcopy(model).double().set_backend("torch")(x.double())
        model.to(dtype)
        torch_path = model.set_backend("torch")(x.to(dtype))
        fused = model.set_backend(backend)(x.to(dtype))
    linears = [m for m in model.modules() if isinstance(m, epilogues.Linear)]
    assert len(linears) == 12 * 4 + 3 + 1 and all(epilogues.is_packed(m) for m in linears)  # 12 blocks x 4, 3 transition projs, the head: all fused
    verdict = error_rule.judge(fused, torch_path, reference)
    assert verdict.passed, verdict.describe()


def test_whole_model_runs_its_mlps_and_attentions_in_chunks(monkeypatch):
    """With a 1 MiB chunk bound, the drop-in model's MLPs run in chunks of rows (stage 1 of
    Hiera-T at batch 2: 6272 rows x 384 x 4 bytes = 9.2 MiB, 10 chunks) and its
    attentions in chunks of images (every qkv over 1 MiB: one image a chunk), and the
    logits still pass the rule."""
    model = hk.hiera_tiny_224(num_classes=10).train()
    x = torch.randn(2, 3, 224, 224)
    counts = []
    original = epilogues.chunk_count
    monkeypatch.setattr(epilogues, "CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(epilogues, "chunk_count", lambda *a: counts.append((a[0], original(*a))) or counts[-1][1])
    with torch.no_grad():
        reference = copy.deepcopy(model).double().set_backend("torch")(x.double())
        torch_path = model.set_backend("torch")(x)
        fused = model.set_backend("auto")(x)
    mlps, attentions = counts[1::2], counts[0::2]  # each block: attention, then MLP
    assert len(mlps) == len(attentions) == 12 and mlps[0] == (6272, 10)
    assert all(images == 2 and chunks == 2 for images, chunks in attentions[:3])  # stages 1-2: 2 chunks of one image
    verdict = error_rule.judge(fused, torch_path, reference)
    assert verdict.passed, verdict.describe()


def test_state_dict_keys_are_the_official_ones():
    from helpers import official

    ours, theirs = hk.hiera_tiny_224(), official.hiera_tiny_224()
    with torch.no_grad():
        ours(torch.randn(1, 3, 224, 224))  # fills the caches
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_compiled_inference_bypasses_the_fused_path():
    """Under torch.compile the plain ops are traced (no graph break); eager runs fuse."""
    model = hk.hiera_tiny_224(num_classes=10, backend="auto").train()
    x = torch.randn(1, 3, 224, 224)
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        got = compiled(x)
        assert not any(epilogues.is_packed(m) for m in model.modules() if isinstance(m, epilogues.Linear))
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-4)


def test_unavailable_says_why_and_runs_the_plain_path(monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    reason = epilogues._probe()
    assert reason == "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    monkeypatch.setattr(epilogues, "UNAVAILABLE", reason)
    m = linear()
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        assert not m.fuses(x)
        torch.testing.assert_close(m(x, "gelu"), plain(m, x, "gelu"), atol=0, rtol=0)
    from hiera_kernels.tools.info import info

    info()
    assert f"unavailable, plain F.linear instead: {reason}" in capsys.readouterr().out


# ------------------------------------------------ training: linear_residual, linear_in_epilogue
@pytest.mark.parametrize("dtype", epilogues.TRAINING_DTYPES)
def test_training_linear_with_residual_passes_the_error_rule(dtype):
    """Training on "cpu"/"auto": Linear(x, residual=skip) runs hiera_kernels::linear_residual
    (bias and skip connection in the GEMM's epilogue, the weight as it is): output and every
    gradient by the rule against the "torch" path and float64."""
    m = linear(dtype=dtype)
    x, skip, grad = torch.randn(2, 200, 96), torch.randn(2, 200, 288), torch.randn(2, 200, 288)

    def run(backend, dt):
        mod = copy.deepcopy(m).to(dt)
        mod.backend = backend
        xs, ss = x.to(dt).detach().requires_grad_(), skip.to(dt).detach().requires_grad_()
        out = mod(xs, residual=ss)
        out.backward(grad.to(dt))
        return [out.detach(), xs.grad, ss.grad, mod.weight.grad, mod.bias.grad]

    mod, xd, sd = copy.deepcopy(m).to(dtype), x.to(dtype), skip.to(dtype)
    assert epilogues.fuses_in_training(mod, xd, sd, "cpu") and not epilogues.fuses_in_training(mod, xd, sd, "torch")
    for name, o, t, r in zip(["out", "x", "residual", "weight", "bias"], run("cpu", dtype), run("torch", dtype),
                             run("torch", torch.float64)):
        verdict = error_rule.judge(o, t, r)
        assert verdict.passed, f"{name}: {verdict.describe()}"


def test_linear_residual_op_checks_and_compiles():
    op = torch.ops.hiera_kernels.linear_residual.default
    x, w, b, r = torch.randn(2, 5, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True), torch.randn(2, 5, 6, requires_grad=True)
    for dtype in (torch.float32, torch.bfloat16):  # bfloat16: the oneDNN path (TRAINING_DTYPES)
        args = tuple(t.detach().to(dtype).requires_grad_() for t in (x, w, b, r))
        torch.library.opcheck(op, args)
        torch.library.opcheck(op, (args[0], args[1], None, args[3]))
    args = tuple(t.double().detach().requires_grad_() for t in (x, w, b, r))
    assert torch.autograd.gradcheck(op, args) and torch.autograd.gradgradcheck(op, args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a).sum(), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b, r), op(x, w, b, r).sum())


def test_training_keeps_the_plain_path_where_the_op_does_not_apply():
    m = linear(dtype=torch.bfloat16)
    x, skip = torch.randn(2, 5, 96, dtype=torch.bfloat16), torch.randn(2, 5, 288, dtype=torch.bfloat16)
    assert epilogues.fuses_in_training(m, x, skip, "cpu")
    assert not epilogues.fuses_in_training(copy.deepcopy(m).float(), x.float(), skip.float(), "cpu")  # float32: ATen's GEMM
    assert not epilogues.fuses_in_training(m, x, skip.float(), "cpu")  # a residual of another dtype
    assert not epilogues.fuses_in_training(m, x, skip[0, 0], "cpu")  # a residual that broadcasts
    assert not epilogues.fuses_in_training(m, x, skip.transpose(0, 1).contiguous().transpose(0, 1), "cpu")  # strided
    with torch.no_grad():
        assert not epilogues.fuses_in_training(m, x, skip, "cpu")  # inference: the packed path instead
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not epilogues.fuses_in_training(m, x, skip, "cpu")


@pytest.mark.parametrize("skip_shape", [(288,), (2, 5, 288)])
def test_training_linear_with_a_mixed_or_broadcast_residual_runs_the_plain_path(skip_shape):
    """A bfloat16 Linear with a float32 or broadcast residual: the plain sum (promoted to
    float32 or broadcast, as autograd's path gives), and a backward that runs."""
    m = linear(dtype=torch.bfloat16)
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16, requires_grad=True)
    skip = torch.randn(skip_shape, requires_grad=True)
    out = m(x, residual=skip)
    want = skip + F.linear(x, m.weight, m.bias)
    assert out.dtype == want.dtype and torch.equal(out, want)
    out.sum().backward()
    assert x.grad is not None and skip.grad is not None and m.weight.grad is not None
