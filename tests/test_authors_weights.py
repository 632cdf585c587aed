"""The EcoFormer authors' checkpoints (ziplab/EcoFormer, pvt/): their key names load through timm's pretrained path,
eval.py and train.py init=, and compute what their code computes.

The reference below is written for this test from their public code (pvt/pvt_v2.py, pvt/performer.py,
pvt/hashing/ksh.py): a functional PVTv2 whose stages 1-3 are EcoFormer with their numerics (bias b + 1, the
query's own value in the numerator, σ from each input) and whose last stage is full MSA with a fused qkv.
"""
import argparse
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401 (registers pvtv2_*)
from helpers import run
from models import adapt_state_dict, load_checkpoint_state
from models.weights import weight_layout

DIMS, HEADS, MLP, DEPTHS = (32, 64, 160, 256), (1, 2, 5, 8), (8, 8, 4, 4), (2, 2, 2, 2)  # pvtv2_b0
BITS, ANCHORS, CLASSES = 16, 25, 1000


def authors_state(attn_type: str, seed: int = 0) -> dict:
    """Random pvtv2_b0 weights under the authors' key names (attn_type ``ecoformer`` or ``msa``)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    state = {}

    def linear(name, fan_out, fan_in):
        state[f"{name}.weight"] = randn(fan_out, fan_in, scale=fan_in ** -0.5)
        state[f"{name}.bias"] = randn(fan_out, scale=0.02)

    def norm(name, dim):
        state[f"{name}.weight"] = 1 + randn(dim)
        state[f"{name}.bias"] = randn(dim)

    for i, (dim, heads) in enumerate(zip(DIMS, HEADS), start=1):
        fan_in = 3 if i == 1 else DIMS[i - 2]
        kernel = 7 if i == 1 else 3
        state[f"patch_embed{i}.proj.weight"] = randn(dim, fan_in, kernel, kernel, scale=(fan_in * kernel ** 2) ** -0.5)
        state[f"patch_embed{i}.proj.bias"] = randn(dim, scale=0.02)
        norm(f"patch_embed{i}.norm", dim)
        for j in range(DEPTHS[i - 1]):
            block = f"block{i}.{j}"
            norm(f"{block}.norm1", dim)
            norm(f"{block}.norm2", dim)
            if attn_type == "ecoformer" and i < 4:
                linear(f"{block}.attn.to_qk", dim, dim)
                linear(f"{block}.attn.to_v", dim, dim)
                head_dim = dim // heads
                ksh = f"{block}.attn.fast_attention.ksh"
                state[f"{ksh}.A"] = randn(heads, BITS, ANCHORS, scale=1.0)
                state[f"{ksh}.mvec"] = torch.rand(1, heads, 1, ANCHORS, generator=g) * 0.6
                state[f"{ksh}.anchor"] = F.normalize(randn(1, heads, ANCHORS, head_dim), dim=-1)
                state[f"{block}.attn.fast_attention.projection_matrix"] = randn(int(head_dim * math.log(head_dim)),
                                                                                head_dim)
            else:
                linear(f"{block}.attn.qkv", 3 * dim, dim)
            linear(f"{block}.attn.proj", dim, dim)
            hidden = dim * MLP[i - 1]
            linear(f"{block}.mlp.fc1", hidden, dim)
            state[f"{block}.mlp.dwconv.dwconv.weight"] = randn(hidden, 1, 3, 3, scale=1 / 3)
            state[f"{block}.mlp.dwconv.dwconv.bias"] = randn(hidden, scale=0.02)
            linear(f"{block}.mlp.fc2", dim, hidden)
        norm(f"norm{i}", dim)
    linear("head", CLASSES, DIMS[-1])
    return state


# their forward, functionally ------------------------------------------------------------------------------------
def _linear(s, name, x):
    return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])


def _layer_norm(s, name, x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], eps)


def _ecoformer(s, name, x, heads):
    B, N, C = x.shape
    qk = _linear(s, f"{name}.to_qk", x).reshape(B, N, heads, -1).permute(0, 2, 1, 3)
    v = _linear(s, f"{name}.to_v", x).reshape(B, N, heads, -1).permute(0, 2, 1, 3)
    qk = qk / torch.norm(qk, 2, dim=-1, keepdim=True)
    ksh = f"{name}.fast_attention.ksh"
    anchor = s[f"{ksh}.anchor"]  # (1, H, m, d)
    sq_dist = (qk.square().sum(-1, keepdim=True) + anchor.square().sum(-1)[:, :, None, :]
               - 2 * qk @ anchor.transpose(-1, -2))  # (B, H, N, m)
    sigma = sq_dist.mean(-1).mean(-1)
    kernel = torch.exp(-sq_dist / (2 * sigma[..., None, None])) - s[f"{ksh}.mvec"]
    codes = torch.sign(torch.einsum("bhnm,hkm->bhnk", kernel, s[f"{ksh}.A"]))
    bias = BITS + 1
    denominator = torch.einsum("bhnk,bhk->bhn", codes, codes.sum(-2)) + N * bias
    numerator = torch.einsum("bhkd,bhnk->bhnd", torch.einsum("bhnk,bhnd->bhkd", codes, v), codes) + bias * v
    out = (numerator / denominator[..., None]).transpose(1, 2).reshape(B, N, C)
    return _linear(s, f"{name}.proj", out)


def _msa(s, name, x, heads):
    B, N, C = x.shape
    q, k, v = _linear(s, f"{name}.qkv", x).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
    return _linear(s, f"{name}.proj", (attn @ v).transpose(1, 2).reshape(B, N, C))


def authors_forward(s: dict, x: torch.Tensor, attn_type: str) -> torch.Tensor:
    B = x.shape[0]
    for i, heads in enumerate(HEADS, start=1):
        stride, pad = (4, 3) if i == 1 else (2, 1)
        x = F.conv2d(x, s[f"patch_embed{i}.proj.weight"], s[f"patch_embed{i}.proj.bias"], stride, pad)
        H, W = x.shape[-2:]
        x = _layer_norm(s, f"patch_embed{i}.norm", x.flatten(2).transpose(1, 2), eps=1e-5)
        for j in range(DEPTHS[i - 1]):
            block = f"block{i}.{j}"
            attn = _ecoformer if attn_type == "ecoformer" and i < 4 else _msa
            x = x + attn(s, f"{block}.attn", _layer_norm(s, f"{block}.norm1", x), heads)
            h = _linear(s, f"{block}.mlp.fc1", _layer_norm(s, f"{block}.norm2", x))
            hidden = h.shape[-1]
            h = h.transpose(1, 2).reshape(B, hidden, H, W)
            h = F.conv2d(h, s[f"{block}.mlp.dwconv.dwconv.weight"], s[f"{block}.mlp.dwconv.dwconv.bias"], 1, 1,
                         groups=hidden)
            x = x + _linear(s, f"{block}.mlp.fc2", F.gelu(h.flatten(2).transpose(1, 2)))
        x = _layer_norm(s, f"norm{i}", x)
        if i < 4:
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2)
    return _linear(s, "head", x.mean(1))


# tests ----------------------------------------------------------------------------------------------------------
def save_like_the_authors(state: dict, path) -> str:
    """Their main.py's checkpoint: the weights under "model" beside optimizer state and the argparse options."""
    torch.save({"model": state, "epoch": 29, "args": argparse.Namespace(nbits=BITS, m=ANCHORS, attn_type="x")}, path)
    return str(path)


@pytest.mark.parametrize("attn_type, attn, attn_kwargs", [
    ("ecoformer", "ecoformer", {"formula": "authors"}),
    ("msa", "softmax", {"sr": False}),
])
def test_authors_checkpoint_computes_their_forward(tmp_path, attn_type, attn, attn_kwargs):
    state = authors_state(attn_type)
    assert weight_layout(state) == "ecoformer_authors"
    path = save_like_the_authors(state, tmp_path / f"pvtv2_b0_{attn_type}.pth")
    model = timm.create_model("pvtv2_b0", attn=attn, attn_kwargs=attn_kwargs, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path)).eval()
    # their LayerNorms: eps 1e-5 in the patch embeddings, 1e-6 elsewhere (the output check alone is blind to it)
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert {e for n, e in eps.items() if "patch_embed" in n or "downsample" in n} == {1e-5}
    assert {e for n, e in eps.items() if "patch_embed" not in n and "downsample" not in n} == {1e-6}
    torch.manual_seed(1)
    for size in [(224, 224), (160, 96)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ours, theirs = model(x), authors_forward(state, x, attn_type)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_authors_weights_under_the_paper_formula_differ_and_warn(tmp_path, caplog):
    state = authors_state("ecoformer")
    path = save_like_the_authors(state, tmp_path / "eco.pth")
    with caplog.at_level("WARNING"):
        model = timm.create_model("pvtv2_b0", attn="ecoformer", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=path)).eval()
    assert "attn.formula=authors" in caplog.text
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - authors_forward(state, x, "ecoformer")).abs().max() > 1e-3


def test_their_msa_weights_into_sra_blocks_fail_naming_the_fix(tmp_path):
    path = save_like_the_authors(authors_state("msa"), tmp_path / "msa.pth")
    with pytest.raises(ValueError, match=r"has no spatial reduction \(full MSA\); build the model with attn.sr=false"):
        timm.create_model("pvtv2_b0", attn="softmax", pretrained=True, pretrained_cfg_overlay=dict(file=path))


def test_unknown_layout_is_named(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(ValueError, match=r"not PVTv2 weights in a known layout .*EcoFormer authors'.*conv1.weight"):
        timm.create_model("pvtv2_b0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_eval_and_init_read_the_authors_checkpoint(tmp_path):
    """eval.py ckpt=PATH model=... attn=ecoformer attn.formula=authors, and what train.py init=PATH calls."""
    path = save_like_the_authors(authors_state("ecoformer"), tmp_path / "eco.pth")
    code, out, err = run("eval.py", f"ckpt={path}", "model=pvtv2_b0", "attn=ecoformer", "attn.formula=authors",
                         "data=fake", "data.img_size=64", "data.num_classes=1000", "data.val_size=16",
                         f"hydra.run.dir={tmp_path / 'eval'}")
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["images"] == 16 and 0.0 <= result["top1"] <= 100.0
    # train.py init=PATH: the same two calls (load the file's weights, adapt them to the configured model)
    model = timm.create_model("pvtv2_b0", attn="ecoformer", attn_kwargs={"formula": "authors"}, num_classes=10)
    adapted, report = adapt_state_dict(load_checkpoint_state(path), model)
    model.load_state_dict(adapted)
    assert "stages.0.blocks.0.attn.hash.projection" in report["copied"]
    # only what the file cannot hold: a 10-class head, and σ (their formula recomputes it from every input)
    assert set(report["new"]) == {"head.weight", "head.bias"} | {f"stages.{i}.blocks.{j}.attn.hash.bandwidth"
                                                                 for i in range(3) for j in range(2)}
