"""Bitformer attention (DESIGN §5): query-key scores from XOR and popcount of T-bit codes.

"Bitformer: An efficient Transformer with bitwise operation-based attention for Big Data Analytics at low-cost
low-precision devices" (2023) has no public code, only its abstract: the floating-point product QKᵀ is replaced by
bitwise operations, O(N·M·T) for T-bit codes instead of O(N·M·d). This module is the project's reading of it,
not the authors' implementation. The choices made here:

* Per head, queries and keys are projected to T real numbers (``q``: C -> H·T on all N tokens, ``k``: C -> H·T on
  the M spatially reduced tokens of PVTv2's SRA); values keep full width (``v``: C -> C). ``sr=False`` attends
  over all N tokens.
* Codes ``Q = sign(zq)``, ``K = sign(zk)`` in {-1, +1}^T with sign(0) = +1; per-token magnitudes
  ``alpha_i = mean|zq_i|``, ``beta_j = mean|zk_j|`` (``token_scale``; otherwise alpha = beta = 1).
* Integer scores ``s_ij = Q_i·K_j = T - 2·popcount(Q_i XOR K_j)``, logits ``gamma_h·alpha_i·beta_j·s_ij/√T``
  with a learnable per-head temperature gamma (``temperature``, initialised to 1, so that with T = d the logits
  approximate softmax attention's q·k/√d by alpha·Q · beta·K), softmax over keys, ``P·v``, then ``proj``.
  Only QKᵀ is bitwise; P·v stays a float product.
* Two score paths give bit-identical s (:func:`bit_scores`): ``"float"`` (training and default) multiplies the
  ±1 codes as floats, exact because |s| <= T, with a straight-through estimator for sign (gradient passed where
  |z| <= 1); in the module it folds alpha_i·gamma/√T into the query codes and beta_j into the key codes, so the
  logits are one product that ``F.scaled_dot_product_attention`` computes with its fused kernels, without
  storing the N x M scores (:meth:`BitformerAttention.fused_attention`); ``"packed"`` (inference) packs each code
  into one integer word of the narrowest width that holds T bits (int8/16/32/64) and computes XOR + popcount: on
  CPU with two fused C++ kernels (``csrc/xor_popcount.cpp``, compiled on first use and cached,
  :func:`bit_kernels`), elsewhere or without a compiler with vectorised PyTorch code (bit packing by a carry-free
  multiply, a SWAR :func:`popcount`). Exported (ONNX), the packed path
  is :func:`table_scores`: 16-bit words, BitwiseXor and a popcount lookup table, the same integer scores.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hashing.native import build_kernels

from . import register_attention
from .base import AttentionBase, OpCount

SCORE_PATHS = ("float", "packed")
MAX_BITS = 64
EXPORT_WORD_BITS = 16  # word width of the exported graph's packed codes (one 2^16-entry popcount table)
KERNEL_SOURCE = Path(__file__).parent / "csrc" / "xor_popcount.cpp"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what pack_sign_bits reads



class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1; backward: clipped identity (gradient passed where |z| <= 1)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return (z >= 0).to(z.dtype) * 2 - 1

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return grad * (z.abs() <= 1).to(grad.dtype)


def sign_ste(z: torch.Tensor) -> torch.Tensor:
    """±1 codes of ``z`` (same shape and dtype), sign(0) = +1, straight-through (hardtanh) gradient."""
    return _SignSTE.apply(z)


def word_dtype(bits: int) -> torch.dtype:
    """The narrowest signed integer dtype holding ``bits`` (1..64) bits: int8, int16, int32 or int64."""
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        if 1 <= bits <= dtype.itemsize * 8:
            return dtype
    raise ValueError(f"codes of {bits} bits: bits must be in 1..{MAX_BITS} (one integer word per code)")


def _signed(value: int, width: int) -> int:
    """The ``width``-bit two's-complement reading of the unsigned ``value`` (a mask for signed tensors)."""
    value &= (1 << width) - 1
    return value - (1 << width) if value >> (width - 1) else value


def pack_bits(codes: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """(..., T) reals, T <= 64 -> (..., 1) integer words holding the bits ``codes >= 0`` (sign +1; sign(0) = +1).

    Words have dtype :func:`word_dtype` (T); bit t of the code is bit t of its word. Padding bits are 0, so they
    never count in an XOR of two packed codes. CPU tensors with ``kernel`` use the fused kernel where available
    (:func:`bit_kernels`); otherwise PyTorch ops (on big-endian machines these permute the bits alike for every
    code, which XOR/popcount scores do not see).
    """
    bits = codes.shape[-1]
    dtype = word_dtype(bits)
    ops = bit_kernels() if kernel and codes.device.type == "cpu" and codes.dtype in KERNEL_DTYPES else None
    if ops is not None and codes.numel() > 0:
        return ops.pack_sign_bits(codes.reshape(-1, bits)).view(*codes.shape[:-1], 1)
    width = dtype.itemsize * 8
    ones = codes >= 0
    if width != bits:
        ones = torch.cat([ones, ones.new_zeros(*ones.shape[:-1], width - bits)], dim=-1)
    # 8 booleans (bytes 0/1) per int64; the multiply moves byte k's bit to bit 56 + k without carries
    octets = ones.contiguous().view(torch.int64) * 0x0102040810204080 >> 56
    return octets.to(torch.uint8).view(dtype)


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits per element of a signed integer tensor (int8/16/32/64), same shape and dtype.

    SWAR: 2-, 4- then 8-bit partial counts, then a multiply by 0x0101... gathers the byte counts in the top
    byte. Masks make arithmetic (sign-extending) shifts safe; relies on two's-complement wrap-around of
    integer tensors, as PyTorch's CPU and CUDA kernels do.
    """
    width = words.element_size() * 8
    tmp = words >> 1
    tmp &= _signed(0x5555555555555555, width)
    count = words - tmp                                      # 2-bit counts
    torch.bitwise_right_shift(count, 2, out=tmp)
    tmp &= _signed(0x3333333333333333, width)
    count &= _signed(0x3333333333333333, width)
    count += tmp                                             # 4-bit counts
    torch.bitwise_right_shift(count, 4, out=tmp)
    count += tmp
    count &= _signed(0x0F0F0F0F0F0F0F0F, width)              # 8-bit counts
    if width > 8:
        count *= _signed(0x0101010101010101, width)
        count >>= width - 8                                  # top byte: total, < 128
    return count


def _register_fakes() -> None:
    """Shape/dtype rules of the kernels for torch.compile and export (fake tensors never run the C++ code)."""
    @torch.library.register_fake("ecopvt::pack_sign_bits")
    def _pack_sign_bits(codes: torch.Tensor) -> torch.Tensor:
        return codes.new_empty(codes.shape[0], 1, dtype=word_dtype(codes.shape[1]))

    @torch.library.register_fake("ecopvt::xor_popcount_scores")
    def _xor_popcount_scores(q_words: torch.Tensor, k_words: torch.Tensor, bits: int) -> torch.Tensor:
        return q_words.new_empty(q_words.shape[0], q_words.shape[1], k_words.shape[1])


@functools.lru_cache(maxsize=None)
def bit_kernels() -> Optional[Any]:
    """The fused CPU kernels of the packed path, ``torch.ops.ecopvt``, or None where they cannot be built.

    * ``pack_sign_bits(z (R, T)) -> (R, 1)`` words, bit t set where z_t >= 0 (as :func:`pack_bits`);
    * ``xor_popcount_scores(q (G, N), k (G, M), T) -> (G, N, M)``, s = T - 2·popcount(q XOR k).

    Compiled from ``csrc/xor_popcount.cpp`` by :func:`hashing.native.build_kernels` (first use about 30 s, then
    cached); where the build fails it warns once, naming the cause, and the packed path uses PyTorch ops (same
    scores, slower).
    """
    ops = build_kernels(KERNEL_SOURCE, "the XOR/popcount kernels", "packed Bitformer scores use slower PyTorch ops")
    if ops is not None:
        _register_fakes()
    return ops


def packed_scores(q_words: torch.Tensor, k_words: torch.Tensor, bits: int, kernel: bool = True) -> torch.Tensor:
    """Scores of packed codes: (..., N, 1) and (..., M, 1) words -> (..., N, M) integers (the words' dtype).

        s_ij = T - 2·popcount(q_i XOR k_j)   (= Q_i·K_j for the ±1 codes).

    CPU tensors with ``kernel`` use the fused kernel where available (:func:`bit_kernels`); otherwise XOR of
    the broadcast words and :func:`popcount` in PyTorch (any device).
    """
    *lead, n, _ = q_words.shape
    m = k_words.shape[-2]
    ops = bit_kernels() if kernel and q_words.device.type == "cpu" else None
    if ops is not None and q_words.shape[:-2] == k_words.shape[:-2] and n * m > 0:
        groups = math.prod(lead)
        return ops.xor_popcount_scores(q_words.reshape(groups, n), k_words.reshape(groups, m), bits).view(*lead, n, m)
    diff = popcount(q_words ^ k_words.transpose(-1, -2))
    return diff.mul_(-2).add_(bits)


# (2^16, 1) int32: entry v is -2·popcount(v), an embedding table (an ONNX Gather) of every 16-bit word
SCORE_TABLE = popcount(torch.arange(1 << EXPORT_WORD_BITS, dtype=torch.int32)).mul_(-2)[:, None]


def pack_words16(codes: torch.Tensor) -> torch.Tensor:
    """(..., T) reals -> (..., ⌈T/16⌉) int32 words of 16 bits: bit t of word c is set where codes[16c + t] >= 0.

    Standard ops only (comparison, Where, ReduceSum), so it exports to ONNX; padding bits are 0.
    """
    bits = codes.shape[-1]
    words = -(-bits // EXPORT_WORD_BITS)
    padded = nn.functional.pad(codes, (0, words * EXPORT_WORD_BITS - bits), value=-1.0)  # -1: bit 0
    ones = padded.unflatten(-1, (words, EXPORT_WORD_BITS)) >= 0
    weights = 2 ** torch.arange(EXPORT_WORD_BITS, dtype=torch.int32, device=codes.device)
    return torch.where(ones, weights, 0).sum(-1, dtype=torch.int32)


def table_scores(zq: torch.Tensor, zk: torch.Tensor) -> torch.Tensor:
    """The packed scores in export-friendly ops: (..., N, T), (..., M, T) -> (..., N, M) int32, equal to
    ``bit_scores(zq, zk, "packed")``.

        s_ij = T + Σ_c table[q_ic XOR k_jc],   table[v] = -2·popcount(v)

    over the 16-bit words c of :func:`pack_words16`: BitwiseXor of the broadcast words and a popcount from a
    2^16-entry lookup table (ONNX Gather; ONNX has no popcount). No product of the codes is formed.
    """
    q_words, k_words = pack_words16(zq), pack_words16(zk)
    table = SCORE_TABLE.to(zq.device)
    scores = None
    for c in range(q_words.shape[-1]):
        diff = q_words[..., c:c + 1] ^ k_words[..., c].unsqueeze(-2)                # (..., N, M)
        term = nn.functional.embedding(diff, table).squeeze(-1)
        scores = term if scores is None else scores + term
    return scores + zq.shape[-1]


def bit_scores(zq: torch.Tensor, zk: torch.Tensor, path: str = "float") -> torch.Tensor:
    """s_ij = sign(zq_i)·sign(zk_j): (..., N, T), (..., M, T) -> (..., N, M), integer-valued, |s| <= T.

    ``"float"``: ±1 codes (:func:`sign_ste`) multiplied as floats (dtype of ``zq``), exact and differentiable.
    ``"packed"``: :func:`pack_bits` then :func:`packed_scores`, an integer tensor without gradient; while
    exporting (``torch.export``, ``torch.onnx.export(dynamo=True)``) :func:`table_scores` instead, the same
    integers from ops every ONNX runtime has. All are bit-identical.
    """
    if path == "float":
        return sign_ste(zq) @ sign_ste(zk).transpose(-1, -2)
    if path == "packed":
        if torch.compiler.is_exporting():
            return table_scores(zq, zk)
        return packed_scores(pack_bits(zq), pack_bits(zk), zq.shape[-1])
    raise ValueError(f"unknown score_path {path!r}; valid: {', '.join(SCORE_PATHS)}")


@register_attention("bitformer")
class BitformerAttention(AttentionBase):
    """Multi-head attention with T-bit query/key codes and XOR/popcount scores over SRA-reduced keys/values.

    Args:
        bits: T, code length per head (1..64; T < head size is the intended use).
        sr: apply PVTv2's spatial reduction to keys/values (True) or attend over all N tokens (False).
        token_scale: scale scores by the per-token magnitudes alpha_i·beta_j (True) or not.
        score_path: ``"float"`` (training, default) or ``"packed"`` (inference: XOR + popcount on integer words;
            no gradient through the scores, so it refuses to train).

    Parameters: ``q``, ``k`` (C -> H·T), ``v`` (C -> C), ``sr``/``norm`` (SRA), ``proj``, ``temperature`` (H,).
    """

    default_stages = (0, 1, 2, 3)

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, linear: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, bits: int = 16, sr: bool = True,
                 token_scale: bool = True, score_path: str = "float") -> None:
        super().__init__(dim, num_heads)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
        self.bits = bits
        self.use_sr = bool(sr)
        self.token_scale = bool(token_scale)
        self.score_path = score_path
        self.q = nn.Linear(dim, num_heads * bits, bias=qkv_bias)
        self.k = nn.Linear(dim, num_heads * bits, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.temperature = nn.Parameter(torch.ones(num_heads))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.build_reduction(sr_ratio if sr else 1, linear and sr)

    @property
    def score_path(self) -> str:
        return self._score_path

    @score_path.setter
    def score_path(self, path: str) -> None:
        if path not in SCORE_PATHS:
            raise ValueError(f"unknown score_path {path!r}; valid: {', '.join(SCORE_PATHS)}")
        self._score_path = path

    def extra_repr(self) -> str:
        return f"bits={self.bits}, sr={self.use_sr}, token_scale={self.token_scale}, score_path={self.score_path!r}"

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        if self.score_path == "packed" and self.training and torch.is_grad_enabled():
            raise RuntimeError("score_path='packed' is the inference path (no gradient through XOR/popcount): "
                               "train with score_path='float', or call model.eval() / run under torch.no_grad()")
        B, N, C = x.shape
        H, T = self.num_heads, self.bits
        kv_tokens = self.reduce(x, feat_size)
        M = kv_tokens.shape[1]
        zq = self.q(x).view(B, N, H, T).transpose(1, 2)                       # (B, H, N, T)
        zk = self.k(kv_tokens).view(B, M, H, T).transpose(1, 2)               # (B, H, M, T)
        v = self.v(kv_tokens).view(B, M, H, self.head_dim).transpose(1, 2)     # (B, H, M, d)

        if self.score_path == "float":
            out = self.fused_attention(zq, zk, v).transpose(1, 2).reshape(B, N, C)
            return self.proj_drop(self.proj(out))
        dtype = torch.promote_types(v.dtype, torch.float32)                    # logits in >= fp32 under AMP
        scores = bit_scores(zq, zk, self.score_path).to(dtype)                # (B, H, N, M), exact integers
        scale = self.temperature.view(H, 1, 1) / math.sqrt(T)
        if self.token_scale:
            alpha = zq.to(dtype).abs().mean(-1, keepdim=True)                 # (B, H, N, 1)
            beta = zk.to(dtype).abs().mean(-1).unsqueeze(-2)                  # (B, H, 1, M)
            logits = scores * (alpha * scale) * beta
        else:
            logits = scores * scale
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))

    def scaled_codes(self, zq: torch.Tensor, zk: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, H, N, T), (B, H, M, T) -> q' = Q·alpha·gamma/√T, k' = K·beta (>= float32), so q'_i·k'_j is logit_ij.

        The factors are per query / per key, so folding them into the ±1 codes gives the same logits as scaling the
        integer scores; the gradients (straight-through sign, the means, gamma) are the same functions too.
        """
        dtype = torch.promote_types(zq.dtype, torch.float32)
        scale = self.temperature.to(dtype).view(-1, 1, 1) / math.sqrt(self.bits)
        q, k = sign_ste(zq).to(dtype), sign_ste(zk).to(dtype)
        if not self.token_scale:
            return q * scale, k
        alpha = zq.to(dtype).abs().mean(-1, keepdim=True)                     # (B, H, N, 1)
        beta = zk.to(dtype).abs().mean(-1, keepdim=True)                      # (B, H, M, 1)
        return q * (alpha * scale), k * beta

    def fused_attention(self, zq: torch.Tensor, zk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Float path without the N x M matrix: softmax(q' k'ᵀ) v by ``F.scaled_dot_product_attention`` (scale 1).

        zq (B, H, N, T), zk (B, H, M, T), v (B, H, M, d) -> (B, H, N, d) in v's dtype. Logits in >= float32 (autocast
        off inside). q', k' and v are zero-padded to a common width max(T, d), which leaves q'·k' unchanged, because
        the fused (flash) kernels need one head size for all three.
        """
        q, k = self.scaled_codes(zq, zk)
        d = v.shape[-1]
        width = max(self.bits, d)
        q, k = F.pad(q, (0, width - self.bits)), F.pad(k, (0, width - self.bits))
        with torch.autocast(v.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q, k, F.pad(v.to(q.dtype), (0, width - d)), scale=1.0,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        return out[..., :d].to(v.dtype)

    def count_ops(self, feat_size: Sequence[int]) -> OpCount:
        """Attention products for N queries x M keys, H heads, T bits (one word per code).

        * ``bitops``: per score one XOR, one popcount and one integer add (forming T - 2·popcount): 3·H·N·M.
        * ``mul``: P·v (N·M·C); the logit scaling s_ij·(gamma/√T·alpha_i)·beta_j, 2 per score, plus per
          token the 1/T of the means and per query the product with gamma/√T (a constant per head):
          2·H·N·M + H·(2N + M). Without ``token_scale``: s_ij·gamma/√T, H·N·M.
        * ``add``: P·v (N·M·C) plus the (T - 1) additions of each mean|z|: H·(N + M)·(T - 1).
        """
        N = feat_size[0] * feat_size[1]
        M = self.reduced_tokens(feat_size)
        H, T = self.num_heads, self.bits
        pv = N * M * self.dim
        bitops = 3 * H * N * M
        if self.token_scale:
            return OpCount(mul=pv + 2 * H * N * M + H * (2 * N + M), add=pv + H * (N + M) * (T - 1), bitops=bitops)
        return OpCount(mul=pv + H * N * M, add=pv, bitops=bitops)

    def adapt_softmax_state(self, state: Dict[str, torch.Tensor], report: Dict[str, List[str]],
                            prefix: str) -> Dict[str, torch.Tensor]:
        """Initialise from a softmax (SRA/MSA) block: ``v`` <- value half of ``kv`` (converted); ``sr``, ``norm``,
        ``proj`` copied where the shapes match; ``q`` <- ``q`` and ``k`` <- key half of ``kv`` (converted) only
        when T equals the head size, else new, like ``temperature``. 'dropped': checkpoint keys not used at all.
        """
        C = self.dim
        sources = {"v.weight": ("kv.weight", slice(C, 2 * C)), "v.bias": ("kv.bias", slice(C, 2 * C))}
        if self.bits == self.head_dim:
            sources.update({"q.weight": ("q.weight", slice(None)), "q.bias": ("q.bias", slice(None)),
                             "k.weight": ("kv.weight", slice(0, C)), "k.bias": ("kv.bias", slice(0, C))})
        out: Dict[str, torch.Tensor] = {}
        used = set()
        for key, own in self.state_dict().items():
            source, rows = sources.get(key, (key, None))
            value = state.get(source)
            if value is not None and rows is not None:
                value = value[rows]
            if value is None or value.shape != own.shape:
                out[key] = own
                report["new"].append(prefix + key)
                continue
            out[key] = value
            used.add(source)
            report["copied" if rows is None else "converted"].append(prefix + key)
        report["dropped"].extend(prefix + key for key in state if key not in used)
        return out
