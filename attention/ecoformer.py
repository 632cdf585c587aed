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
(never by a forward pass), so a model in eval mode is a pure function of its state dict. On CPU (float32, training
and inference) the attention is two fused C++ kernels, forward and backward (``csrc/linear_attention.cpp``,
:func:`attention_kernels`, :class:`_FusedLinearAttention`), that read the values and write the output in (B, N, C)
order; :class:`_LinearAttention` is their reference and serves float64, CUDA, compile and export.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from hashing.kernel_hash import KernelizedHash
from hashing.native import build_kernels, cpu_kernels_apply

from . import register_attention
from .base import AttentionBase, OpCount


FORMULAS = ("paper", "authors")
KERNEL_SOURCE = Path(__file__).parent / "csrc" / "linear_attention.cpp"


@functools.lru_cache(maxsize=None)
def attention_kernels() -> Optional[Any]:
    """``torch.ops.ecopvt`` with the fused CPU linear attention, or None where it cannot be built (one warning,
    then :class:`_LinearAttention`): ``linear_attention(codes (H, B, N, b), values (B, N, H, d), β, own_value) ->
    (out (B, N, H·d), S (H, B, b, d), z (H, B, b), D (H, B, N))`` and ``linear_attention_backward(grad, codes,
    values, out, S, z, D, β, own_value) -> (grad_codes (H, B, N, b), grad_values (B, N, H·d))``, float32, values
    and gradients read in place (last dimension contiguous), d a multiple of 8 up to 64. Built by
    :func:`hashing.native.build_kernels` from ``csrc/linear_attention.cpp``."""
    ops = build_kernels(KERNEL_SOURCE, "the fused linear attention", "EcoFormer's attention uses slower PyTorch ops")
    if ops is not None:
        @torch.library.register_fake("ecopvt::linear_attention")
        def _linear_attention(codes, values, beta, own_value):
            (H, B, N, b), d = codes.shape, values.shape[3]
            return (values.new_empty(B, N, H * d), values.new_empty(H, B, b, d), values.new_empty(H, B, b),
                    values.new_empty(H, B, N))

        @torch.library.register_fake("ecopvt::linear_attention_backward")
        def _linear_attention_backward(grad, codes, values, out, summary, code_sum, denominator, beta, own_value):
            return codes.new_empty(codes.shape), grad.new_empty(grad.shape)
    return ops


def attention_bias(bits: int, formula: str = "paper") -> int:
    """``paper``: β = 2^⌈log₂(b+1)⌉ (32 for b = 16), the smallest power of two > b, so every h_nᵀh_j + β >= 1
    and the product by β is a shift; ``authors``: β' = b + 1 (17 for b = 16)."""
    return 1 << bits.bit_length() if formula == "paper" else bits + 1


class _LinearAttention(torch.autograd.Function):
    """out_n = (h_nᵀS + β·w_n) / (h_nᵀz + β·N) for codes h (G, N, b), values v (G, N, d), with S = Σ_j h_j v_jᵀ,
    z = Σ_j h_j and w_n = Σ_j v_j (paper) or v_n (``own_value``: the authors' code). O(N·b·d); the backward is
    written out, with g_num = g/D and g_D = −Σ_d g_num ⊙ out:

        g_v = h g_S + β·(Σ_n g_num (paper) or g_num),   g_S = hᵀ g_num
        g_h = g_num Sᵀ + v g_Sᵀ + g_D zᵀ + Σ_n g_D,n h_n
    """

    @staticmethod
    def forward(ctx, codes: torch.Tensor, values: torch.Tensor, beta: float, own_value: bool) -> torch.Tensor:
        N = codes.shape[1]
        summary = codes.transpose(1, 2) @ values  # S, (G, b, d)
        code_sum = codes.sum(1, keepdim=True)  # zᵀ, (G, 1, b)
        bias_term = values if own_value else values.sum(1, keepdim=True)
        denominator = torch.bmm(codes, code_sum.transpose(1, 2)).add_(beta * N)  # (G, N, 1)
        out = torch.baddbmm(bias_term, codes, summary, beta=beta).div_(denominator)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(codes, values, summary, code_sum, denominator, out)
            ctx.beta, ctx.own_value = beta, own_value
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, values, summary, code_sum, denominator, out = ctx.saved_tensors
        grad_num = grad / denominator
        grad_den = (grad_num * out).sum(-1, keepdim=True).neg_()  # (G, N, 1)
        grad_summary = codes.transpose(1, 2) @ grad_num  # (G, b, d)
        grad_codes = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_codes = torch.baddbmm(grad_den * code_sum + grad_den.transpose(1, 2) @ codes, grad_num,
                                       summary.transpose(1, 2)).baddbmm_(values, grad_summary.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            own = grad_num if ctx.own_value else grad_num.sum(1, keepdim=True)
            grad_values = torch.baddbmm(own, codes, grad_summary, beta=ctx.beta)
        return grad_codes, grad_values, None, None


class _FusedLinearAttention(torch.autograd.Function):
    """:class:`_LinearAttention`'s formulas, forward and backward, through the C++ kernels of
    :func:`attention_kernels`: codes (H, B, N, b), values (B, N, H, d) float32 -> (B, N, H·d), heads read and
    written in the (B, N, C) order of the projections around the attention."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, values: torch.Tensor, beta: float, own_value: bool) -> torch.Tensor:
        out, summary, code_sum, denominator = attention_kernels().linear_attention(codes, values, beta, own_value)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(codes, values, out, summary, code_sum, denominator)
            ctx.beta, ctx.own_value = beta, own_value
        return out

    @staticmethod
    @once_differentiable  # the C++ backward has no backward of its own: create_graph raises instead of erring
    def backward(ctx, grad: torch.Tensor):
        codes, values, *saved = ctx.saved_tensors
        grad_codes, grad_values = attention_kernels().linear_attention_backward(grad, codes, values, *saved, ctx.beta,
                                                                                ctx.own_value)
        return (grad_codes if ctx.needs_input_grad[0] else None,
                grad_values.view_as(values) if ctx.needs_input_grad[1] else None, None, None)


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
        cpu_kernels: CPU training and inference through the fused C++ hash and attention (False: PyTorch ops
            only); one switch, ``attn.hash.cpu_kernel``, serves both.
    """

    default_stages = (0, 1, 2)

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, linear: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, bits: int = 16, anchors: int = 25,
                 formula: str = "paper", cpu_kernels: bool = True) -> None:
        super().__init__(dim, num_heads)
        if formula not in FORMULAS:
            raise ValueError(f"formula={formula!r} is unknown; valid: {', '.join(FORMULAS)}")
        self.qk = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.hash = KernelizedHash(num_heads, self.head_dim, bits, anchors,
                                   bandwidth="fixed" if formula == "paper" else "per_input", cpu_kernel=cpu_kernels)
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
        if (self.hash.cpu_kernel and cpu_kernels_apply(codes, v) and d % 8 == 0 and d <= 64
                and attention_kernels() is not None):
            out = _FusedLinearAttention.apply(codes.movedim(2, 0), v.float().view(B, N, H, d), float(self.beta),
                                              self.formula == "authors")
        else:
            out = self._attend(codes.movedim(2, 0).reshape(H * B, N, self.bits),
                               v.view(B, N, H, d).movedim(2, 0).reshape(H * B, N, d))
            out = out.view(H, B, N, d).movedim(0, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out.to(v.dtype)))

    def _attend(self, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """codes: (G, N, b) ±1, values: (G, N, d) -> (G, N, d) for G = heads·batch problems
        (:class:`_LinearAttention`). Float32 (or wider), autocast off."""
        with torch.autocast(values.device.type, enabled=False):
            values = values.to(torch.promote_types(values.dtype, torch.float32))
            return _LinearAttention.apply(codes.to(values.dtype), values, float(self.beta), self.formula == "authors")

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
