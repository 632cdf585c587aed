"""EcoFormer attention ("EcoFormer: Energy-Saving Attention with Linear Complexity", NeurIPS 2022; DESIGN §3).

Per head, with one projection for queries and keys and ±1 codes h = H(u) of the unit vectors u = qk/‖qk‖
(:class:`hashing.KernelizedHash`), two formulas (option ``formula``):

    paper    out_n = [ h_nᵀ (Σ_j h_j v_jᵀ) + β Σ_j v_j ] / [ h_nᵀ (Σ_j h_j) + β N ],   β = 2^⌈log₂(b+1)⌉ (32 at b = 16)
    authors  out_n = [ h_nᵀ (Σ_j h_j v_jᵀ) + β' v_n   ] / [ h_nᵀ (Σ_j h_j) + β' N ],  β' = b + 1      (17 at b = 16)

``paper`` (the default) is the paper's Eq.: weights w_nj = (h_nᵀh_j + β) / Σ_j (h_nᵀh_j + β) > 0 that sum to
one. ``authors`` is what their released code (ziplab/EcoFormer, pvt/performer.py and pvt/hashing/ksh.py)
computes and what their checkpoints were trained with: the bias term adds the query token's own value (the
weights h_nᵀh_j / D_n plus β'/D_n on j = n do not sum to one), and the kernel bandwidth σ is recomputed from
each input, per image and head (``KernelizedHash(bandwidth="per_input")``). Both run in O(N·b·d) time and
memory: no N×N matrix. No spatial reduction: all N tokens are keys. The hash is fitted by :mod:`hashing`
(never by a forward pass), so a model in eval mode is a pure function of its state dict.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from hashing.kernel_hash import KernelizedHash

from . import register_attention
from .base import AttentionBase, OpCount


FORMULAS = ("paper", "authors")


def attention_bias(bits: int, formula: str = "paper") -> int:
    """``paper``: β = 2^⌈log₂(b+1)⌉ (32 for b = 16), the smallest power of two > b, so every h_nᵀh_j + β >= 1
    and the product by β is a shift; ``authors``: β' = b + 1 (17 for b = 16)."""
    return 1 << bits.bit_length() if formula == "paper" else bits + 1


@register_attention("ecoformer")
class EcoFormerAttention(AttentionBase):
    """EcoFormer token mixer: ``forward(x: (B, N, C), feat_size) -> (B, N, C)``.

    Parameters ``qk`` (C→C, queries = keys), ``v`` (C→C), ``proj`` (C→C); buffers of the hash under ``hash.*``.
    ``sr_ratio``, ``linear`` and ``attn_drop`` are accepted for the shared block signature and unused (no key
    reduction, no attention matrix to drop from). The hash's input is qk viewed as (B, N, H, d); hash learning
    captures the unit vectors u with ``attn.hash.register_unit_hook(fn)``.

    Args:
        bits: hash bits b (1..64).
        anchors: RBF anchors m (>= 2).
        formula: ``paper`` or ``authors`` (see the module docstring); ``count_ops`` is the same for both.
    """

    default_stages = (0, 1, 2)

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, linear: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, bits: int = 16, anchors: int = 25,
                 formula: str = "paper") -> None:
        super().__init__(dim, num_heads)
        if formula not in FORMULAS:
            raise ValueError(f"formula={formula!r} is unknown; valid: {', '.join(FORMULAS)}")
        self.qk = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.hash = KernelizedHash(num_heads, self.head_dim, bits, anchors,
                                   bandwidth="fixed" if formula == "paper" else "per_input")
        self.bits, self.num_anchors, self.formula = bits, anchors, formula
        self.beta = attention_bias(bits, formula)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, bits={self.bits}, anchors={self.num_anchors}, "
                f"formula={self.formula}, beta={self.beta}")

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        H, d = self.num_heads, self.head_dim
        qk, v = self.qk(x), self.v(x)
        codes = self.hash(qk.view(B, N, H, d))  # (B, N, H, b), a view of head-major (H, B, N, b) storage
        out = self._attend(codes.movedim(2, 0).reshape(H * B, N, self.bits),
                           v.view(B, N, H, d).movedim(2, 0).reshape(H * B, N, d))
        out = out.view(H, B, N, d).movedim(0, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out.to(v.dtype)))

    def _attend(self, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """codes: (G, N, b) ±1, values: (G, N, d) -> (G, N, d) for G = heads·batch problems.

        With h' = [h | 1] and v' = [v | 1]: summary = h'ᵀv' = [[Σ_j h_j v_jᵀ, Σ_j h_j], [Σ_j v_jᵀ, N]], so
        [numerator | denominator] of out_n = h_nᵀ·summary + β·([Σ_j v_j | N] (paper) or [v_n | N] (authors)).
        Float32 (or wider), autocast off.
        """
        with torch.autocast(values.device.type, enabled=False):
            values = values.to(torch.promote_types(values.dtype, torch.float32))
            G, N, _ = values.shape
            codes = codes.to(values.dtype)
            summary = codes.transpose(1, 2) @ torch.cat([values, values.new_ones(G, N, 1)], -1)  # (G, b, d + 1)
            if self.formula == "paper":
                bias_term = torch.cat([values.sum(1, keepdim=True), values.new_full((G, 1, 1), N)], -1)
            else:
                bias_term = torch.cat([values, values.new_full((G, N, 1), N)], -1)
            out = torch.baddbmm(bias_term, codes, summary, beta=self.beta)
            return out[..., :-1] / out[..., -1:]

    def count_ops(self, feat_size: Sequence[int]) -> OpCount:
        """DESIGN §6 with c = head size, b bits, m anchors: add = 2HNmc + HNmb + 2HNb + 2HNbc + HNc,
        mul = 2HNm + HNmb + HNb + HN + HNc."""
        N = feat_size[0] * feat_size[1]
        H, c, b, m = self.num_heads, self.head_dim, self.bits, self.num_anchors
        return OpCount(mul=2 * H * N * m + H * N * m * b + H * N * b + H * N + H * N * c,
                       add=2 * H * N * m * c + H * N * m * b + 2 * H * N * b + 2 * H * N * b * c + H * N * c)

    def adapt_softmax_state(self, state: Dict[str, torch.Tensor], report: Dict[str, List[str]],
                            prefix: str) -> Dict[str, torch.Tensor]:
        """Softmax (SRA or MSA) block -> EcoFormer: qk <- q, v <- value half of kv (rows C..2C), proj copied.

        The hash keeps this module's own buffers ("new"); ``sr.*``, ``norm.*`` and the key half of kv
        (reported as ``kv.weight[:C]``, ``kv.bias[:C]``) are dropped.
        """
        C = self.dim
        sources = {"qk.weight": ("q.weight", slice(None)), "qk.bias": ("q.bias", slice(None)),
                   "v.weight": ("kv.weight", slice(C, 2 * C)), "v.bias": ("kv.bias", slice(C, 2 * C))}
        out, used = {}, set()
        for key, value in self.state_dict().items():
            source, rows = sources.get(key, (key, slice(None)))
            tensor = state[source][rows] if source in state else None
            if tensor is not None and tensor.shape == value.shape:
                out[key] = tensor
                used.add(source)
                report["converted" if source != key else "copied"].append(prefix + key)
            else:
                out[key] = value
                report["new"].append(prefix + key)
        for key in state:
            if key not in used:
                report["dropped"].append(prefix + key)
            elif key.startswith("kv."):
                report["dropped"].append(f"{prefix}{key}[:{C}]")
        return out
