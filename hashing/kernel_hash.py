"""EcoFormer's kernelized hash function (DESIGN §3 step 3).

Per head, for unit vectors u = z / ‖z‖ and m anchors a_1..a_m:

    κ_j(u) = exp(−‖u − a_j‖² / (2σ)),    y = A (κ(u) − μ),    H(u) = sign(y) ∈ {−1, +1}^b

with A of shape (b, m). Anchors, A, μ and σ are buffers: hash learning (:mod:`hashing.fit`) sets them, the
optimizer never touches them, and they travel in the state dict. ``bandwidth="per_input"`` is the authors'
released code instead: σ is recomputed at every forward from the input itself, per image and head, as the mean
squared token-anchor distance σ_bh = mean_{n,j} ‖u_bhn − a_hj‖² (the σ buffer is then unused). The backward pass is the straight-through
estimator of sign, ∂H/∂y = 1[|y| ≤ 1] (hardtanh's derivative), so the projection producing z still learns.
On CPU (float32, training or not), the codes come from one fused C++ pass per token (``csrc/kernel_hash.cpp``,
:func:`hash_kernels`) that never stores the (L, m) kernel matrix, and the backward recomputes it per token from z;
the PyTorch ops below are their reference and their fallback.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

from .native import build_kernels, cpu_kernels_apply

MAX_BITS = 64
MIN_ANCHORS = 2
BANDWIDTHS = ("fixed", "per_input")
_NORM_EPS = 1e-12
KERNEL_SOURCE = Path(__file__).parent / "csrc" / "kernel_hash.cpp"
KERNEL_MAX_ANCHORS = 64  # what the fused kernel's tables hold (bits are at most MAX_BITS = 64 anyway)


def check_hash_sizes(bits: int, anchors: int) -> None:
    """``ValueError`` unless 1 <= bits <= 64 and anchors >= 2."""
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is out of range: hash codes need 1 <= bits <= {MAX_BITS}")
    if not isinstance(anchors, int) or anchors < MIN_ANCHORS:
        raise ValueError(f"anchors={anchors!r} is out of range: the kernel needs anchors >= {MIN_ANCHORS}")


class SignSTE(torch.autograd.Function):
    """h = sign(y) ∈ {−1, +1} (sign of ±0 kept, so never 0); backward ∂h/∂y = 1[|y| ≤ 1]."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y)
        return torch.copysign(torch.ones((), dtype=y.dtype, device=y.device), y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad.masked_fill(y.abs() > 1, 0.0)


def sign_by_comparison(y: torch.Tensor) -> torch.Tensor:
    """copysign(1, y) from comparisons, for exported graphs (ONNX has no signbit, and its Sign(0) = 0): −1 where
    y < 0 or y is −0.0 (1/y = −inf), else +1. Equal to :func:`sign_ste`'s forward for every y but NaN."""
    one = torch.ones((), dtype=y.dtype, device=y.device)
    return torch.where((y < 0) | (y.reciprocal() < 0), -one, one)


def sign_ste(y: torch.Tensor) -> torch.Tensor:
    """±1 codes of ``y`` with the straight-through (hardtanh) gradient; :func:`sign_by_comparison` while exporting
    (``torch.export``, ``torch.onnx.export(dynamo=True)``)."""
    if torch.compiler.is_exporting():
        return sign_by_comparison(y)
    if torch.is_grad_enabled() and y.requires_grad:
        return SignSTE.apply(y)
    return torch.copysign(torch.ones((), dtype=y.dtype, device=y.device), y)


@functools.lru_cache(maxsize=None)
def hash_kernels() -> Optional[Any]:
    """``torch.ops.ecopvt`` with the fused CPU hash, or None where it cannot be built (one warning, then the PyTorch
    ops): ``kernel_hash_codes(z (H, L, d), anchors (H, m, d), A (H, b, m), μ (H, m), σ (H, 1 or images), images)
    -> (H, L, b)`` float32 ±1 codes, z any view with a contiguous last dimension, and ``kernel_hash_backward(grad
    (H, L, b), z, anchors, A, μ, σ, images, per_input) -> grad_z`` in z's layout (the straight-through gradient).
    Built by :func:`hashing.native.build_kernels` from ``csrc/kernel_hash.cpp``."""
    ops = build_kernels(KERNEL_SOURCE, "the fused hash kernel", "EcoFormer's hash uses slower PyTorch ops")
    if ops is not None:
        @torch.library.register_fake("ecopvt::kernel_hash_codes")
        def _kernel_hash_codes(z, anchors, projection, kernel_mean, bandwidth, images):
            return z.new_empty(z.shape[0], z.shape[1], projection.shape[1])

        @torch.library.register_fake("ecopvt::kernel_hash_backward")
        def _kernel_hash_backward(grad, z, anchors, projection, kernel_mean, bandwidth, images, per_input):
            dense = z.permute(sorted(range(z.dim()), key=z.stride, reverse=True)).is_contiguous()
            in_place = z.stride(-1) == 1 and dense  # the kernel's rule: z's layout where it has no gaps or overlaps
            return torch.empty_strided(z.shape, z.stride(), dtype=z.dtype) if in_place else z.new_empty(z.shape)
    return ops


class _FusedHash(torch.autograd.Function):
    """H(z/‖z‖) through the C++ kernels of :func:`hash_kernels`: z (H, L, d) float32 -> codes (H, L, b); the
    backward is :class:`_KernelProjection`'s with the straight-through sign, recomputed per token from z (nothing
    but z is saved). ``per_input``: σ (H, images) was computed from z, and its gradient is included."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, anchors: torch.Tensor, projection: torch.Tensor, kernel_mean: torch.Tensor,
                sigma: torch.Tensor, images: int, per_input: bool) -> torch.Tensor:
        codes = hash_kernels().kernel_hash_codes(z, anchors, projection, kernel_mean, sigma, images)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(z, anchors, projection, kernel_mean, sigma)
            ctx.images, ctx.per_input = images, per_input
        return codes

    @staticmethod
    @once_differentiable  # the C++ backward has no backward of its own: create_graph raises instead of erring
    def backward(ctx, grad: torch.Tensor):
        grad_z = hash_kernels().kernel_hash_backward(grad, *ctx.saved_tensors, ctx.images, ctx.per_input)
        return grad_z, None, None, None, None, None, None


class _KernelProjection(torch.autograd.Function):
    """y = A(κ(u) − μ) for z (H, L, d), u = z/‖z‖: κ = exp(s), s = (u·a − c)/σ = (z·a)·(r/σ) − c/σ with r = 1/‖z‖,
    y = κAᵀ − Aμ; gradient to z only.

    ``sigma``: (H, 1, 1), or None for the per-input bandwidth σ_bh = 2·mean_{n,j}(c_j − u_bhn·a_j) over the tokens
    of each of the ``images`` images (consecutive blocks of L), which the gradient passes through. s is one fused
    pass (``addcmul``) over the product t' = z·a, and κ overwrites it in place; without a gradient κ also overwrites
    t'. The backward is written out (fewer passes and saved tensors than autograd's), g_s = (g_y A) ⊙ κ:

        fixed σ     g̃ = g_s
        per input   g̃ = g_s + 2/(N·m)·Σ_{n,j} g_s ⊙ s,   N tokens per image
        g_z = (r/σ)·(g̃ a − (r²·Σ_j g̃_j t'_j)·z)   (the r² term is zero where ‖z‖ is clamped to 1e-12)
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, anchors_t: torch.Tensor, offsets: torch.Tensor, proj_t: torch.Tensor,
                bias: torch.Tensor, sigma: Optional[torch.Tensor], images: int) -> torch.Tensor:
        if any(ctx.needs_input_grad[1:]):
            raise RuntimeError("the kernel projection passes gradients to z only; its buffers (anchors, A, μ, σ) "
                               "are set by hash learning, not by autograd")
        H, L, _ = z.shape
        norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        inv_norm = norm.clamp_min(_NORM_EPS).reciprocal_()  # r, (H, L, 1)
        product = torch.bmm(z, anchors_t)  # t' = z·a, (H, L, m)
        per_image = product.view(H, images, L // images, -1)
        per_input = sigma is None
        if per_input:  # mean_{n,j} u_n·a_j = mean_n r_n Σ_j t'_nj / m: one reading pass, no normalised copy
            mean_ua = (per_image.sum(-1, keepdim=True) * inv_norm.view(H, images, -1, 1)).mean(2, keepdim=True)
            sigma = 2.0 * (offsets.mean(-1, keepdim=True)[:, None] - mean_ua / per_image.shape[-1])
        else:
            sigma = sigma[:, None]  # (H, 1, 1, 1)
        scale = inv_norm.view(H, images, -1, 1) / sigma  # r/σ, (H, images, L/images, 1)
        shift = offsets[:, None].neg() / sigma  # −c/σ, (H, images or 1, 1, m)
        keep = ctx.needs_input_grad[0]
        kernel = torch.addcmul(shift, per_image, scale, out=None if keep else per_image).exp_().view(H, L, -1)
        if keep:
            ctx.save_for_backward(z, inv_norm, norm > _NORM_EPS, product, kernel, anchors_t, shift, scale, proj_t)
            ctx.images, ctx.per_input = images, per_input
        return torch.baddbmm(bias, kernel, proj_t)  # (H, L, b)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        z, inv_norm, unclamped, product, kernel, anchors_t, shift, scale, proj_t = ctx.saved_tensors
        H, L, m = product.shape
        grad = torch.bmm(grad_y, proj_t.transpose(1, 2)).mul_(kernel)  # g_s, (H, L, m)
        if ctx.per_input:
            per_image = grad.view(H, ctx.images, L // ctx.images, m)
            s = torch.addcmul(shift, product.view_as(per_image), scale).mul_(per_image)
            grad = per_image.add(s.sum((2, 3), keepdim=True), alpha=2.0 / (per_image.shape[2] * m)).view(H, L, m)
        coef = (grad * product).sum(-1, keepdim=True).mul_(inv_norm.square()).mul_(unclamped)
        grad_z = torch.bmm(grad, anchors_t.transpose(1, 2)).sub_(z * coef).mul_(scale.view(H, L, 1))
        return grad_z, None, None, None, None, None, None


class KernelizedHash(nn.Module):
    """b-bit kernelized hash per head. ``forward(z: (..., H, d)) -> (..., H, b)``: ±1 codes of z / ‖z‖, float32 or
    wider.

    Buffers: ``anchors`` (H, m, d), ``projection`` A (H, b, m), ``kernel_mean`` μ (H, m), ``bandwidth`` σ (H,).
    The initial hash is random: unit anchors, Gaussian A, σ = 2 and μ = e^(−1/2), the values of σ and μ for
    isotropic unit vectors (mean ‖u − a‖² = 2). ``bandwidth``: ``fixed`` (σ is the buffer) or ``per_input``
    (σ from each input, which must then be (B, N, H, d): images, tokens, heads, head size). On CPU the codes come
    from the fused kernels (:meth:`fused_codes`; ``cpu_kernel=False``: never), otherwise from :meth:`project`.
    """

    def __init__(self, num_heads: int, head_dim: int, bits: int = 16, anchors: int = 25,
                 bandwidth: str = "fixed", cpu_kernel: bool = True) -> None:
        super().__init__()
        check_hash_sizes(bits, anchors)
        if bandwidth not in BANDWIDTHS:
            raise ValueError(f"bandwidth={bandwidth!r} is unknown; valid: {', '.join(BANDWIDTHS)}")
        self.num_heads, self.head_dim, self.bits, self.num_anchors = num_heads, head_dim, bits, anchors
        self.per_input_bandwidth = bandwidth == "per_input"
        self.cpu_kernel = cpu_kernel
        self.register_buffer("anchors", F.normalize(torch.randn(num_heads, anchors, head_dim), dim=-1))
        self.register_buffer("projection", torch.randn(num_heads, bits, anchors))
        self.register_buffer("kernel_mean", torch.full((num_heads, anchors), math.exp(-0.5)))
        self.register_buffer("bandwidth", torch.full((num_heads,), 2.0))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, bits={self.bits}, anchors={self.num_anchors}, "
                f"bandwidth={'per_input' if self.per_input_bandwidth else 'fixed'}")

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., H, d), any nonzero scale -> y = A (κ(z/‖z‖) − μ): (..., H, b), float32 or wider (autocast off).

        With ‖u‖ = 1, −‖u − a‖²/(2σ) = (u·a − c)/σ for c = (1 + ‖a‖²)/2, so κ is one product and one exp
        (:class:`_KernelProjection`, whose backward is written out). Heads are batched matrix products; a z whose
        storage is head-major (a view of (H, ..., d)) is read in place and y is returned as a view of a head-major
        (H, ..., b) tensor, so no head permutation is copied.
        """
        lead = self._check_input(z)
        dtype = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(dtype).movedim(-2, 0).reshape(self.num_heads, -1, self.head_dim)  # (H, L, d)
            anchors = self.anchors.to(dtype)
            offsets = 0.5 * (1.0 + anchors.square().sum(-1))[:, None, :]  # c = (1 + ‖a‖²)/2, (H, 1, m)
            proj = self.projection.to(dtype)
            bias = -(proj @ self.kernel_mean.to(dtype)[..., None]).transpose(1, 2)  # −Aμ, (H, 1, b)
            sigma = None if self.per_input_bandwidth else self.bandwidth.to(dtype)[:, None, None]
            images = lead[0] if self.per_input_bandwidth else 1
            y = _KernelProjection.apply(z, anchors.transpose(1, 2), offsets, proj.transpose(1, 2), bias, sigma,
                                        images)
        return y.view(self.num_heads, *lead, self.bits).movedim(0, -2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., H, d) -> H(z/‖z‖): (..., H, b) in {−1, +1}, float32 or wider, straight-through gradient.

        On CPU below float64, outside torch.compile/export: :meth:`fused_codes`."""
        if (self.cpu_kernel and cpu_kernels_apply(z) and self.num_anchors <= KERNEL_MAX_ANCHORS
                and hash_kernels() is not None):
            return self.fused_codes(z)
        return sign_ste(self.project(z))

    def fused_codes(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., H, d) on CPU -> the codes of :meth:`forward` from the fused kernels (:class:`_FusedHash`), float32,
        with the same straight-through gradient.

        The per-input bandwidth is computed here (two more passes over z) from the same formula as
        :class:`_KernelProjection`: σ_bh = 2·(mean_j c_j − mean_n r_n (z_n·Σ_j a_j)/m), one product with the
        anchors' sum; the kernel's backward adds its gradient."""
        lead = self._check_input(z)
        with torch.autocast("cpu", enabled=False):
            z = z.float().movedim(-2, 0).reshape(self.num_heads, -1, self.head_dim)  # (H, L, d), a view if possible
            anchors = self.anchors.float()
            if self.per_input_bandwidth:
                with torch.no_grad():
                    inv_norm = torch.linalg.vector_norm(z, dim=-1).clamp_min_(_NORM_EPS).reciprocal_()  # (H, L)
                    mean_ua = (torch.bmm(z, anchors.sum(1)[..., None])[..., 0] * inv_norm).view(
                        self.num_heads, lead[0], -1).mean(-1) / self.num_anchors  # (H, B)
                    offsets = 0.5 * (1.0 + anchors.square().sum(-1))  # c, (H, m)
                    sigma = 2.0 * (offsets.mean(-1, keepdim=True) - mean_ua)
            else:
                sigma = self.bandwidth.float()[:, None]
            codes = _FusedHash.apply(z, anchors, self.projection.float(), self.kernel_mean.float(), sigma,
                                     sigma.shape[1], self.per_input_bandwidth)
        return codes.view(self.num_heads, *lead, self.bits).movedim(0, -2)

    def _check_input(self, z: torch.Tensor) -> torch.Size:
        """The leading shape of z (..., H, d); ``ValueError`` where a per-input bandwidth lacks (B, N, H, d)."""
        if self.per_input_bandwidth and z.dim() != 4:
            raise ValueError(f"a per-input bandwidth needs (B, N, H, d) inputs, got shape {tuple(z.shape)}")
        return z.shape[:-2]

    def register_unit_hook(self, fn: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call ``fn(u)`` before every forward with the unit vectors u = z/‖z‖ (..., H, d), float32, detached.

        ``fn`` may raise to stop the surrounding forward pass early. Remove with ``handle.remove()``.
        """

        def hook(module: nn.Module, args) -> None:
            fn(F.normalize(args[0].detach().float(), dim=-1, eps=_NORM_EPS))

        return self.register_forward_pre_hook(hook)
