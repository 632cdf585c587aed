"""Operation counts and energy (DESIGN §6, models/ops.py, scripts/energy.py): the paper's PVTv2-B0 figures,
hand-counted blocks, and how the attention terms scale with the input size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence

import pytest
import timm
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from attention import AttentionBase, OpCount, get_attention_class
from engine.build import build_model
from models import count_model_ops, energy_pj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B0 = dict(depths=(2, 2, 2, 2), dims=(32, 64, 160, 256), heads=(1, 2, 5, 8), mlp=(8, 8, 4, 4), sr=(8, 4, 2, 1))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared CPU, two OpenMP threads can be ~100x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cfg(group: str, name: str, **overrides) -> dict:
    node = OmegaConf.load(os.path.join(ROOT, "configs", group, f"{name}.yaml"))
    return OmegaConf.merge(node, overrides)


def b0(attn: str = "softmax", **attn_overrides) -> nn.Module:
    return build_model(cfg("model", "pvtv2_b0"), cfg("attn", attn, **attn_overrides), num_classes=1000)


def ecoformer_design_ops(heads: int, tokens: int, head_dim: int, anchors: int = 25, bits: int = 16) -> OpCount:
    """DESIGN §6: add = 2HNmc + HNmb + 2HNb + 2HNbc + HNc; mul = 2HNm + HNmb + HNb + HN + HNc."""
    H, N, c, m, b = heads, tokens, head_dim, anchors, bits
    return OpCount(mul=2 * H * N * m + H * N * m * b + H * N * b + H * N + H * N * c,
                   add=2 * H * N * m * c + H * N * m * b + 2 * H * N * b + 2 * H * N * b * c + H * N * c)


class EcoformerStandIn(AttentionBase):
    """EcoFormer's counted layers (qk, v, proj: C -> C each, no spatial reduction) and DESIGN §6's count_ops;
    checks the counting conventions against the paper independently of attention/ecoformer.py."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.qk, self.v, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        return self.proj(self.v(x) * torch.sigmoid(self.qk(x)))

    def count_ops(self, feat_size: Sequence[int]) -> OpCount:
        return ecoformer_design_ops(self.num_heads, feat_size[0] * feat_size[1], self.head_dim)


def ecoformer_stand_in_b0() -> nn.Module:
    """pvtv2_b0 with the stand-in in stages 0-2 and softmax (sr 1 at stage 3) in stage 3, as in the paper."""
    model = b0("softmax", sr=False)
    for name, module in model.attention_modules():
        if not name.startswith("stages.3."):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, EcoformerStandIn(module.dim, module.num_heads))
    return model


def is_stub(name: str) -> bool:
    """True while attention ``name`` is the placeholder without its own count_ops."""
    return get_attention_class(name).count_ops is AttentionBase.count_ops


def assert_paper(counts: dict, mul_g: float, add_g: float, energy: str) -> None:
    """Equal at the paper's printed precision: mul/add in G to 2 decimals, energy to the printed digits."""
    assert round(counts["mul"] / 1e9, 2) == mul_g
    assert round(counts["add"] / 1e9, 2) == add_g
    digits = len(energy.split("e")[0].replace(".", "")) - 1
    assert f"{counts['energy_pj']:.{digits}e}" == energy


def test_full_msa_matches_paper():
    counts = count_model_ops(b0("softmax", sr=False), 224)
    assert_paper(counts, 2.02, 1.99, "9.25e+09")
    assert counts["bitops"] == 0
    assert counts["energy_pj"] == pytest.approx(3.7 * counts["mul"] + 0.9 * counts["add"])


def test_ecoformer_conventions_match_paper():
    assert_paper(count_model_ops(ecoformer_stand_in_b0(), 224), 0.54, 0.56, "2.5e+09")


@pytest.mark.skipif(is_stub("ecoformer"), reason="attention/ecoformer.py is still the placeholder")
def test_ecoformer_matches_paper():
    model = b0("ecoformer")
    counts = count_model_ops(model, 224)
    if counts["uncalled_layers"]:
        pytest.xfail(f"EcoFormer's forward bypasses {counts['uncalled_layers'][:2]}...: their MACs are not counted")
    assert_paper(counts, 0.54, 0.56, "2.5e+09")
    stand_in = count_model_ops(ecoformer_stand_in_b0(), 224)
    for key in ("macs", "mul", "add", "bitops"):
        assert counts[key] == stand_in[key], key
    for name, module in model.attention_modules():
        if not name.startswith("stages.3."):
            N = counts["attention"][name]["feat_size"][0] * counts["attention"][name]["feat_size"][1]
            expected = ecoformer_design_ops(module.num_heads, N, module.head_dim)
            assert (counts["attention"][name]["mul"], counts["attention"][name]["add"]) == (expected.mul, expected.add)


def sra_block_macs(dim: int, heads: int, mlp_ratio: int, sr: int, side: int) -> tuple:
    """Hand count of one SRA block on a side x side grid: (layer MACs, attention mul, attention add)."""
    N, C, hidden = side * side, dim, dim * mlp_ratio
    M = (side // sr) ** 2
    layers = (2 * N * C                      # norm1
              + N * C * C                    # q
              + (M * (sr * sr * C * C + C)   # sr conv + bias
                 + 2 * M * C if sr > 1 else 0)  # sr norm
              + M * C * 2 * C                # kv
              + N * C * C                    # proj
              + 2 * N * C                    # norm2
              + N * C * hidden               # fc1
              + N * hidden * (9 + 1)         # depthwise 3x3 + bias
              + N * hidden * C)              # fc2
    return layers, 2 * N * M * C + heads * N * M, 2 * N * M * C


@pytest.mark.parametrize("stage", [1, 3])
def test_extra_blocks_add_hand_counted_block(stage):
    """Each block added to a stage adds exactly one hand-counted block, and the head counts num_classes x C."""
    def counts(extra: int) -> dict:
        depths = list(B0["depths"])
        depths[stage] += extra
        return count_model_ops(timm.create_model("pvtv2_b0", depths=depths, num_classes=1000), 64)

    base, one, two = counts(0), counts(1), counts(2)
    side = 64 // 4 // 2 ** stage
    layers, att_mul, att_add = sra_block_macs(B0["dims"][stage], B0["heads"][stage], B0["mlp"][stage],
                                              B0["sr"][stage], side)
    for key, per_block in (("macs", layers), ("mul", layers + att_mul), ("add", layers + att_add)):
        assert one[key] - base[key] == per_block, key
        assert two[key] - base[key] == 2 * per_block, key
    no_head = count_model_ops(timm.create_model("pvtv2_b0", num_classes=0), 64)
    assert base["macs"] - no_head["macs"] == 1000 * B0["dims"][-1]


class FusedToy(nn.Module):
    """A conv stem and a Linear whose weight the forward uses directly (not through the module)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, 4, 8, stride=8), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.stem(x).flatten(2).transpose(1, 2), self.fc.weight)


def test_layers_bypassed_by_forward_are_reported():
    counts = count_model_ops(FusedToy(), 32)
    assert counts["uncalled_layers"] == ["fc"]
    assert counts["macs"] == 16 * 4 * (3 * 8 * 8 + 1)  # 4x4 positions x 4 channels x (kernel + bias)
    assert counts["params"] == 4 * 3 * 64 + 4 + 16 + 4


def test_count_is_independent_of_mode_and_restores_it():
    model = b0("softmax").train()
    model.stages[1].eval()  # a mixed state must come back as it was
    first = count_model_ops(model, 64)
    assert model.training and not model.stages[1].training and not model.stages[1].blocks[0].attn.training
    assert model.stages[0].blocks[0].attn.training
    second = count_model_ops(model.eval(), 64)
    assert not model.training
    assert first == second


@pytest.mark.parametrize("sr", [True, False])
def test_softmax_attention_scales_with_n_times_m(sr):
    """64 -> 128 px (as 224 -> 448): N and M both x4 in every stage, so every softmax term x16."""
    model = b0("softmax", sr=sr)
    small, large = count_model_ops(model, 64), count_model_ops(model, 128)
    for name, term in small["attention"].items():
        assert large["attention"][name]["mul"] == 16 * term["mul"], name
        assert large["attention"][name]["add"] == 16 * term["add"], name
    assert large["attn_mul"] == 16 * small["attn_mul"]


def check_linear_in_n(model: nn.Module, linear_stages: Sequence[int]) -> None:
    small, large = count_model_ops(model, 64), count_model_ops(model, 128)
    for name, term in small["attention"].items():
        factor = 4 if int(name.split(".")[1]) in linear_stages else 16
        for key in ("mul", "add", "bitops"):
            assert large["attention"][name][key] == factor * term[key], (name, key)


def test_ecoformer_design_term_scales_with_n():
    check_linear_in_n(ecoformer_stand_in_b0(), linear_stages=(0, 1, 2))


@pytest.mark.skipif(is_stub("ecoformer"), reason="attention/ecoformer.py is still the placeholder")
def test_ecoformer_attention_scales_with_n():
    check_linear_in_n(b0("ecoformer"), linear_stages=(0, 1, 2))


@pytest.mark.skipif(is_stub("bitformer"), reason="attention/bitformer.py is still the placeholder")
def test_bitformer_counts_bitops():
    """XOR/popcount scores are bitops, priced at bitop_pj, x16 for N·M x16; fewer float mul than softmax SRA."""
    model = b0("bitformer")
    small, large = count_model_ops(model, 64, bitop_pj=0.25), count_model_ops(model, 128, bitop_pj=0.25)
    assert small["bitops"] > 0 and large["bitops"] == 16 * small["bitops"]
    assert large["energy_pj"] == pytest.approx(3.7 * large["mul"] + 0.9 * large["add"] + 0.25 * large["bitops"])
    assert small["attn_mul"] < count_model_ops(b0("softmax"), 64)["attn_mul"]


def test_energy_formula():
    assert energy_pj(1e9, 2e9) == pytest.approx(3.7e9 + 1.8e9)
    assert energy_pj(0, 0, 10, bitop_pj=0.5) == pytest.approx(5.0)


def test_energy_script_last_line_is_json():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "energy.py"), "model=pvtv2_b0",
                          "attn=softmax", "attn.sr=false", "data.img_size=64", "bitop_pj=0.2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("params", "macs", "mul", "add", "bitops", "energy_pj", "model", "attn", "img_size"):
        assert key in result, key
    assert (result["model"], result["attn"], result["img_size"], result["bitop_pj"]) == ("pvtv2_b0", "softmax", 64, 0.2)
    expected = count_model_ops(b0("softmax", sr=False), 64)
    assert (result["mul"], result["add"], result["params"]) == (expected["mul"], expected["add"], expected["params"])
