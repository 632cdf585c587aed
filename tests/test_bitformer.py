"""Bitformer attention (DESIGN §5): exact packed XOR/popcount scores, STE gradients, learning, model plumbing."""
import copy
import math
import os
import shutil

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from attention import create_attention
from attention.bitformer import (BitformerAttention, bit_kernels, bit_scores, pack_bits, packed_scores, popcount,
                                 sign_ste, word_dtype)
from helpers import built_kernels

torch.set_num_threads(1)


def _bits_of(value: int, width: int) -> int:
    return bin(value & ((1 << width) - 1)).count("1")


# scores ------------------------------------------------------------------------------------------------------
def test_popcount_matches_reference():
    for dtype in (torch.int8, torch.int16):  # every value
        width = dtype.itemsize * 8
        values = torch.arange(-2 ** (width - 1), 2 ** (width - 1)).to(dtype)
        expected = torch.tensor([_bits_of(v, width) for v in values.tolist()])
        assert torch.equal(popcount(values).long(), expected)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.int32, torch.int64):
        width = dtype.itemsize * 8
        info = torch.iinfo(dtype)
        values = torch.cat([torch.tensor([0, 1, -1, info.min, info.max, info.min + 1, -2], dtype=dtype),
                            torch.randint(info.min, info.max, (2000,), generator=gen, dtype=dtype)])
        expected = torch.tensor([_bits_of(v, width) for v in values.tolist()])
        result = popcount(values)
        assert result.dtype == dtype and torch.equal(result.long(), expected)


@pytest.mark.parametrize("kernel", [True, False])
def test_pack_bits_layout_and_sign_of_zero(kernel):
    codes = torch.tensor([[1.0, -1.0, 0.0, -0.0, -2.0, 3.0, -0.5]])  # sign(0) = sign(-0) = +1
    words = pack_bits(codes, kernel=kernel)
    assert words.dtype == torch.int8 and words.shape == (1, 1)
    assert words.item() == 0b0101101
    assert torch.equal(sign_ste(codes), torch.tensor([[1.0, -1, 1, 1, -1, 1, -1]]))
    assert [word_dtype(t) for t in (1, 8, 9, 16, 17, 32, 33, 64)] == \
        [torch.int8, torch.int8, torch.int16, torch.int16, torch.int32, torch.int32, torch.int64, torch.int64]
    with pytest.raises(ValueError, match="1..64"):
        word_dtype(65)
    full = pack_bits(torch.zeros(3, 64), kernel=kernel)  # all 64 bits set: -1 as int64, popcount 64
    assert full.dtype == torch.int64 and full.view(-1).tolist() == [-1, -1, -1]
    assert popcount(full).view(-1).tolist() == [64, 64, 64]


@pytest.mark.parametrize("bits", [1, 7, 8, 9, 16, 33, 63, 64])
@pytest.mark.parametrize("shape", [(11, 7), (3, 5, 13), (2, 3, 1, 9)])
def test_packed_scores_bit_identical_to_float(bits, shape):
    gen = torch.Generator().manual_seed(bits)
    *batch, n, m = shape
    zq = torch.randn(*batch, n, bits, generator=gen)
    zk = torch.randn(*batch, m, bits, generator=gen)
    zq[..., 0, :] = 0.0  # exact zeros must map to +1 in both paths
    zk[..., -1, : max(1, bits // 2)] = -0.0
    reference = torch.where(zq >= 0, 1, -1).double() @ torch.where(zk >= 0, 1, -1).double().transpose(-1, -2)
    float_s = bit_scores(zq, zk, "float")
    packed_s = bit_scores(zq, zk, "packed")
    assert float_s.dtype == torch.float32 and packed_s.dtype == word_dtype(bits)
    assert packed_s.shape == float_s.shape == (*batch, n, m)
    assert torch.equal(float_s.long(), reference.long())
    assert torch.equal(packed_s.long(), reference.long())
    for kernel in (True, False):  # the fused CPU kernels and the PyTorch ops, each on its own
        words = pack_bits(zq, kernel=kernel), pack_bits(zk, kernel=kernel)
        assert torch.equal(packed_scores(*words, bits, kernel=kernel), packed_s)


# the fused CPU kernels (csrc/xor_popcount.cpp) --------------------------------------------------------------------
def test_kernels_build_where_a_compiler_exists():
    if not (shutil.which(os.environ.get("CXX", "c++")) and shutil.which("ninja")):
        pytest.skip("no C++ compiler or ninja on this machine: the packed path runs on PyTorch ops")
    ops = bit_kernels()
    assert ops is not None, "the XOR/popcount kernels failed to build (see the warning in the log)"
    with pytest.raises(RuntimeError, match="int8/16/32/64"):
        ops.xor_popcount_scores(torch.zeros(1, 2), torch.zeros(1, 3), 8)
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.xor_popcount_scores(torch.zeros(1, 2, dtype=torch.int8), torch.zeros(1, 3, dtype=torch.int8), 9)


@pytest.fixture
def kernels():
    return built_kernels(bit_kernels, "the XOR/popcount kernels")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kernel_packing_matches_pytorch_ops(kernels, dtype):
    gen = torch.Generator().manual_seed(0)
    for bits in (1, 5, 8, 13, 16, 31, 32, 47, 64):
        z = torch.randn(4, 37, 3, bits, generator=gen).to(dtype).transpose(1, 2)  # non-contiguous, as in forward
        z[0, 0, 0], z[0, 0, 1], z[0, 1, 0] = 0.0, -0.0, float("nan")  # sign(±0) = +1, NaN -> -1 on every path
        z[1, 0, 0], z[1, 0, 1] = float("inf"), -float("inf")
        assert torch.equal(pack_bits(z, kernel=True), pack_bits(z, kernel=False))
        assert torch.equal(bit_scores(z, z[:, :, :5], "packed").float(), bit_scores(z, z[:, :, :5], "float").float())


def test_kernel_scores_threads_empty_and_broadcast_shapes(kernels):
    gen = torch.Generator().manual_seed(1)
    q, k = pack_bits(torch.randn(2, 5, 301, 16, generator=gen)), pack_bits(torch.randn(2, 5, 49, 16, generator=gen))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)  # rows split over several ATen threads
        assert torch.equal(packed_scores(q, k, 16), packed_scores(q, k, 16, kernel=False))
    finally:
        torch.set_num_threads(threads)
    for n, m in ((0, 7), (7, 0)):  # no queries or no keys: empty scores, as the PyTorch ops give
        qe, ke = pack_bits(torch.randn(3, n, 9)), pack_bits(torch.randn(3, m, 9))
        assert packed_scores(qe, ke, 9).shape == (3, n, m)
    assert pack_bits(torch.randn(0, 12)).shape == (0, 1)
    # leading shapes that only broadcast (one key set for two images) take the PyTorch path
    assert torch.equal(packed_scores(q, k[:1], 16), packed_scores(q, k[:1].expand(2, -1, -1, -1), 16))


def test_kernels_pass_torch_opcheck(kernels):
    """Schema, fake-tensor shapes (torch.compile / export) and dispatch of both custom ops."""
    q, k = pack_bits(torch.randn(2, 5, 16)).view(2, 5), pack_bits(torch.randn(2, 3, 16)).view(2, 3)
    torch.library.opcheck(kernels.xor_popcount_scores.default, (q, k, 16))
    torch.library.opcheck(kernels.pack_sign_bits.default, (torch.randn(7, 13),))


def test_unknown_score_path_in_function():
    with pytest.raises(ValueError, match="float, packed"):
        bit_scores(torch.randn(2, 4), torch.randn(3, 4), "int")


# module ------------------------------------------------------------------------------------------------------
def test_sign_ste_gradient_is_clipped_identity():
    z = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.5], requires_grad=True)
    sign_ste(z).sum().backward()
    assert z.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_gradients_reach_code_projections_and_temperature():
    torch.manual_seed(0)
    attn = BitformerAttention(32, 2, sr_ratio=2, bits=8)
    x = torch.randn(2, 36, 32, requires_grad=True)
    attn(x, (6, 6)).square().sum().backward()
    for name in ("q.weight", "k.weight", "v.weight", "temperature", "sr.weight", "proj.weight"):
        grad = dict(attn.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # the codes' gradient comes only through the STE: without token scales, q still learns
    attn = BitformerAttention(32, 2, bits=8, token_scale=False)
    attn(torch.randn(2, 9, 32), (3, 3)).square().sum().backward()
    assert attn.q.weight.grad.abs().sum() > 0 and attn.k.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, feat_size", [(dict(sr_ratio=2, bits=16), (6, 10)),
                                               (dict(bits=33, sr=False), (5, 7)),
                                               (dict(bits=7, token_scale=False), (3, 5)),
                                               (dict(sr_ratio=4, linear=True, bits=64), (9, 9))])
def test_packed_module_matches_float(kwargs, feat_size):
    torch.manual_seed(0)
    attn = BitformerAttention(40, 4, **kwargs).eval()
    x = torch.randn(3, feat_size[0] * feat_size[1], 40)
    with torch.no_grad():
        expected = attn(x, feat_size)
        attn.score_path = "packed"
        assert torch.allclose(attn(x, feat_size), expected, atol=1e-6, rtol=0)


def _unfused_reference(attn: BitformerAttention, x: torch.Tensor, feat_size):
    """The float path before fusion, in float64: scores s = Q·K, logits gamma·alpha_i·beta_j·s_ij/√T, softmax, P·v.

    Returns (output, the float64 copy of ``attn`` whose parameters hold the gradients)."""
    ref = copy.deepcopy(attn).double()
    x = x.detach().double().requires_grad_()
    B, N, C = x.shape
    H, T = ref.num_heads, ref.bits
    kv = ref.reduce(x, feat_size)
    M = kv.shape[1]
    zq = ref.q(x).view(B, N, H, T).transpose(1, 2)
    zk = ref.k(kv).view(B, M, H, T).transpose(1, 2)
    v = ref.v(kv).view(B, M, H, ref.head_dim).transpose(1, 2)
    scores = sign_ste(zq) @ sign_ste(zk).transpose(-1, -2)
    scale = ref.temperature.view(H, 1, 1) / math.sqrt(T)
    if ref.token_scale:
        logits = scores * (zq.abs().mean(-1, keepdim=True) * scale) * zk.abs().mean(-1).unsqueeze(-2)
    else:
        logits = scores * scale
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return ref.proj(out), ref, x


@pytest.mark.parametrize("dim, heads, kwargs, feat_size", [
    (32, 1, dict(sr_ratio=8, bits=16), (16, 16)),              # pvtv2_b0 stage 0 (SRA), T < d
    (64, 2, dict(sr_ratio=4, bits=16), (12, 8)),               # stage 1
    (40, 4, dict(sr_ratio=2, bits=7), (7, 9)),                 # odd T, odd grid
    (40, 4, dict(bits=33, sr=False), (5, 7)),                  # full tokens, odd T > d (values padded)
    (32, 2, dict(bits=16, sr=False), (6, 6)),                  # T = d: no padding
    (24, 3, dict(bits=9, token_scale=False, sr_ratio=2), (6, 6)),
    (32, 2, dict(sr_ratio=4, linear=True, bits=11), (9, 9)),
])
def test_fused_float_path_matches_unfused_formula(dim, heads, kwargs, feat_size):
    """Outputs to 1e-5 and every gradient (input, q, k, v, sr, temperature, proj) to 1e-4 of the unfused formula."""
    torch.manual_seed(0)
    attn = BitformerAttention(dim, heads, **kwargs).train()
    with torch.no_grad():
        attn.temperature.uniform_(0.5, 2.0)
    x = torch.randn(2, feat_size[0] * feat_size[1], dim, requires_grad=True)
    out = attn(x, feat_size)
    expected, ref, x64 = _unfused_reference(attn, x, feat_size)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    weight = torch.randn_like(expected)
    (out * weight.float()).sum().backward()
    (expected * weight).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    params = dict(ref.named_parameters())
    for name, param in attn.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad.double(), params[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def test_float_path_keeps_no_score_matrix_for_backward():
    """Training saves O(N·d) tensors for backward (the fused kernel's), none of the N x M scores or weights."""
    attn = BitformerAttention(32, 1, bits=16, sr=False)
    x = torch.randn(1, 48 * 48, 32, requires_grad=True)
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attn(x, (48, 48)).sum().backward()
    n = 48 * 48
    assert sizes and max(sizes) < n * n // 16, (max(sizes), n * n)


def test_packed_path_refuses_to_train():
    attn = BitformerAttention(16, 1, score_path="packed")
    with pytest.raises(RuntimeError, match="score_path='float'"):
        attn(torch.randn(1, 4, 16), (2, 2))
    with torch.no_grad():
        assert attn(torch.randn(1, 4, 16), (2, 2)).shape == (1, 4, 16)


def test_count_ops():
    # pvtv2_b0 stage 0 at 224 px: N = 3136 queries, M = 49 keys, C = 32, one head, T = 16
    attn = BitformerAttention(32, 1, sr_ratio=8, bits=16)
    N, M = 3136, 49
    ops = attn.count_ops((56, 56))
    assert ops.bitops == 3 * N * M
    assert ops.mul == N * M * 32 + 2 * N * M + 2 * N + M
    assert ops.add == N * M * 32 + (N + M) * 15
    plain = BitformerAttention(32, 1, sr_ratio=8, bits=16, token_scale=False).count_ops((56, 56))
    assert (plain.mul, plain.add, plain.bitops) == (N * M * 32 + N * M, N * M * 32, 3 * N * M)


# learning ----------------------------------------------------------------------------------------------------
def _same_colour_batch(gen: torch.Generator, batch: int, tokens: int = 9, colours: int = 3):
    """Tokens of random colours, two of them marked; label: the two marked tokens have the same colour."""
    colour = torch.randint(colours, (batch, tokens), generator=gen)
    marked = torch.rand(batch, tokens, generator=gen).argsort(-1)[:, :2]
    same = torch.rand(batch, generator=gen) < 0.5
    first = colour.gather(1, marked[:, :1]).squeeze(1)
    other = (first + torch.randint(1, colours, (batch,), generator=gen)) % colours
    colour.scatter_(1, marked[:, 1:], torch.where(same, first, other).unsqueeze(1))
    flag = torch.zeros(batch, tokens).scatter_(1, marked, 1.0).unsqueeze(-1)
    return torch.cat([F.one_hot(colour, colours).float(), flag], -1), same.long()


class _TokenClassifier(nn.Module):
    """embed -> [x + attn(LN x)] -> x + MLP(LN x) -> mean -> linear. Only the attention mixes tokens."""

    def __init__(self, attn: bool, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = create_attention("bitformer", dim, 2, bits=8) if attn else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.attn is not None:
            x = x + self.attn(self.norm1(x), (3, 3))
        return self.head((x + self.mlp(self.norm2(x))).mean(1))


def _train(attn: bool, steps: int = 150):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _TokenClassifier(attn)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(steps):
        x, y = _same_colour_batch(gen, 128)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def _accuracy(model: nn.Module) -> float:
    x, y = _same_colour_batch(torch.Generator().manual_seed(123), 1000)
    with torch.no_grad():
        return (model.eval()(x).argmax(-1) == y).float().mean().item()


def test_learns_a_token_interaction_task():
    model, losses = _train(attn=True)
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    assert _accuracy(model) > 0.9
    model.attn.score_path = "packed"  # the deployment path classifies the same way
    assert _accuracy(model) > 0.9
    # control: without token mixing the label is not learnable (pooled per-token features are not enough)
    control, _ = _train(attn=False, steps=60)
    assert _accuracy(control) < 0.6


# model -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 224])
def test_create_model(size):
    torch.manual_seed(0)
    model = timm.create_model("pvtv2_b0", attn="bitformer", num_classes=10).eval()
    attns = [m for _, m in model.attention_modules()]
    assert len(attns) == 8 and all(isinstance(m, BitformerAttention) and m.bits == 16 for m in attns)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 10) and torch.isfinite(out).all()
        if size == 224:
            for m in attns:
                m.score_path = "packed"
            assert torch.allclose(model(x), out, atol=1e-5, rtol=0)


def test_model_options():
    model = timm.create_model("pvtv2_b0", attn="bitformer", attn_stages=(1, 2), num_classes=10,
                              attn_kwargs={"bits": 8, "score_path": "packed", "sr": False})
    kinds = [type(m).__name__ for _, m in model.attention_modules()]
    assert kinds == ["SoftmaxAttention"] * 2 + ["BitformerAttention"] * 4 + ["SoftmaxAttention"] * 2
    attn = model.stages[1].blocks[0].attn
    assert (attn.bits, attn.score_path, attn.sr, attn.reduced_tokens((8, 8))) == (8, "packed", None, 64)


@pytest.mark.parametrize("bits", [0, 65, -3, 16.0, True, "16"])
def test_invalid_bits(bits):
    with pytest.raises(ValueError, match="bits must be an integer in 1..64"):
        BitformerAttention(32, 2, bits=bits)


def test_invalid_options():
    with pytest.raises(ValueError, match="unknown score_path 'int'; valid: float, packed"):
        timm.create_model("pvtv2_b0", attn="bitformer", attn_kwargs={"score_path": "int"})
    with pytest.raises(ValueError, match="unknown option"):
        timm.create_model("pvtv2_b0", attn="bitformer", attn_kwargs={"num_bits": 8})
    attn = BitformerAttention(32, 2)
    with pytest.raises(ValueError, match="valid: float, packed"):
        attn.score_path = "xor"


def _block_keys(report_list, block="stages.1.blocks.0.attn."):
    return sorted(k[len(block):] for k in report_list if k.startswith(block))


def test_initialise_from_softmax():
    torch.manual_seed(0)
    softmax = timm.create_model("pvtv2_b0", num_classes=10)
    bitformer = timm.create_model("pvtv2_b0", attn="bitformer", num_classes=10)
    state, report = models.adapt_state_dict(softmax.state_dict(), bitformer)
    bitformer.load_state_dict(state, strict=True)
    assert _block_keys(report["converted"]) == ["v.bias", "v.weight"]
    assert _block_keys(report["new"]) == ["k.bias", "k.weight", "q.bias", "q.weight", "temperature"]
    assert _block_keys(report["dropped"]) == ["q.bias", "q.weight"]
    assert _block_keys(report["copied"]) == ["norm.bias", "norm.weight", "proj.bias", "proj.weight", "sr.bias",
                                             "sr.weight"]
    src, dst = softmax.stages[1].blocks[0].attn, bitformer.stages[1].blocks[0].attn
    assert torch.equal(dst.v.weight, src.kv.weight[64:]) and torch.equal(dst.v.bias, src.kv.bias[64:])
    assert torch.equal(dst.proj.weight, src.proj.weight) and torch.equal(dst.sr.weight, src.sr.weight)


def test_initialise_from_softmax_when_bits_equal_head_size():
    torch.manual_seed(0)
    softmax = timm.create_model("pvtv2_b0", num_classes=10)
    bitformer = timm.create_model("pvtv2_b0", attn="bitformer", attn_kwargs={"bits": 32}, num_classes=10)
    state, report = models.adapt_state_dict(softmax.state_dict(), bitformer)
    bitformer.load_state_dict(state, strict=True)
    assert _block_keys(report["converted"]) == ["k.bias", "k.weight", "q.bias", "q.weight", "v.bias", "v.weight"]
    assert _block_keys(report["new"]) == ["temperature"] and _block_keys(report["dropped"]) == []
    src, dst = softmax.stages[2].blocks[1].attn, bitformer.stages[2].blocks[1].attn
    assert torch.equal(dst.q.weight, src.q.weight) and torch.equal(dst.k.weight, src.kv.weight[:160])
    # gamma = 1: alpha·Q · beta·K approximates softmax's q·k (correlation about 2/π for Gaussian-like codes)
    with torch.no_grad():
        x = torch.randn(1, 196, 160)
        q = dst.q(x).view(196, 5, 32).transpose(0, 1)
        k = dst.k(dst.reduce(x, (14, 14))).view(49, 5, 32).transpose(0, 1)
        exact = q @ k.transpose(-1, -2)
        approx = bit_scores(q, k) * q.abs().mean(-1, keepdim=True) * k.abs().mean(-1).unsqueeze(-2)
    assert torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1] > 0.5
