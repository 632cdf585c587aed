"""PVTv2 foundation: parity with timm's ``pvt_v2_*``, checkpoints, pretrained cfg, the timm model contract.

Only ``attn=softmax`` is exercised here (the other attentions have their own tests). All weights are random
(seeded) and perturbed so that no two tensors of the same kind are equal: a swapped LayerNorm or a transposed
map changes the outputs.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import timm
import timm.optim
from timm.models.pvt_v2 import checkpoint_filter_fn as timm_pvt_filter

import models
from attention.softmax import SoftmaxAttention

VARIANT_NAMES = ["b0", "b1", "b2", "b2_li", "b3", "b4", "b5"]
# DESIGN §1: parameters (M, 1000 classes)
PARAMS_M = {"b0": 3.67, "b1": 14.01, "b2": 25.36, "b2_li": 22.55, "b3": 45.24, "b4": 62.56, "b5": 81.96}
SIZES = [(224, 224), (160, 96), (32, 32)]
ATOL = 1e-5


# helpers --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Perturb every parameter (LayerNorm ones/zeros, zero biases included) with seeded noise."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def init_random_(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights, every tensor distinct: weights N(0, 1/fan_in), biases N(0, 0.1²), norm scales
    1 + N(0, 0.1²). Cheaper than the models' own init (trunc_normal_) for the 80M-parameter variants."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim > 1:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        elif re.search(r"norm\d?\.weight$", name):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def timm_reference(variant: str, seed: int = 0, **kwargs) -> nn.Module:
    """timm's ``pvt_v2_<variant>`` with seeded random weights (built on the meta device: no init cost)."""
    with torch.device("meta"):
        model = timm.create_model(f"pvt_v2_{variant}", **kwargs)
    model.to_empty(device="cpu")
    assert not list(model.buffers())
    return init_random_(model, seed).eval()


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def to_original_pvt_keys(state: dict) -> dict:
    """timm pvt_v2 key names -> the original PVT repository's (inverse of timm's checkpoint_filter_fn)."""
    out = {}
    for key, value in state.items():
        k = re.sub(r"^patch_embed\.", "patch_embed1.", key)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}.", k)
        k = re.sub(r"^stages\.(\d+)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", k)
        k = k.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.")
        out[k] = value
    return out


def assert_same_function(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final feature map (before pooling, so spatial layout counts) and logits agree; returns our logits."""
    with torch.no_grad():
        f_ref, f_ours = ref.forward_features(x), ours.forward_features(x)
        y_ref, y_ours = ref.forward_head(f_ref), ours.forward_head(f_ours)
    assert torch.isfinite(y_ref).all() and y_ref.std() > 1e-3, "degenerate reference output"
    torch.testing.assert_close(f_ours, f_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(y_ours, y_ref, atol=ATOL, rtol=0)
    return y_ours


# 1. parity with timm -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_parity_with_timm(variant):
    ref = timm_reference(variant)
    with torch.device("meta"):  # no init cost: every tensor comes from timm's state dict
        ours = timm.create_model(f"pvtv2_{variant}", attn="softmax").eval()
    assert n_params(ours) == n_params(ref)
    assert round(n_params(ours) / 1e6, 2) == PARAMS_M[variant]
    # strict: raises on any missing/unexpected key or mismatched shape
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in ours.state_dict().values())
    for i, (h, w) in enumerate(SIZES):
        y = assert_same_function(ours, ref, images(1, 3, h, w, seed=i))
        assert y.shape == (1, 1000)


def test_parity_full_msa_with_timm_sr1():
    """sr=False (full MSA) is timm's model with sr_ratios 1,1,1,1; same state dict, same function."""
    ref = timm_reference("b0", sr_ratios=(1, 1, 1, 1))
    ours = timm.create_model("pvtv2_b0", attn="softmax", attn_kwargs={"sr": False}).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_same_function(ours, ref, images(1, 3, 64, 96))


# 2. original PVT repository checkpoint --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["b0", "b2_li"])
def test_original_pvt_checkpoint(variant, tmp_path):
    ref = timm_reference(variant)
    state = ref.state_dict()
    orig = to_original_pvt_keys(state)
    for key in ["patch_embed1.proj.weight", "patch_embed1.norm.weight", "block1.0.attn.q.weight",
                "block1.0.attn.kv.weight", "block1.0.attn.sr.weight", "block1.0.norm1.weight", "norm1.weight",
                "patch_embed2.proj.weight", "block1.0.mlp.dwconv.dwconv.weight", "block4.1.attn.proj.bias",
                "norm4.bias", "head.weight"]:
        assert key in orig, key
    assert not any(k.startswith("stages.") or k.startswith("patch_embed.") for k in orig)
    # the renaming is really the inverse of timm's filter
    back = timm_pvt_filter(dict(orig), ref)
    assert set(back) == set(state) and all(back[k] is state[k] for k in state)

    model = timm.create_model(f"pvtv2_{variant}", attn="softmax").eval()
    adapted, report = models.adapt_state_dict(orig, model)
    model.load_state_dict(adapted, strict=True)
    assert not report.get("new") and not report.get("dropped") and not report.get("converted")
    x = images(1, 3, 96, 128)
    assert_same_function(model, ref, x)

    path = tmp_path / "pvt_original.pth"
    torch.save(orig, path)
    loaded = timm.create_model(f"pvtv2_{variant}", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert_same_function(loaded.eval(), ref, x)


# 3. pretrained weights offline, pretrained cfg, registry names -------------------------------------------------
@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_pretrained_from_file(ext, tmp_path):
    ref = timm_reference("b0")
    state = ref.state_dict()
    path = str(tmp_path / f"pvt_v2_b0.{ext}")
    if ext == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    x = images(2, 3, 128, 96)

    model = timm.create_model("pvtv2_b0", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    assert_same_function(model, ref, x)

    model100 = timm.create_model("pvtv2_b0", pretrained=True, num_classes=100,
                                 pretrained_cfg_overlay=dict(file=path)).eval()
    assert model100.head.weight.shape == (100, 256) and model100.head.bias.shape == (100,)
    own = model100.state_dict()
    for key, value in state.items():
        if not key.startswith("head."):
            assert torch.equal(own[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(model100.forward_features(x), ref.forward_features(x), atol=ATOL, rtol=0)
        assert model100(x).shape == (2, 100)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_pretrained_cfg(variant):
    cfg = timm.models.get_pretrained_cfg(f"pvtv2_{variant}").to_dict()
    assert cfg["hf_hub_id"] == f"timm/pvt_v2_{variant}.in1k"
    assert cfg["num_classes"] == 1000
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == 0.9
    assert cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN == (0.485, 0.456, 0.406)
    assert tuple(cfg["std"]) == timm.data.IMAGENET_DEFAULT_STD == (0.229, 0.224, 0.225)
    assert cfg["first_conv"] == "patch_embed.proj"
    assert cfg["classifier"] == "head"
    theirs = timm.models.get_pretrained_cfg(f"pvt_v2_{variant}").to_dict()
    for key in ["hf_hub_id", "num_classes", "input_size", "pool_size", "crop_pct", "crop_mode", "interpolation",
                "mean", "std", "first_conv", "classifier", "fixed_input_size"]:
        assert cfg[key] == theirs[key], key


def test_model_pretrained_cfg_and_data_config():
    model = timm.create_model("pvtv2_b0", num_classes=100)
    assert model.pretrained_cfg["hf_hub_id"] == "timm/pvt_v2_b0.in1k"
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 224, 224) and data_cfg["crop_pct"] == 0.9
    assert data_cfg["interpolation"] == "bicubic"


def test_registered_names():
    ours = timm.list_models("pvtv2_*")
    assert ours == sorted(f"pvtv2_{v}" for v in VARIANT_NAMES)
    theirs = timm.list_models("pvt_v2_*")
    assert not set(ours) & set(theirs)
    assert sorted(n.replace("pvt_v2_", "pvtv2_") for n in theirs) == ours
    for name in ours:
        assert timm.models.is_model(name)
        assert timm.models.model_entrypoint(name).__module__ == "models.pvtv2"


# 4. the timm model contract ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def b0():
    torch.manual_seed(0)
    return randomize_(timm.create_model("pvtv2_b0", attn="softmax"), 11).eval()


def test_forward_features_and_head(b0):
    x = images(2, 3, 224, 160)
    with torch.no_grad():
        feats = b0.forward_features(x)
        assert feats.shape == (2, 256, 7, 5)
        pre = b0.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 256)
        torch.testing.assert_close(pre, feats.mean(dim=(-1, -2)))
        logits = b0.forward_head(feats)
        torch.testing.assert_close(logits, b0.head(pre))
        torch.testing.assert_close(b0(x), logits)
    assert b0.num_features == b0.head_hidden_size == 256


def test_reset_classifier():
    torch.manual_seed(0)
    model = timm.create_model("pvtv2_b0").eval()
    x = images(2, 3, 64, 64)
    model.reset_classifier(10)
    assert model.num_classes == 10 and model.get_classifier() is model.head
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert isinstance(model.head, nn.Identity) and model.num_classes == 0
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, global_pool="")
        assert model(x).shape == (2, 256, 2, 2)
    with pytest.raises(ValueError):
        model.reset_classifier(5, global_pool="max")
    built = timm.create_model("pvtv2_b0", num_classes=0)
    assert isinstance(built.head, nn.Identity)


def test_features_only():
    ref = timm_reference("b0")
    feat = timm.create_model("pvtv2_b0", features_only=True, attn="softmax").eval()
    assert feat.feature_info.channels() == [32, 64, 160, 256]
    assert feat.feature_info.reduction() == [4, 8, 16, 32]
    state = {re.sub(r"^stages\.(\d+)\.", r"stages_\1.", k): v for k, v in ref.state_dict().items()
             if not k.startswith("head.")}
    feat.load_state_dict(state, strict=True)
    x = images(1, 3, 224, 160)
    with torch.no_grad():
        maps = feat(x)
        expected = ref.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == 4
    for m, e, c, s in zip(maps, expected, [32, 64, 160, 256], [4, 8, 16, 32]):
        assert m.shape == (1, c, 224 // s, 160 // s)
        torch.testing.assert_close(m, e, atol=ATOL, rtol=0)
    two = timm.create_model("pvtv2_b0", features_only=True, out_indices=(1, 3))
    assert two.feature_info.channels() == [64, 256]
    with torch.no_grad():
        assert [tuple(t.shape) for t in two(images(1, 3, 64, 64))] == [(1, 64, 8, 8), (1, 256, 2, 2)]


def test_forward_intermediates(b0):
    x = images(1, 3, 96, 64)
    with torch.no_grad():
        final, inter = b0.forward_intermediates(x)
        torch.testing.assert_close(final, b0.forward_features(x))
        assert [t.shape[1] for t in inter] == [32, 64, 160, 256]
        last2 = b0.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last2) == 2
        torch.testing.assert_close(last2[1], final)


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    plain = randomize_(timm.create_model("pvtv2_b0", num_classes=10, drop_path_rate=0.0), 5).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in ckpt.stages)
    calls = []
    ckpt.stages[2].blocks[0].register_forward_pre_hook(lambda mod, inp: calls.append(1))
    x = images(2, 3, 64, 64)
    w = images(2, 10, seed=1)
    out_plain = plain(x)
    (out_plain * w).sum().backward()
    out_ckpt = ckpt(x)
    (out_ckpt * w).sum().backward()
    assert len(calls) == 2, "checkpointed block should run again during backward"
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-6, rtol=1e-6)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)
    ckpt.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in ckpt.stages)


def test_group_matcher_and_layer_decay():
    torch.manual_seed(0)
    model = timm.create_model("pvtv2_b0", num_classes=10).train()
    groups = timm.models.group_parameters(model, model.group_matcher())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for g in groups.values() for n in g) == sorted(names)
    stem = [n for g in groups.values() for n in g if n.startswith("patch_embed")]
    assert len(stem) == 4 and all(n in groups[min(groups)] for n in stem)
    assert len(groups) == 6  # stem, 4 stages, head

    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(scale) == len(params)
    assert scale[id(params["patch_embed.proj.weight"])] == pytest.approx(0.75 ** 5)
    for i in range(4):
        assert scale[id(params[f"stages.{i}.blocks.0.attn.q.weight"])] == pytest.approx(0.75 ** (4 - i))
    assert scale[id(params["stages.3.downsample.proj.weight"])] == pytest.approx(0.75)
    assert scale[id(params["head.weight"])] == pytest.approx(1.0)
    assert decay[id(params["head.weight"])] == 0.05 and decay[id(params["head.bias"])] == 0.0
    assert decay[id(params["stages.0.blocks.0.norm1.weight"])] == 0.0

    before = {n: p.detach().clone() for n, p in params.items()}
    model(images(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in params.items())


@pytest.mark.parametrize("variant,attn_kwargs", [("b0", {}), ("b0", {"sr": False}), ("b2_li", {})])
def test_gradients_reach_every_parameter(variant, attn_kwargs):
    torch.manual_seed(0)
    model = timm.create_model(f"pvtv2_{variant}", attn="softmax", attn_kwargs=attn_kwargs, num_classes=10).train()
    model(images(2, 3, 64, 64)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


def _out_size(n: int) -> int:
    n = math.ceil(n / 4)
    for _ in range(3):
        n = math.ceil(n / 2)
    return n


@pytest.mark.parametrize("hw", [(32, 32), (33, 47), (64, 32), (47, 33), (100, 36)])
def test_any_input_size_from_32(hw):
    ref = timm_reference("b0")
    model = timm.create_model("pvtv2_b0", attn="softmax").eval()
    model.load_state_dict(ref.state_dict())
    x = images(1, 3, *hw)
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, 256, _out_size(hw[0]), _out_size(hw[1]))
    assert_same_function(model, ref, x)


@pytest.mark.parametrize("hw", [(31, 64), (64, 31), (16, 16)])
def test_too_small_input_raises(b0, hw):
    x = images(1, 3, *hw)
    with pytest.raises(ValueError, match="32"):
        b0(x)
    with pytest.raises(ValueError, match="32"):
        b0.forward_features(x)
    with pytest.raises(ValueError, match="32"):
        b0.forward_intermediates(x)


def full_attention_reference(attn: SoftmaxAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v per head, written out: q = x W_q, [k | v] = x W_kv, heads = consecutive slices."""
    B, N, C = x.shape
    h, d = attn.num_heads, C // attn.num_heads
    q = x @ attn.q.weight.T + attn.q.bias
    kv = x @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :C], kv[..., C:]
    heads = []
    for i in range(h):
        s = slice(i * d, (i + 1) * d)
        scores = q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(d)
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        p = p / p.sum(dim=-1, keepdim=True)
        heads.append(p @ v[..., s])
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


def test_full_msa_matches_explicit_reference():
    torch.manual_seed(0)
    model = randomize_(timm.create_model("pvtv2_b0", attn="softmax", attn_kwargs={"sr": False}), 7).eval()
    assert not [n for n, _ in model.named_modules() if n.endswith(".sr")]
    assert not [k for k in model.state_dict() if ".attn.sr." in k or ".attn.norm." in k]
    attns = [m for _, m in model.attention_modules()]
    assert len(attns) == 8 and all(isinstance(m, SoftmaxAttention) and m.sr is None for m in attns)

    sra = randomize_(timm.create_model("pvtv2_b0", attn="softmax"), 7).eval()
    for stage, (hh, ww) in [(1, (8, 6)), (2, (5, 7))]:  # 2 and 5 heads
        attn = model.stages[stage].blocks[0].attn
        assert attn.num_heads == (2 if stage == 1 else 5)
        x = images(2, hh * ww, attn.dim, seed=stage)
        with torch.no_grad():
            out = attn(x, (hh, ww))
            expected = full_attention_reference(attn, x)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
            # the spatially reduced attention with the same q/kv/proj weights computes something else
            reduced = sra.stages[stage].blocks[0].attn
            reduced.load_state_dict(attn.state_dict(), strict=False)
            assert reduced.sr is not None
            assert (reduced(x, (hh, ww)) - expected).abs().max() > 1e-3
    with torch.no_grad():
        assert model(images(1, 3, 64, 64)).shape == (1, 1000)


def test_unknown_attn_kwargs_raise():
    with pytest.raises(ValueError) as err:
        timm.create_model("pvtv2_b0", attn="softmax", attn_kwargs={"bits": 8})
    assert "bits" in str(err.value) and "sr" in str(err.value)


@pytest.mark.parametrize("stages", [(4,), (-1,), (0, 5)])
def test_attn_stages_out_of_range_raise(stages):
    with pytest.raises(ValueError, match="0..3"):
        timm.create_model("pvtv2_b0", attn="softmax", attn_stages=stages)


def test_attn_stages_in_range():
    model = timm.create_model("pvtv2_b0", attn="softmax", attn_stages=(0, 3))
    assert model.attn_stages == (0, 3)


def test_unknown_attention_name_raises():
    with pytest.raises(ValueError, match="softmax"):
        timm.create_model("pvtv2_b0", attn="no_such_attention")


def test_mlp_frees_fc1_output_before_activation(b0):
    """Memory/speed: in eval, fc1's (large) output must be released before GELU allocates its own output, as
    in timm; holding it made the stage-0 MLP ~30% slower on CPU (fresh allocation each call)."""
    import weakref

    mlp = b0.stages[0].blocks[0].mlp
    refs, alive = [], []
    h1 = mlp.fc1.register_forward_hook(lambda mod, inp, out: refs.append(weakref.ref(out)))
    h2 = mlp.act.register_forward_pre_hook(lambda mod, inp: alive.append(refs[-1]() is not None))
    try:
        with torch.no_grad():
            b0(images(1, 3, 64, 64))
    finally:
        h1.remove()
        h2.remove()
    assert alive == [False]


@pytest.mark.parametrize("batch", [1, 2])
def test_mlp_depthwise_conv_keeps_the_token_layout(b0, batch):
    """The depthwise conv reads the (B, N, C) tokens as NHWC in place and writes NHWC, so GELU and fc2 see contiguous
    (B, N, C) tokens: at batch 1, timm's weight strides make it copy its input to NCHW (stage 0 at 896 px: ~2x
    slower MLP). The weight's memory is the ordinary contiguous layout (state dicts unchanged)."""
    mlp = b0.stages[0].blocks[0].mlp
    layouts = []
    handle = mlp.dwconv.register_forward_hook(
        lambda mod, inp, out: layouts.append((out.is_contiguous(memory_format=torch.channels_last),
                                              out.flatten(2).transpose(1, 2).is_contiguous())))
    try:
        with torch.no_grad():
            b0(images(batch, 3, 64, 64))
    finally:
        handle.remove()
    assert layouts == [(True, True)]
    assert mlp.dwconv.weight.is_contiguous() and all(t.is_contiguous() for t in b0.state_dict().values())
