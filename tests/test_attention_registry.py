"""Attention registry: names, errors, and that a new attention is one new file with ``@register_attention``."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import timm

import attention
import models  # noqa: F401  (registers pvtv2_*)
from attention import AttentionBase, OpCount, create_attention, get_attention_class, list_attentions, \
    register_attention
from attention.softmax import SoftmaxAttention


def test_list_attentions_has_the_three():
    names = list_attentions()
    assert {"softmax", "bitformer", "ecoformer"} <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_attention_class("no_such_attention")
    msg = str(err.value)
    assert "no_such_attention" in msg
    for name in ("softmax", "bitformer", "ecoformer"):
        assert name in msg
    with pytest.raises(ValueError, match="softmax"):
        create_attention("no_such_attention", 64, 2)


def test_create_softmax():
    attn = create_attention("softmax", 64, 2, sr_ratio=4)
    assert isinstance(attn, SoftmaxAttention) and type(attn).attn_name == "softmax"
    assert get_attention_class("softmax") is SoftmaxAttention
    assert attn.num_heads == 2 and attn.head_dim == 32
    assert attn.sr.kernel_size == (4, 4) and attn.reduced_tokens((8, 8)) == 4
    x = torch.randn(2, 64, 64)
    assert attn(x, (8, 8)).shape == (2, 64, 64)
    full = create_attention("softmax", 64, 2, sr_ratio=4, sr=False)
    assert full.sr is None and full.reduced_tokens((8, 8)) == 64
    li = create_attention("softmax", 64, 2, sr_ratio=4, linear=True)
    assert li.pool is not None and li.reduced_tokens((16, 16)) == 49
    assert li(torch.randn(1, 256, 64), (16, 16)).shape == (1, 256, 64)


def test_create_checks_options():
    with pytest.raises(ValueError) as err:
        create_attention("softmax", 64, 2, bits=8)
    assert "bits" in str(err.value) and "sr" in str(err.value)
    assert SoftmaxAttention.option_names() == ["sr"]
    with pytest.raises(ValueError, match="divisible"):
        create_attention("softmax", 64, 3)


def test_registering_a_name_twice_with_another_class_raises():
    with pytest.raises(ValueError, match="twice"):
        @register_attention("softmax")
        class Other(AttentionBase):  # noqa: F811
            pass
    assert get_attention_class("softmax") is SoftmaxAttention


# a fourth attention -----------------------------------------------------------------------------------------------
PLUGIN = textwrap.dedent('''
    """A toy token mixer: proj(x) * scale (no token interaction)."""
    import torch.nn as nn

    from attention import register_attention
    from attention.base import AttentionBase, OpCount


    @register_attention("test_identity")
    class IdentityMixer(AttentionBase):
        def __init__(self, dim, num_heads, sr_ratio=1, linear=False, qkv_bias=True, attn_drop=0.0,
                     proj_drop=0.0, scale=1.0):
            super().__init__(dim, num_heads)
            self.scale = scale
            self.proj = nn.Linear(dim, dim)

        def forward(self, x, feat_size):
            return self.proj(x) * self.scale

        def count_ops(self, feat_size):
            return OpCount()
''')


@pytest.fixture
def plugin_attention(tmp_path, monkeypatch):
    """Drop one new file into the attention package's search path, as a contributor would in attention/."""
    (tmp_path / "test_identity_plugin.py").write_text(PLUGIN)
    monkeypatch.setattr(attention, "__path__", list(attention.__path__) + [str(tmp_path)])
    monkeypatch.setattr(attention, "_discovered", False)
    try:
        yield
    finally:
        attention._REGISTRY.pop("test_identity", None)
        sys.modules.pop("attention.test_identity_plugin", None)


def test_fourth_attention_is_one_new_file(plugin_attention):
    assert "test_identity" in list_attentions()  # discovered from the file, nothing else registered it
    cls = get_attention_class("test_identity")
    assert issubclass(cls, AttentionBase) and cls.attn_name == "test_identity"
    assert cls.option_names() == ["scale"]

    torch.manual_seed(0)
    model = timm.create_model("pvtv2_b0", attn="test_identity", attn_kwargs={"scale": 0.5}, num_classes=10)
    mods = [m for _, m in model.attention_modules()]
    assert len(mods) == 8 and all(isinstance(m, cls) and m.scale == 0.5 for m in mods)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(m.proj.weight.grad is not None for m in mods)

    mixed = timm.create_model("pvtv2_b0", attn="test_identity", attn_stages=(1,))
    kinds = [(n.split(".")[1], type(m)) for n, m in mixed.attention_modules()]
    assert all((k is cls) == (stage == "1") for stage, k in kinds)
    assert [k for _, k in kinds].count(cls) == 2
    with torch.no_grad():
        assert mixed(torch.randn(1, 3, 32, 32)).shape == (1, 1000)

    with pytest.raises(ValueError) as err:
        timm.create_model("pvtv2_b0", attn="test_identity", attn_kwargs={"bogus": 1})
    assert "bogus" in str(err.value) and "scale" in str(err.value)


def test_registry_cleaned_up_after_plugin():
    assert "test_identity" not in list_attentions()
    with pytest.raises(ValueError):
        get_attention_class("test_identity")


def test_register_in_code_then_remove():
    """The decorator alone (no file) also works, and the entry can be removed again."""
    try:
        @register_attention("test_zero")
        class ZeroMixer(AttentionBase):
            def __init__(self, dim, num_heads, sr_ratio=1, linear=False, qkv_bias=True, attn_drop=0.0,
                         proj_drop=0.0):
                super().__init__(dim, num_heads)

            def forward(self, x, feat_size):
                return x * 0

            def count_ops(self, feat_size):
                return OpCount()

        assert "test_zero" in list_attentions()
        model = timm.create_model("pvtv2_b0", attn="test_zero", num_classes=0).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 32)).shape == (1, 256)
        assert all(isinstance(m, ZeroMixer) for _, m in model.attention_modules())
    finally:
        attention._REGISTRY.pop("test_zero", None)
    assert "test_zero" not in list_attentions()
