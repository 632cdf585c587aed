"""EcoFormer's kernelized hash function (DESIGN §3 step 3).

Per head, for unit vectors u = z / ‖z‖ and m anchors a_1..a_m:

    κ_j(u) = exp(−‖u − a_j‖² / (2σ)),    y = A (κ(u) − μ),    H(u) = sign(y) ∈ {−1, +1}^b

with A of shape (b, m). Anchors, A, μ and σ are buffers: hash learning (:mod:`hashing.fit`) sets them, the
optimizer never touches them, and they travel in the state dict. The backward pass is the straight-through
estimator of sign, ∂H/∂y = 1[|y| ≤ 1] (hardtanh's derivative), so the projection producing z still learns.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

MAX_BITS = 64
MIN_ANCHORS = 2
_NORM_EPS = 1e-12


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


class KernelizedHash(nn.Module):
    """b-bit kernelized hash per head. ``forward(z: (..., H, d)) -> (..., H, b)`` ±1 codes of z / ‖z‖ (float32).

    Buffers: ``anchors`` (H, m, d), ``projection`` A (H, b, m), ``kernel_mean`` μ (H, m), ``bandwidth`` σ (H,).
    The initial hash is random: unit anchors, Gaussian A, σ = 2 and μ = e^(−1/2), the values of σ and μ for
    isotropic unit vectors (mean ‖u − a‖² = 2).
    """

    def __init__(self, num_heads: int, head_dim: int, bits: int = 16, anchors: int = 25) -> None:
        super().__init__()
        check_hash_sizes(bits, anchors)
        self.num_heads, self.head_dim, self.bits, self.num_anchors = num_heads, head_dim, bits, anchors
        self.register_buffer("anchors", F.normalize(torch.randn(num_heads, anchors, head_dim), dim=-1))
        self.register_buffer("projection", torch.randn(num_heads, bits, anchors))
        self.register_buffer("kernel_mean", torch.full((num_heads, anchors), math.exp(-0.5)))
        self.register_buffer("bandwidth", torch.full((num_heads,), 2.0))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, bits={self.bits}, anchors={self.num_anchors}"

    def _folded_constants(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head constants, float32: with ‖u‖ = 1, −‖u − a‖²/(2σ) = u·a/σ − (1 + ‖a‖²)/(2σ).

        Returns the scaled anchors (a_j/σ)ᵀ (H, d, m), the offsets (1 + ‖a_j‖²)/(2σ) (H, 1, m), Aᵀ (H, m, b) and
        the bias −Aμ (H, 1, b).
        """
        anchors = self.anchors.float()
        sigma = self.bandwidth.float()[:, None, None]
        offsets = (1.0 + anchors.square().sum(-1, keepdim=True).transpose(1, 2)) / (2.0 * sigma)
        proj = self.projection.float()
        bias = -(proj @ self.kernel_mean.float()[..., None]).transpose(1, 2)
        return (anchors / sigma).transpose(1, 2), offsets, proj.transpose(1, 2), bias

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., H, d), any nonzero scale -> y = A (κ(z/‖z‖) − μ): (..., H, b), float32 (autocast off).

        Heads are batched matrix products; a z whose storage is head-major (a view of (H, ..., d)) is read in
        place and y is returned as a view of a head-major (H, ..., b) tensor, so no head permutation is copied.
        """
        lead = z.shape[:-2]
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().movedim(-2, 0).reshape(self.num_heads, -1, self.head_dim)  # (H, L, d)
            anchors, offsets, proj, bias = self._folded_constants()
            norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(_NORM_EPS)
            kernel = torch.addcdiv(-offsets, z @ anchors, norm).exp_()  # κ = exp(z·a/(σ‖z‖) − (1 + ‖a‖²)/(2σ))
            y = torch.bmm(kernel, proj).add_(bias)  # (H, L, b)
        return y.view(self.num_heads, *lead, self.bits).movedim(0, -2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., H, d) -> H(z/‖z‖): (..., H, b) in {−1, +1}, float32, straight-through gradient."""
        return sign_ste(self.project(z))

    def register_unit_hook(self, fn: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call ``fn(u)`` before every forward with the unit vectors u = z/‖z‖ (..., H, d), float32, detached.

        ``fn`` may raise to stop the surrounding forward pass early. Remove with ``handle.remove()``.
        """

        def hook(module: nn.Module, args) -> None:
            fn(F.normalize(args[0].detach().float(), dim=-1, eps=_NORM_EPS))

        return self.register_forward_pre_hook(hook)
