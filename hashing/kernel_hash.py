"""EcoFormer's kernelized hash function (DESIGN §3 step 3).

Per head, for unit vectors u = z / ‖z‖ and m anchors a_1..a_m:

    κ_j(u) = exp(−‖u − a_j‖² / (2σ)),    y = A (κ(u) − μ),    H(u) = sign(y) ∈ {−1, +1}^b

with A of shape (b, m). Anchors, A, μ and σ are buffers: hash learning (:mod:`hashing.fit`) sets them, the
optimizer never touches them, and they travel in the state dict. ``bandwidth="per_input"`` is the authors'
released code instead: σ is recomputed at every forward from the input itself, per image and head, as the mean
squared token-anchor distance σ_bh = mean_{n,j} ‖u_bhn − a_hj‖² (the σ buffer is then unused). The backward pass is the straight-through
estimator of sign, ∂H/∂y = 1[|y| ≤ 1] (hardtanh's derivative), so the projection producing z still learns.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

MAX_BITS = 64
MIN_ANCHORS = 2
BANDWIDTHS = ("fixed", "per_input")
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


def sign_ste(y: torch.Tensor) -> torch.Tensor:
    """±1 codes of ``y`` with the straight-through (hardtanh) gradient."""
    if torch.is_grad_enabled() and y.requires_grad:
        return SignSTE.apply(y)
    return torch.copysign(torch.ones((), dtype=y.dtype, device=y.device), y)


class KernelizedHash(nn.Module):
    """b-bit kernelized hash per head. ``forward(z: (..., H, d)) -> (..., H, b)`` ±1 codes of z / ‖z‖ (float32).

    Buffers: ``anchors`` (H, m, d), ``projection`` A (H, b, m), ``kernel_mean`` μ (H, m), ``bandwidth`` σ (H,).
    The initial hash is random: unit anchors, Gaussian A, σ = 2 and μ = e^(−1/2), the values of σ and μ for
    isotropic unit vectors (mean ‖u − a‖² = 2). ``bandwidth``: ``fixed`` (σ is the buffer) or ``per_input``
    (σ from each input, which must then be (B, N, H, d): images, tokens, heads, head size).
    """

    def __init__(self, num_heads: int, head_dim: int, bits: int = 16, anchors: int = 25,
                 bandwidth: str = "fixed") -> None:
        super().__init__()
        check_hash_sizes(bits, anchors)
        if bandwidth not in BANDWIDTHS:
            raise ValueError(f"bandwidth={bandwidth!r} is unknown; valid: {', '.join(BANDWIDTHS)}")
        self.num_heads, self.head_dim, self.bits, self.num_anchors = num_heads, head_dim, bits, anchors
        self.per_input_bandwidth = bandwidth == "per_input"
        self.register_buffer("anchors", F.normalize(torch.randn(num_heads, anchors, head_dim), dim=-1))
        self.register_buffer("projection", torch.randn(num_heads, bits, anchors))
        self.register_buffer("kernel_mean", torch.full((num_heads, anchors), math.exp(-0.5)))
        self.register_buffer("bandwidth", torch.full((num_heads,), 2.0))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, bits={self.bits}, anchors={self.num_anchors}, "
                f"bandwidth={'per_input' if self.per_input_bandwidth else 'fixed'}")

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., H, d), any nonzero scale -> y = A (κ(z/‖z‖) − μ): (..., H, b), float32 (autocast off).

        With ‖u‖ = 1, −‖u − a‖²/(2σ) = (u·a − c)/σ for c = (1 + ‖a‖²)/2, so κ is one product and one exp. Heads
        are batched matrix products; a z whose storage is head-major (a view of (H, ..., d)) is read in place and
        y is returned as a view of a head-major (H, ..., b) tensor, so no head permutation is copied.
        """
        lead = z.shape[:-2]
        if self.per_input_bandwidth and len(lead) != 2:
            raise ValueError(f"a per-input bandwidth needs (B, N, H, d) inputs, got shape {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().movedim(-2, 0).reshape(self.num_heads, -1, self.head_dim)  # (H, L, d)
            anchors = self.anchors.float()
            offsets = 0.5 * (1.0 + anchors.square().sum(-1))[:, None, :]  # c = (1 + ‖a‖²)/2, (H, 1, m)
            norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(_NORM_EPS)
            dots = torch.bmm(z, anchors.transpose(1, 2)).div_(norm)  # u·a, (H, L, m)
            if self.per_input_bandwidth:  # σ_bh = mean_{n,j} ‖u − a_j‖² = 2·mean_{n,j}(c_j − u·a_j)
                per_image = dots.view(self.num_heads, lead[0], -1, self.num_anchors)
                sigma = 2.0 * (offsets.mean(-1, keepdim=True)[:, None] - per_image.mean((2, 3), keepdim=True))
                kernel = per_image.sub_(offsets[:, None]).div_(sigma).exp_().view_as(dots)
            else:
                kernel = dots.sub_(offsets).div_(self.bandwidth.float()[:, None, None]).exp_()
            proj = self.projection.float()
            bias = -(proj @ self.kernel_mean.float()[..., None]).transpose(1, 2)  # −Aμ, (H, 1, b)
            y = torch.baddbmm(bias, kernel, proj.transpose(1, 2))  # (H, L, b)
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
