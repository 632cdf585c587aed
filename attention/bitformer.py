"""Bitformer attention: registered so that `attn=bitformer` is a known name; the implementation lands separately."""
from __future__ import annotations

from . import register_attention
from .base import AttentionBase


@register_attention("bitformer")
class BitformerAttention(AttentionBase):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, linear: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, bits: int = 16) -> None:
        raise NotImplementedError("attn=bitformer is not implemented yet; use attn=softmax")
