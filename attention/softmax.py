"""Softmax attention: PVTv2's spatial-reduction attention (SRA), its ``li`` variant and full MSA (DESIGN §2).

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V,   Q = x W_q (N tokens),   [K, V] = reduce(x) W_kv (M tokens)

with M = N / sr² (SRA), 49 (``linear``, PVTv2-li) or N (``sr=False``: the EcoFormer paper's MSA baseline).
Parameter names (``q``, ``kv``, ``sr``, ``norm``, ``proj``) equal timm's ``pvt_v2`` so its weights load as-is.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_attention
from .base import AttentionBase, OpCount


@register_attention("softmax")
class SoftmaxAttention(AttentionBase):
    """Multi-head softmax attention over spatially reduced keys/values, via ``F.scaled_dot_product_attention``.

    Args:
        sr: apply PVTv2's spatial reduction (True) or attend over all N tokens (False, full MSA).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, linear: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, sr: bool = True) -> None:
        super().__init__(dim, num_heads)
        self.use_sr = bool(sr)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.build_reduction(sr_ratio if sr else 1, linear and sr)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self.reduce(x, feat_size))
        k, v = kv.view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))

    def count_ops(self, feat_size: Sequence[int]) -> OpCount:
        """DESIGN §6: QKᵀ and PV, 2·N·M·C multiply-adds, plus H·N·M multiplications for the scaling."""
        N = feat_size[0] * feat_size[1]
        M = self.reduced_tokens(feat_size)
        return OpCount(mul=2 * N * M * self.dim + self.num_heads * N * M, add=2 * N * M * self.dim)
