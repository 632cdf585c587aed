"""EcoFormer attention (DESIGN §3) and its hash learning (DESIGN §4): formula, hash fit, callback, conversion."""
from __future__ import annotations

import copy
import logging
import math
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import models
from attention import ecoformer
from attention.ecoformer import EcoFormerAttention, _LinearAttention, attention_bias
from attention.softmax import SoftmaxAttention
from hashing import (HashLearningCallback, KernelizedHash, attention_targets, code_loss, fit_hash,
                     neighbour_agreement, sign_ste)
from hashing import kernel_hash
from hashing.kernel_hash import hash_kernels
from helpers import built_kernels

torch.set_num_threads(1)

TINY = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2),
            num_classes=10)
FAST_FIT = dict(pairs=2, steps=5, max_tokens=32, batch_size=2)


# helpers --------------------------------------------------------------------------------------------------------
def tiny_model(seed: int = 0, attn: str = "ecoformer", **attn_kwargs) -> models.PVTv2:
    torch.manual_seed(seed)
    if attn == "ecoformer":
        attn_kwargs = dict(dict(bits=8, anchors=6), **attn_kwargs)
    return models.PVTv2(attn=attn, attn_kwargs=attn_kwargs, **TINY)


def hash_state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if ".hash." in k}


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def clustered_units(images: int = 8, tokens: int = 128, dim: int = 32, heads: int = 2, clusters: int = 8,
                    noise: float = 1.0, seed: int = 0) -> torch.Tensor:
    """(images, tokens, heads, dim) unit vectors around ``clusters`` random centres per image."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(images, heads, clusters, dim, generator=g), dim=-1)
    assign = torch.randint(0, clusters, (images, heads, tokens), generator=g)
    x = centres.gather(2, assign[..., None].expand(-1, -1, -1, dim))
    x = x + noise * torch.randn(x.shape, generator=g) / dim ** 0.5
    return F.normalize(x, dim=-1).transpose(1, 2).contiguous()


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# the attention --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [1, 3])
def test_linear_attention_equals_explicit_weighted_sum(heads):
    attn = EcoFormerAttention(16 * heads, heads, bits=8, anchors=5).double().eval()
    x = torch.randn(2, 30, 16 * heads, dtype=torch.float64)
    captured = {}
    attn.hash.register_forward_hook(lambda module, args, out: captured.update(codes=out))
    out = attn(x, (5, 6))

    codes = captured["codes"].double()  # (B, N, H, b)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    weights = torch.einsum("bnhk,bmhk->bhnm", codes, codes) + attn.beta  # w_nj ∝ h_n·h_j + β
    assert (weights > 0).all()
    weights = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]), rtol=0, atol=1e-12)
    values = attn.v(x).view(2, 30, heads, 16)
    expected = attn.proj(torch.einsum("bhnm,bmhd->bnhd", weights, values).reshape(2, 30, -1))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("heads", [1, 3])
def test_authors_formula_equals_their_explicit_sum(heads):
    """formula=authors: out_n = (Σ_j (h_n·h_j) v_j + β' v_n) / (Σ_j h_n·h_j + β' N), β' = b + 1, with the kernel
    bandwidth of every image and head recomputed from its own tokens."""
    torch.manual_seed(0)
    attn = EcoFormerAttention(16 * heads, heads, bits=8, anchors=5, formula="authors").double().eval()
    assert attn.beta == 9
    x = torch.randn(2, 30, 16 * heads, dtype=torch.float64)
    captured = {}
    attn.hash.register_forward_hook(lambda module, args, out: captured.update(codes=out, z=args[0]))
    out = attn(x, (5, 6))

    u = F.normalize(captured["z"].double(), dim=-1)  # (B, N, H, d)
    sq_dist = (u[..., None, :] - attn.hash.anchors.double()).square().sum(-1)  # (B, N, H, m)
    sigma = sq_dist.mean((1, 3), keepdim=True)  # per image and head
    kernel = torch.exp(-sq_dist / (2 * sigma)) - attn.hash.kernel_mean.double()
    y = torch.einsum("hkm,bnhm->bnhk", attn.hash.projection.double(), kernel)
    codes = captured["codes"].double()
    confident = y.abs() > 1e-4  # the hash runs in float32
    assert torch.equal(codes[confident], torch.sign(y)[confident])
    similarity = torch.einsum("bnhk,bmhk->bhnm", codes, codes)
    values = attn.v(x).view(2, 30, heads, 16)
    numerator = torch.einsum("bhnm,bmhd->bnhd", similarity, values) + attn.beta * values
    denominator = similarity.sum(-1).transpose(1, 2)[..., None] + attn.beta * 30
    expected = attn.proj((numerator / denominator).reshape(2, 30, -1))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_per_input_bandwidth_fit_lowers_the_loss():
    units = clustered_units(images=4, tokens=64, heads=2, dim=16)
    hash_fn = KernelizedHash(2, 16, bits=8, anchors=6, bandwidth="per_input")
    stats = fit_hash(hash_fn, units, pairs=4, steps=30, generator=torch.Generator().manual_seed(0))
    assert stats.loss_after < stats.loss_before and stats.heads_updated >= 1
    assert 0.5 <= stats.ste_share_after <= 1.0


def test_weights_sum_to_one_constant_values_pass_through():
    attn = EcoFormerAttention(32, 2, bits=16).eval()
    with torch.no_grad():
        attn.v.weight.zero_()
        attn.v.bias.copy_(torch.linspace(-3, 3, 32))
    out = attn(torch.randn(2, 49, 32), (7, 7))
    torch.testing.assert_close(out, attn.proj(attn.v.bias).expand_as(out), rtol=1e-5, atol=1e-5)


def test_beta_is_smallest_power_of_two_above_bits():
    assert [attention_bias(b) for b in (1, 2, 3, 7, 8, 15, 16, 31, 64)] == [2, 4, 4, 8, 16, 16, 32, 32, 128]


def test_hash_matches_kernel_definition():
    torch.manual_seed(0)
    hash_fn = KernelizedHash(3, 8, bits=12, anchors=7)
    hash_fn.bandwidth.copy_(torch.tensor([0.5, 1.0, 2.0]))
    hash_fn.anchors.mul_(torch.rand(3, 7, 1) + 0.5)  # not unit: the general ‖u − a‖² expansion is used
    z = torch.randn(4, 10, 3, 8) * 3
    u = F.normalize(z, dim=-1)
    kernel = torch.exp(-(u[..., None, :] - hash_fn.anchors).square().sum(-1) / (2 * hash_fn.bandwidth[:, None]))
    y = torch.einsum("hkm,bnhm->bnhk", hash_fn.projection, kernel - hash_fn.kernel_mean)
    torch.testing.assert_close(hash_fn.project(z), y, rtol=1e-5, atol=1e-5)
    confident = y.abs() > 1e-4
    assert torch.equal(hash_fn(z)[confident], torch.sign(y)[confident])


def _reference_forward(attn: EcoFormerAttention, x: torch.Tensor) -> torch.Tensor:
    """EcoFormer's forward before the fast path, for float64 autograd: explicit distances ‖u − a‖², per-head or
    per-input bandwidth, the straight-through sign, attention by einsum (S = Σ_j h_j v_jᵀ, z = Σ_j h_j)."""
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    hash_fn = attn.hash
    z = attn.qk(x).view(B, N, H, d)
    u = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sq_dist = (u[..., None, :] - hash_fn.anchors).square().sum(-1)  # (B, N, H, m)
    sigma = sq_dist.mean((1, 3), keepdim=True) if attn.formula == "authors" else hash_fn.bandwidth[:, None]
    kernel = torch.exp(-sq_dist / (2 * sigma))
    codes = sign_ste(torch.einsum("hkm,bnhm->bnhk", hash_fn.projection, kernel - hash_fn.kernel_mean))
    v = attn.v(x).view(B, N, H, d)
    summary = torch.einsum("bnhk,bnhd->bhkd", codes, v)
    own = v if attn.formula == "authors" else v.sum(1, keepdim=True)
    numerator = torch.einsum("bnhk,bhkd->bnhd", codes, summary) + attn.beta * own
    denominator = torch.einsum("bnhk,bhk->bnh", codes, codes.sum(1))[..., None] + attn.beta * N
    return attn.proj((numerator / denominator).reshape(B, N, C))


@pytest.mark.parametrize("formula", ["paper", "authors"])
@pytest.mark.parametrize("heads", [1, 3])
def test_fast_path_matches_the_reference_formula_in_float64(formula, heads):
    """Outputs (training and inference) and every gradient (input, qk, v, proj) to 1e-10 of _reference_forward:
    the hand-written backwards of the kernel projection and of the linear attention are the formula's."""
    torch.manual_seed(0)
    attn = EcoFormerAttention(8 * heads, heads, bits=8, anchors=6, formula=formula).double().train()
    with torch.no_grad():  # a fitted-looking hash: anchors off the sphere, per-head bandwidths, larger y
        attn.hash.anchors.mul_(torch.rand(heads, 6, 1, dtype=torch.float64) + 0.5)
        attn.hash.bandwidth.uniform_(0.5, 2.0)
        attn.hash.projection.mul_(3)
    ref = copy.deepcopy(attn)
    x = torch.randn(2, 35, 8 * heads, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = attn(x, (5, 7)), _reference_forward(ref, x_ref)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=0)
    ref_params = dict(ref.named_parameters())
    for name, param in attn.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, atol=1e-10, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(attn.eval()(x, (5, 7)), expected, atol=1e-10, rtol=0)


def test_fused_kernels_build():
    assert hash_kernels() is not None, "the fused hash kernel failed to build (see the warning in the log)"
    assert ecoformer.attention_kernels() is not None, "the fused attention failed to build (see the warning)"


@pytest.fixture
def fused_hash():
    return built_kernels(hash_kernels, "the fused hash kernel")


@pytest.mark.parametrize("bandwidth", ["fixed", "per_input"])
@pytest.mark.parametrize("heads, head_dim, bits, anchors", [(1, 32, 16, 25), (3, 13, 7, 9), (2, 64, 64, 64),
                                                            (5, 8, 1, 2)])
def test_fused_hash_equals_the_float64_reference(fused_hash, bandwidth, heads, head_dim, bits, anchors):
    """The fused C++ codes (float32, no gradient) equal sign(project(z)) in float64 wherever |y| > 1e-4, for z read
    in place from a Linear's (B, N, H·d) output, odd token counts (a short last tile), zero tokens, both bandwidths,
    anchor and bit counts off the 8-lane vectors and at their 64 limit."""
    torch.manual_seed(0)
    hash_fn = KernelizedHash(heads, head_dim, bits, anchors, bandwidth=bandwidth)
    with torch.no_grad():
        hash_fn.anchors.mul_(torch.rand(heads, anchors, 1) + 0.5)
        hash_fn.bandwidth.uniform_(0.3, 2.0)
        linear = torch.nn.Linear(16, heads * head_dim)
        x = torch.randn(3, 37, 16) * 2
        x[1, 5] = 0.0
        z = linear(x).view(3, 37, heads, head_dim)  # strided heads, not contiguous per head
        z[1, 5] = 0.0
        codes = hash_fn(z)
        y = hash_fn.double().project(z.double())
    assert codes.dtype == torch.float32 and codes.shape == (3, 37, heads, bits)
    confident = y.abs() > 1e-4
    assert confident.float().mean() > 0.99
    assert torch.equal(codes[confident], torch.sign(y)[confident].float())
    assert torch.equal(codes.abs(), torch.ones_like(codes))


@pytest.mark.parametrize("bandwidth", ["fixed", "per_input"])
@pytest.mark.parametrize("heads, head_dim, bits, anchors", [(1, 32, 16, 25), (3, 13, 7, 9), (2, 64, 64, 64),
                                                            (5, 8, 1, 2)])
def test_fused_hash_gradient_equals_the_float64_reference(fused_hash, bandwidth, heads, head_dim, bits, anchors):
    """The fused backward (float32, recomputed from z, the per-input σ's gradient from a first pass) equals the
    straight-through gradient of sign(project(z)) in float64 to 1e-5 of its scale, for z read in place from a
    Linear's (B, N, H·d) output and its gradient written in that layout, a zero token included; tokens with a |y|
    within 1e-4 of the straight-through cut at 1 are left out (float32 may fall on the other side)."""
    torch.manual_seed(0)
    hash_fn = KernelizedHash(heads, head_dim, bits, anchors, bandwidth=bandwidth)
    with torch.no_grad():
        hash_fn.anchors.mul_(torch.rand(heads, anchors, 1) + 0.5)
        hash_fn.bandwidth.uniform_(0.3, 2.0)
    x = torch.randn(3, 37, 16) * 2
    x[1, 5] = 0.0
    linear = torch.nn.Linear(16, heads * head_dim, bias=False)
    z = linear(x).view(3, 37, heads, head_dim)
    weight = torch.randn(3, 37, heads, bits)
    (grad,) = torch.autograd.grad((hash_fn(z) * weight).sum(), z)
    z64 = z.detach().double().requires_grad_()
    y = hash_fn.double().project(z64)
    (expected,) = torch.autograd.grad((sign_ste(y) * weight.double()).sum(), z64)
    kept = ((y.abs() - 1).abs() > 1e-4).all(-1)
    kept[1, 5] = False  # the zero token: r = 1/1e-12, a gradient of order 1e12 (that of F.normalize), compared alone
    assert kept.float().mean() > 0.9
    torch.testing.assert_close(grad.double()[kept], expected[kept], atol=1e-5 * expected[kept].abs().max().item(),
                               rtol=0)
    torch.testing.assert_close(grad.double()[1, 5], expected[1, 5], atol=1e-5 * expected[1, 5].abs().max().item(),
                               rtol=0)


def test_forward_takes_the_fused_hash_on_cpu_below_float64(fused_hash, monkeypatch):
    hash_fn = KernelizedHash(2, 8, bits=4, anchors=3)
    calls = []
    fused = hash_fn.fused_codes
    monkeypatch.setattr(hash_fn, "fused_codes", lambda z: calls.append(z.dtype) or fused(z))
    z = torch.randn(2, 5, 2, 8)
    with torch.no_grad():
        hash_fn(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert hash_fn(z.bfloat16()).dtype == torch.float32
    hash_fn(z.requires_grad_())  # training: the fused forward and backward
    hash_fn.double()(z.double())  # float64: the PyTorch reference
    KernelizedHash(2, 8, bits=4, anchors=3, cpu_kernel=False)(z)
    assert calls == [torch.float32, torch.bfloat16, torch.float32]


def test_fused_hash_op_schema_and_checks(fused_hash):
    hash_fn = KernelizedHash(2, 8, bits=12, anchors=10)
    z = torch.randn(2, 9, 8)
    args = (hash_fn.anchors, hash_fn.projection, hash_fn.kernel_mean, hash_fn.bandwidth[:, None], 1)
    torch.library.opcheck(fused_hash.kernel_hash_codes.default, (z, *args))
    grad = torch.randn(2, 9, 12)
    torch.library.opcheck(fused_hash.kernel_hash_backward.default, (grad, z, *args, False))
    torch.library.opcheck(fused_hash.kernel_hash_backward.default, (grad, torch.randn(2, 9, 16)[..., ::2], *args, False))
    torch.library.opcheck(fused_hash.kernel_hash_backward.default,
                          (grad, z, *args[:3], torch.ones(2, 3), 3, True))
    with pytest.raises(RuntimeError, match="float32"):
        fused_hash.kernel_hash_codes(z.double(), *args)
    with pytest.raises(RuntimeError, match="multiple of images"):
        fused_hash.kernel_hash_codes(z, *args[:3], torch.ones(2, 2), 2)


@pytest.fixture
def fused_attention():
    return built_kernels(ecoformer.attention_kernels, "the fused linear attention")


@pytest.mark.parametrize("formula", ["paper", "authors"])
@pytest.mark.parametrize("heads, head_dim, b, B, N", [(1, 32, 12, 2, 67), (3, 8, 7, 2, 67), (2, 64, 16, 2, 67),
                                                      (1, 40, 13, 1, 600), (2, 16, 64, 1, 9)])
def test_fused_linear_attention_equals_the_float64_reference(fused_attention, formula, heads, head_dim, b, B, N):
    """Values read in place from a Linear's (B, N, H·d) output, a short last block of tokens, bits off the 4-row
    blocks and at their 64 limit, one image and head of 600 tokens (its sums over two token ranges on two threads),
    both formulas: the C++ forward and backward (float32) equal _LinearAttention's in float64, output and the
    gradients of codes and values, to 1e-5 relative to their scale."""
    torch.manual_seed(0)
    beta = float(attention_bias(b, formula))
    codes = torch.randn(heads, B, N, b).sign().requires_grad_()
    values = torch.nn.Linear(8, heads * head_dim)(torch.randn(B, N, 8)).view(B, N, heads, head_dim)
    weight = torch.randn(B, N, heads * head_dim)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a single image and head is split over two token ranges (N >= 512)
    try:
        out = ecoformer._FusedLinearAttention.apply(codes, values, beta, formula == "authors")
        grads = torch.autograd.grad((out * weight).sum(), (codes, values))
    finally:
        torch.set_num_threads(threads)
    codes64, values64 = codes.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    expected = _LinearAttention.apply(codes64.reshape(heads * B, N, b),
                                      values64.movedim(2, 0).reshape(heads * B, N, head_dim), beta,
                                      formula == "authors")
    expected = expected.view(heads, B, N, head_dim).movedim(0, 2).reshape(B, N, heads * head_dim)
    expected_grads = torch.autograd.grad((expected * weight.double()).sum(), (codes64, values64))
    for got, want in zip((out, *grads), (expected, *expected_grads)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_fused_linear_attention_op_schemas_and_checks(fused_attention):
    codes, values = torch.randn(2, 2, 9, 5).sign(), torch.randn(2, 9, 2, 8)
    torch.library.opcheck(fused_attention.linear_attention.default, (codes, values, 8.0, False))
    saved = fused_attention.linear_attention(codes, values, 8.0, True)
    torch.library.opcheck(fused_attention.linear_attention_backward.default,
                          (torch.randn(2, 9, 16), codes, values, *saved, 8.0, True))
    with pytest.raises(RuntimeError, match="multiple of 8"):
        fused_attention.linear_attention(codes, values[..., :5], 8.0, False)
    with pytest.raises(RuntimeError, match="float32"):
        fused_attention.linear_attention(codes, values.double(), 8.0, False)


def test_fused_backwards_refuse_a_second_derivative(fused_hash, fused_attention):
    """The C++ backwards have no backward: ``create_graph=True`` through them raises instead of returning a wrong
    second derivative."""
    z = torch.randn(1, 20, 1, 8, requires_grad=True)
    codes = KernelizedHash(1, 8, bits=8, anchors=4)(z)
    out = ecoformer._FusedLinearAttention.apply(codes.movedim(2, 0), z, 16.0, False)
    (grad,) = torch.autograd.grad(out.square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiat"):
        grad.sum().backward()


@pytest.mark.parametrize("formula", ["paper", "authors"])
def test_model_with_fused_kernels_matches_the_pytorch_ops(fused_hash, fused_attention, formula, monkeypatch):
    """A model runs both fused kernels, without gradient and in training (forward and backward;
    ``cpu_kernels=False``: neither). Logits, loss and every parameter's gradient equal those of the same weights on
    the PyTorch ops."""
    model, reference = tiny_model(formula=formula), tiny_model(formula=formula, cpu_kernels=False)
    assert equal_states(model.state_dict(), reference.state_dict())
    x, labels = images(2, 64), torch.tensor([1, 7])
    calls = []
    monkeypatch.setattr(ecoformer, "attention_kernels", lambda: calls.append("attention") or fused_attention)
    monkeypatch.setattr(kernel_hash, "hash_kernels", lambda: calls.append("hash") or fused_hash)
    with torch.no_grad():
        fused = model.eval()(x)
        assert calls.count("attention") == 6 and calls.count("hash") == 6  # stages 0-2, each checks, then runs
        calls.clear()
        expected = reference.eval()(x)
    assert calls == []
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    loss = F.cross_entropy(model.train()(x), labels)
    loss.backward()
    assert calls.count("attention") == 9 and calls.count("hash") == 9  # 3 blocks: check, forward, backward
    calls.clear()
    expected_loss = F.cross_entropy(reference.train()(x), labels)
    expected_loss.backward()
    assert calls == []
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference_params[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def test_kernel_projection_refuses_gradients_to_its_buffers():
    hash_fn = KernelizedHash(2, 8, bits=4, anchors=3)
    hash_fn.projection.requires_grad_()
    with pytest.raises(RuntimeError, match="gradients to z only"):
        hash_fn.project(torch.randn(1, 5, 2, 8))


def test_no_n_by_n_tensor_is_formed():
    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.largest = max([self.largest] + sizes)
            return out

    N = 2048
    attn = EcoFormerAttention(32, 2).eval()
    with torch.no_grad(), LargestTensor() as mode:
        attn(torch.randn(1, N, 32), (32, 64))
    assert 0 < mode.largest <= 2 * N * 32 < N * N


def test_straight_through_gradient():
    y = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.4, 1.0, 1.5], requires_grad=True)
    codes = sign_ste(y)
    assert codes.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    codes.backward(torch.arange(1.0, 8.0))
    assert y.grad.tolist() == [0, 2, 3, 4, 5, 6, 0]  # passed where |y| <= 1 (hardtanh)


def test_gradients_reach_qk_through_the_hash():
    attn = EcoFormerAttention(32, 2, bits=8).train()
    # qk influences the output only through the codes: a nonzero gradient means the estimator passes it on
    attn(torch.randn(2, 64, 32), (8, 8)).square().sum().backward()
    for param in (attn.qk.weight, attn.qk.bias, attn.v.weight, attn.proj.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    assert {name for name, _ in attn.named_parameters()} == {"qk.weight", "qk.bias", "v.weight", "v.bias",
                                                               "proj.weight", "proj.bias"}
    assert {name for name, _ in attn.named_buffers()} == {"hash.anchors", "hash.projection", "hash.kernel_mean",
                                                            "hash.bandwidth"}


def test_optimizer_never_touches_hash_buffers():
    model = tiny_model().train()
    before = hash_state(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model(images()).logsumexp(-1).mean().backward()
    optimizer.step()
    assert equal_states(before, hash_state(model))


def test_autocast_hash_in_float32():
    attn = EcoFormerAttention(32, 2, bits=8).eval()
    captured = {}
    attn.hash.register_forward_hook(lambda module, args, out: captured.update(codes=out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(torch.randn(2, 64, 32), (8, 8))
    assert captured["codes"].dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()


def test_count_ops_design_terms():
    ops = EcoFormerAttention(6, 2, bits=2, anchors=5).count_ops((2, 2))  # H=2, N=4, c=3, b=2, m=5
    # add = 2HNmc + HNmb + 2HNb + 2HNbc + HNc = 240 + 80 + 32 + 96 + 24; mul = 2HNm + HNmb + HNb + HN + HNc
    assert (ops.add, ops.mul, ops.bitops) == (472, 80 + 80 + 16 + 8 + 24, 0)
    assert EcoFormerAttention(64, 2).count_ops((28, 28)).mul == 2 * EcoFormerAttention(64, 2).count_ops((28, 14)).mul


# the hash fit ---------------------------------------------------------------------------------------------------
def test_code_loss_and_agreement_match_dense_definitions():
    g = torch.Generator().manual_seed(0)
    units = F.normalize(torch.randn(3, 20, 8, generator=g), dim=-1)
    targets = attention_targets(units, pairs=3)
    Y = torch.zeros(3, 20, 20).scatter_(2, targets.similar, 1.0).scatter_(2, targets.dissimilar, -1.0)
    codes = torch.sign(torch.randn(3, 20, 6, generator=g))
    dense = (codes @ codes.transpose(1, 2) - 6 * Y).square().mean((1, 2))
    torch.testing.assert_close(code_loss(codes, targets), dense)

    affinity = codes @ codes.transpose(1, 2)  # ties broken at random, averaged: the metric's expectation
    hits = []
    for _ in range(400):
        nearest = (affinity + 0.5 * torch.rand(affinity.shape, generator=g)).topk(3, -1).indices
        chosen = torch.zeros_like(affinity).scatter_(2, nearest, 1.0)
        hits.append(chosen.gather(2, targets.similar).sum(-1).mean(-1) / 3)
    torch.testing.assert_close(neighbour_agreement(codes, targets.similar), torch.stack(hits).mean(0),
                               rtol=0, atol=0.02)


def test_fit_learns_structure_and_is_deterministic():
    units = clustered_units()
    torch.manual_seed(0)
    random_hash = KernelizedHash(2, 32, bits=16, anchors=25)
    fitted, again, other_seed = (copy.deepcopy(random_hash) for _ in range(3))
    stats = fit_hash(fitted, units, pairs=10, steps=50, generator=torch.Generator().manual_seed(0))
    assert stats.heads_updated == 2
    assert stats.loss_after < 0.9 * stats.loss_before
    assert stats.agreement_after > stats.agreement_before + 0.04
    assert not equal_states(fitted.state_dict(), random_hash.state_dict())

    fit_hash(again, units, pairs=10, steps=50, generator=torch.Generator().manual_seed(0))
    assert equal_states(fitted.state_dict(), again.state_dict())
    fit_hash(other_seed, units, pairs=10, steps=50, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(fitted.anchors, other_seed.anchors)


def test_step_rule_makes_the_objective_fall():
    """DESIGN §4 calibration: the default Adam (lr 0.3) lowers the loss; the authors' SGD lr 5e-4 barely moves A."""
    units = clustered_units(heads=1)
    torch.manual_seed(0)
    start = KernelizedHash(1, 32, bits=16, anchors=25)
    results = {}
    for name, options in {"adam": dict(), "sgd_5e-4": dict(optimizer="sgd", lr=5e-4)}.items():
        hash_fn = copy.deepcopy(start)
        fit = fit_hash(hash_fn, units, pairs=10, steps=50, generator=torch.Generator().manual_seed(0), **options)
        results[name] = fit.loss_after / fit.loss_before
    assert results["adam"] < 0.85
    assert results["sgd_5e-4"] > results["adam"] + 0.05


def test_non_finite_fit_keeps_the_previous_hash(caplog):
    hash_fn = KernelizedHash(2, 32, bits=16)
    before = copy.deepcopy(hash_fn.state_dict())
    units = clustered_units(images=2, tokens=32)
    units[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        stats = fit_hash(hash_fn, units, pairs=4, steps=3, generator=torch.Generator().manual_seed(0))
    assert stats.heads_updated == 0
    assert equal_states(before, hash_fn.state_dict())
    assert "non-finite" in caplog.text


# the callback ---------------------------------------------------------------------------------------------------
def test_callback_schedule():
    callback = HashLearningCallback(images(2), every_epochs=3, **FAST_FIT)
    assert [e for e in range(11) if callback.should_fit(e)] == [0, 3, 6, 9]
    model = tiny_model()
    before = hash_state(model)
    assert callback.on_epoch_start(model, 4) is None
    assert equal_states(before, hash_state(model))
    assert [e for e in range(4) if HashLearningCallback(images(2), every_epochs=1).should_fit(e)] == [0, 1, 2, 3]


def test_callback_fits_layers_in_forward_order_on_new_hashes(monkeypatch, caplog):
    import hashing.callback

    model = tiny_model().train()
    model.stages[3].eval()  # a submodule's own mode must survive too
    initial = hash_state(model)
    snapshots = []
    real_fit = hashing.callback.fit_hash

    def spy(hash_fn, units, *args, **kwargs):
        snapshots.append(hash_state(model))
        return real_fit(hash_fn, units, *args, **kwargs)

    monkeypatch.setattr(hashing.callback, "fit_hash", spy)
    with caplog.at_level(logging.INFO, logger="hashing.callback"):
        stats = HashLearningCallback(images(4), **FAST_FIT).on_epoch_start(model, 0)

    layers = [name for name, m in model.attention_modules() if isinstance(m, EcoFormerAttention)]
    assert list(stats) == layers and len(layers) == 3
    for layer in stats.values():
        assert set(layer) == {"loss_before", "loss_after", "agreement_before", "agreement_after", "ste_share_before",
                              "ste_share_after", "heads_updated", "seconds"}
        assert layer["loss_after"] <= layer["loss_before"]
    final = hash_state(model)
    for k, layer in enumerate(layers):
        for j, earlier in enumerate(layers):
            keys = [key for key in final if key.startswith(earlier + ".")]
            expected = final if j < k else initial  # earlier layers already carry their new hash
            assert all(torch.equal(snapshots[k][key], expected[key]) for key in keys)
    assert not equal_states(initial, final)
    assert model.training and model.stages[0].training and not model.stages[3].training
    assert caplog.text.count("hash fit epoch 0") == 3


def test_fitted_hash_survives_state_dict_round_trip_and_eval_forward():
    model = tiny_model()
    HashLearningCallback(images(4), **FAST_FIT).on_epoch_start(model, 0)
    model.eval()
    fresh = tiny_model(seed=1).eval()
    assert not equal_states(hash_state(model), hash_state(fresh))
    fresh.load_state_dict(model.state_dict())
    x = images(3, seed=5)
    fitted = hash_state(model)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
        model.train()(x)
    assert equal_states(fitted, hash_state(model))  # forwards (eval or train) never fit


def test_callback_non_finite_images_keep_hashes(caplog):
    model = tiny_model()
    before = hash_state(model)
    with caplog.at_level(logging.WARNING):
        stats = HashLearningCallback(torch.full((2, 3, 32, 32), float("nan")), **FAST_FIT).on_epoch_start(model, 0)
    assert all(layer["heads_updated"] == 0 for layer in stats.values())
    assert equal_states(before, hash_state(model))
    assert "non-finite" in caplog.text


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = tiny_model(seed=rank)  # replicas start with different hashes (and see different images)
        before = hash_state(model)
        stats = HashLearningCallback(images(4, seed=rank), **FAST_FIT).on_epoch_start(model, 0)
        torch.save(dict(before=before, after=hash_state(model), stats=stats), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_replicas_end_with_identical_hashes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert not equal_states(rank0["before"], rank1["before"])
    assert equal_states(rank0["after"], rank1["after"])
    assert not equal_states(rank1["before"], rank1["after"])
    drop_time = lambda stats: {name: {k: v for k, v in s.items() if k != "seconds"} for name, s in stats.items()}
    assert drop_time(rank0["stats"]) == drop_time(rank1["stats"])


# initialisation from softmax ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sr", [False, True], ids=["msa", "sra"])
def test_adapt_softmax_state(sr):
    source = tiny_model(attn="softmax", sr=sr)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    target = tiny_model(seed=3)
    own_hashes = hash_state(target)
    state, report = models.adapt_state_dict(source.state_dict(), target)
    target.load_state_dict(state)

    src = source.state_dict()
    eco_layers = [n for n, m in target.attention_modules() if isinstance(m, EcoFormerAttention)]
    for name in eco_layers:
        p = name + "."
        C = target.get_submodule(name).dim
        assert torch.equal(state[p + "qk.weight"], src[p + "q.weight"])
        assert torch.equal(state[p + "qk.bias"], src[p + "q.bias"])
        assert torch.equal(state[p + "v.weight"], src[p + "kv.weight"][C:])
        assert torch.equal(state[p + "v.bias"], src[p + "kv.bias"][C:])
        assert {p + "qk.weight", p + "qk.bias", p + "v.weight", p + "v.bias"} <= set(report["converted"])
        assert {p + "proj.weight", p + "proj.bias"} <= set(report["copied"])
        assert {p + f"kv.weight[:{C}]", p + f"kv.bias[:{C}]"} <= set(report["dropped"])
        assert {p + "hash." + k for k in ("anchors", "projection", "kernel_mean", "bandwidth")} <= set(report["new"])
        has_sr = (p + "sr.weight") in src
        assert has_sr == (sr and name.startswith(("stages.0", "stages.1", "stages.2")))
        if has_sr:
            assert {p + "sr.weight", p + "sr.bias", p + "norm.weight", p + "norm.bias"} <= set(report["dropped"])
    assert equal_states(own_hashes, hash_state(target))
    for key, value in target.state_dict().items():
        if not any(key.startswith(name + ".") for name in eco_layers):
            assert torch.equal(value, src[key]), key
    out = target.eval()(images(2))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# validation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=0), r"bits=0 .*1 <= bits <= 64"),
    (dict(bits=65), r"bits=65 .*1 <= bits <= 64"),
    (dict(anchors=1), r"anchors=1 .*anchors >= 2"),
    (dict(formula="theirs"), r"formula='theirs' is unknown; valid: paper, authors"),
])
def test_attention_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EcoFormerAttention(32, 2, **kwargs)
    with pytest.raises(ValueError, match=match):
        timm.create_model("pvtv2_b0", attn="ecoformer", attn_kwargs=kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(every_epochs=0), r"every_epochs=0 .*tau = every_epochs >= 1"),
    (dict(pairs=0), r"pairs=0 .*pairs >= 1"),
    (dict(pairs=10, max_tokens=16), r"max_tokens=16 .*>= 2\*pairs = 20"),
    (dict(steps=-1), r"steps=-1"),
    (dict(lr=0.0), r"lr=0.0"),
    (dict(optimizer="lbfgs"), r"optimizer='lbfgs'.*adam, sgd"),
    (dict(batch_size=0), r"batch_size=0"),
])
def test_callback_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HashLearningCallback(images(2), **kwargs)


def test_pairs_must_fit_the_tokens_at_fit_time():
    with pytest.raises(ValueError, match=r"pairs=9 needs 2\*pairs <= tokens per image.*16 tokens"):
        fit_hash(KernelizedHash(1, 8), F.normalize(torch.randn(2, 16, 1, 8), dim=-1), pairs=9)


def test_callback_fits_small_token_grids_with_fewer_pairs(caplog):
    """At 32 px stage 2 has 2x2 = 4 tokens per image: the callback fits it with pairs = 2 instead of failing."""
    model = tiny_model()
    with caplog.at_level(logging.INFO, logger="hashing.callback"):
        stats = HashLearningCallback(images(8), pairs=3, steps=1).on_epoch_start(model, 0)
    assert len(stats) == 3 and all(math.isfinite(layer["loss_after"]) for layer in stats.values())
    assert "has 4 tokens per image: fitting with pairs=2 instead of 3" in caplog.text
    with pytest.raises(ValueError, match=r"images must be"):
        HashLearningCallback(torch.randn(3, 32, 32))


# the model ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 224])
def test_pvtv2_b0_ecoformer_via_timm(size):
    model = timm.create_model("pvtv2_b0", attn="ecoformer").eval()
    kinds = {name.split(".")[1]: type(m) for name, m in model.attention_modules()}
    assert kinds == {"0": EcoFormerAttention, "1": EcoFormerAttention, "2": EcoFormerAttention,
                     "3": SoftmaxAttention}
    assert EcoFormerAttention.default_stages == (0, 1, 2)
    attn = model.stages[0].blocks[0].attn
    assert (attn.bits, attn.num_anchors, attn.beta) == (16, 25, 32)
    with torch.no_grad():
        out = model(images(2, size))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
