"""Self-supervised hash learning of EcoFormer (DESIGN §4): fit a :class:`KernelizedHash` to attention targets.

Each image's n tokens form one problem per head. Targets come from the attention map S = u uᵀ: in every row
the l largest entries (the token itself included) are similar pairs, Y = +1, the l smallest dissimilar,
Y = −1, all others 0. The fit draws m anchors from the tokens, sets σ = mean ‖u − a‖² and μ = mean κ(u), then
learns A greedily bit by bit (KSH): with the residual R_r = bY − Σ_{k<r} h_k h_kᵀ, bit r maximises
φ(K̄a)ᵀ R_r φ(K̄a), φ(x) = 2·sigmoid(x) − 1, by gradient steps from the current row of A, and keeps the new
row only if hard signs h = sign(K̄a) do better. R is never formed: R_r φ = b·Yφ − P(Pᵀφ) with the sparse Y
(2l entries a row) and the previous bits P, so a step costs O(n·(l + m + b)) per problem, not O(n²). Only
the targets and the agreement metric touch one n×n block, in chunks.

Reported per fit: the loss mean((HHᵀ − bY)²) over all pairs, the top-l neighbour agreement (how many of
a token's l most similar tokens by attention are among its l nearest by Hamming affinity, ties counted by
their expected share) and the share of pre-sign values y with |y| <= 1 (where the straight-through gradient
passes), before and after.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .kernel_hash import KernelizedHash, sign_ste

_logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
_CHUNK_ELEMENTS = 1 << 23  # n×n entries materialised at once by the targets and the agreement metric
_ADAM_BETAS, _ADAM_EPS, _SGD_MOMENTUM = (0.9, 0.999), 1e-8, 0.9
# RMS of the fitted pre-sign values y: ~90% of a Gaussian y lies in the STE window |y| <= 1 (the random initial
# hash has ~100%). Measured on real CIFAR-100 features (README "Hash learning"): RMS 1 raised the gradient reaching
# the first stage's W_qk 1.4-2.8x in one fit, 0.6 keeps the gradient of all W_qk within 0.99-1.09x over 5 fits.
STE_TARGET_RMS = 0.6


def check_pairs(pairs: int, tokens: Optional[int] = None) -> None:
    """``ValueError`` unless pairs >= 1 and, when ``tokens`` (per image) is given, 2·pairs <= tokens."""
    if not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs={pairs!r} is out of range: pairs >= 1")
    if tokens is not None and 2 * pairs > tokens:
        raise ValueError(f"pairs={pairs} needs 2*pairs <= tokens per image, but the fit has {tokens} tokens per "
                         f"image (valid here: 1 <= pairs <= {tokens // 2})")


def check_fit_options(steps: int, lr: float, optimizer: str) -> None:
    """``ValueError`` unless steps >= 0, lr > 0 and optimizer is one of ``OPTIMIZERS``."""
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is out of range: steps >= 0 (0 re-draws anchors only)")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr={lr!r} is out of range: 0 < lr < inf")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; valid: {', '.join(OPTIMIZERS)}")


@dataclass
class PairTargets:
    """Attention targets of G problems of n tokens each (problem g = head·images + image).

    ``similar``/``dissimilar``: (G, n, l) token indices; ``y_sym``: sparse CSR (G·n, G·n), Y + Yᵀ block-diagonal
    over problems; ``y_sq``: (G,) ‖Y‖_F² per problem.
    """

    similar: torch.Tensor
    dissimilar: torch.Tensor
    y_sym: torch.Tensor
    y_sq: torch.Tensor


@dataclass
class HashFitStats:
    """One layer's fit, averaged over heads. ``heads_updated``: heads whose new hash was kept; ``ste_share_*``: share
    of the fit tokens' pre-sign values with |y| <= 1."""

    loss_before: float
    loss_after: float
    agreement_before: float
    agreement_after: float
    ste_share_before: float
    ste_share_after: float
    heads_updated: int


def subsample_tokens(units: torch.Tensor, max_tokens: Optional[int], generator: Optional[torch.Generator] = None,
                     ) -> torch.Tensor:
    """units: (B, N, H, d) -> (B, min(N, max_tokens), H, d), a random subset of tokens per image (all if N fits or
    ``max_tokens`` is None)."""
    images, tokens = units.shape[:2]
    if max_tokens is None or tokens <= max_tokens:
        return units
    order = torch.rand(images, tokens, generator=generator).argsort(1)[:, :max_tokens].to(units.device)
    return units.gather(1, order[:, :, None, None].expand(-1, -1, *units.shape[2:]))


def _chunk_rows(n: int) -> int:
    return max(1, _CHUNK_ELEMENTS // (n * n))


def attention_targets(units: torch.Tensor, pairs: int) -> PairTargets:
    """units: (G, n, d) unit vectors -> targets from the top-l / bottom-l entries of each row of S = u uᵀ."""
    G, n, _ = units.shape
    check_pairs(pairs, n)
    similar, dissimilar = [], []
    for chunk in units.split(_chunk_rows(n)):
        sim = chunk @ chunk.transpose(1, 2)
        similar.append(sim.topk(pairs, dim=-1).indices)
        dissimilar.append(sim.topk(pairs, dim=-1, largest=False).indices)
    similar, dissimilar = torch.cat(similar), torch.cat(dissimilar)

    offset = (torch.arange(G, device=units.device) * n).view(G, 1, 1)
    rows = torch.arange(G * n, device=units.device).view(G, n, 1).expand(G, n, pairs)
    cols = torch.cat([similar + offset, dissimilar + offset], -1).flatten()
    rows = torch.cat([rows, rows], -1).flatten()
    values = torch.ones(G, n, 2 * pairs, device=units.device)
    values[..., pairs:] = -1.0
    y = torch.sparse_coo_tensor(torch.stack([rows, cols]), values.flatten(), (G * n, G * n),
                                check_invariants=False).coalesce()  # overlapping pairs (ties) sum to 0
    y_sq = torch.zeros(G, device=units.device).index_add_(0, y.indices()[0] // n, y.values().square())
    y_sym = (y + y.t()).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        y_sym = torch.sparse_csr_tensor(*_csr_indices(y_sym, G * n), y_sym.values(), y_sym.shape,
                                        check_invariants=False)
    return PairTargets(similar, dissimilar, y_sym, y_sq)


def _csr_indices(coo: torch.Tensor, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """int32 (crow, col) of a coalesced COO matrix (int32 indices: faster sparse products)."""
    row, col = coo.indices()
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=coo.device)
    crow[1:] = torch.bincount(row, minlength=rows).cumsum(0)
    return crow.int(), col.int()


def code_loss(codes: torch.Tensor, targets: PairTargets) -> torch.Tensor:
    """codes: (G, n, b) ±1 -> (G,) mean over all n² pairs of (HHᵀ − bY)², without forming HHᵀ.

    Σ (HHᵀ − bY)² = ‖HᵀH‖_F² − b·Σ_k h_kᵀ (Y + Yᵀ) h_k + b²‖Y‖_F².
    """
    G, n, bits = codes.shape
    gram = codes.transpose(1, 2) @ codes
    cross = (codes * (targets.y_sym @ codes.reshape(G * n, bits)).view(G, n, bits)).sum((1, 2))
    return (gram.square().sum((1, 2)) - bits * cross + bits ** 2 * targets.y_sq) / n ** 2


def neighbour_agreement(codes: torch.Tensor, similar: torch.Tensor) -> torch.Tensor:
    """codes: (G, n, b), similar: (G, n, l) -> (G,) mean share of each token's l attention neighbours that are
    among its l nearest by Hamming affinity hᵢ·hⱼ; tokens tied at the l-th affinity count (l − #above)/#tied."""
    G, n, _ = codes.shape
    pairs = similar.shape[-1]
    shares = []
    for chunk, sim_idx in zip(codes.split(_chunk_rows(n)), similar.split(_chunk_rows(n))):
        affinity = chunk @ chunk.transpose(1, 2)
        threshold = affinity.topk(pairs, dim=-1).values[..., -1:]
        above, tied = affinity > threshold, affinity == threshold
        tie_share = (pairs - above.sum(-1, keepdim=True)) / tied.sum(-1, keepdim=True)
        weight = above.float() + tied.float() * tie_share
        shares.append(weight.gather(-1, sim_idx).sum(-1).mean(-1) / pairs)
    return torch.cat(shares)


def _fit_projection(centred: torch.Tensor, y_sym: torch.Tensor, init: torch.Tensor, images: int, steps: int,
                    lr: float, optimizer: str, target_rms: Optional[float] = STE_TARGET_RMS) -> torch.Tensor:
    """Greedy KSH over bits. centred: K̄ (H, I·n, m); init: A (H, b, m) -> the fitted A (H, b, m).

    Objective of bit r per head: J(a) = −mean_images φᵀ R_r φ / n², φ = tanh(K̄a / 2) = 2·sigmoid(K̄a) − 1,
    with the analytic gradient ∂J/∂a = −K̄ᵀ[(R_r + R_rᵀ)/2 φ ⊙ (1 − φ²)] / (I·n²) (no autograd graph).
    ``target_rms`` (None: off): each kept row a_r is then scaled by target_rms / RMS(K̄a_r), so the pre-sign values
    y = K̄a_r of the fit's tokens have that RMS. Codes sign(K̄a_r) are unchanged, but the straight-through
    gradient (passed where |y| <= 1) stays alive: the steps above grow a_r by ~10x per fit, which leaves
    |y| > 1 almost everywhere.
    """
    heads, tokens, _ = centred.shape
    bits = init.shape[1]
    n = tokens // images
    scale = 1.0 / (images * n * n)
    codes = centred.new_zeros(heads, tokens, bits)
    projection = init.clone()

    for r in range(bits):
        prev = codes[..., :r].view(heads, images, n, r)

        def residual_times(phi: torch.Tensor) -> torch.Tensor:
            """(R_r + R_rᵀ)/2 φ for φ (H, I·n): b/2·(Y + Yᵀ)φ − P(Pᵀφ), per image."""
            out = (0.5 * bits) * (y_sym @ phi.reshape(-1, 1)).view(heads, tokens)
            if r:
                overlap = torch.einsum("hinr,hin->hir", prev, phi.view(heads, images, n))
                out = out - torch.einsum("hinr,hir->hin", prev, overlap).reshape(heads, tokens)
            return out

        start = projection[:, r].clone()
        row = start.clone()
        moment, second = torch.zeros_like(row), torch.zeros_like(row)
        for step in range(1, steps + 1):
            phi = torch.tanh(0.5 * (centred @ row[..., None]).squeeze(-1))
            grad_x = residual_times(phi).mul_(1.0 - phi.square()).mul_(-scale)
            grad = (centred.transpose(1, 2) @ grad_x[..., None]).squeeze(-1)
            if optimizer == "adam":
                moment.lerp_(grad, 1.0 - _ADAM_BETAS[0])
                second.mul_(_ADAM_BETAS[1]).addcmul_(grad, grad, value=1.0 - _ADAM_BETAS[1])
                denom = (second / (1.0 - _ADAM_BETAS[1] ** step)).sqrt_().add_(_ADAM_EPS)
                row.addcdiv_(moment, denom, value=-lr / (1.0 - _ADAM_BETAS[0] ** step))
            else:  # SGD, Nesterov momentum (the authors' rule)
                moment.mul_(_SGD_MOMENTUM).add_(grad)
                row.add_(grad + _SGD_MOMENTUM * moment, alpha=-lr)

        candidates = torch.stack([start, row])  # (2, H, m): keep the new row only if hard signs do better
        signs = torch.copysign(centred.new_ones(()), centred @ candidates[..., None]).squeeze(-1)  # (2, H, I·n)
        gains = torch.stack([(h * residual_times(h)).sum(-1) for h in signs])  # hᵀ R_r h, (2, H)
        better = (gains[1] > gains[0]).long()
        heads_idx = torch.arange(heads, device=centred.device)
        chosen = candidates[better, heads_idx]
        if target_rms is not None:
            rms = (centred @ chosen[..., None]).square().mean((1, 2)).sqrt()  # (H,)
            chosen = chosen * (target_rms / torch.where(rms > 0, rms, torch.ones_like(rms)))[:, None]
        projection[:, r] = chosen
        codes[..., r] = signs[better, heads_idx]
    return projection


@torch.no_grad()
def fit_hash(hash_fn: KernelizedHash, units: torch.Tensor, pairs: int = 10, steps: int = 100, lr: float = 0.3,
             optimizer: str = "adam", generator: Optional[torch.Generator] = None,
             target_rms: Optional[float] = STE_TARGET_RMS) -> HashFitStats:
    """Re-fit ``hash_fn`` in place on ``units`` (I, n, H, d): unit vectors of I images, n tokens each.

    New anchors (drawn from the tokens with ``generator``, a CPU generator: the fit is deterministic for its
    seed), σ, μ and A (warm start from the current A); a per-input-bandwidth hash fits κ with each image's own σ. Per head, the new hash replaces the old one only if its
    loss on these tokens is not higher; a non-finite result keeps the whole previous hash, with a warning.
    Step rule: Adam, lr 0.3 by default, makes the objective fall; the authors' SGD (Nesterov momentum 0.9) at lr 5e-4
    barely moves A at this loss scale (mean over pairs), SGD needs lr ~5 here. ``target_rms``: every fitted row
    of A is scaled to that RMS of y on these tokens (same codes, live straight-through gradient; None: off; see
    :func:`_fit_projection`).
    """
    check_fit_options(steps, lr, optimizer)
    images, n, heads, dim = units.shape
    if (heads, dim) != (hash_fn.num_heads, hash_fn.head_dim):
        raise ValueError(f"units of shape {tuple(units.shape)} do not fit a hash of {hash_fn.num_heads} heads of "
                         f"size {hash_fn.head_dim}; expected (images, tokens, heads, head_dim)")
    check_pairs(pairs, n)
    m = hash_fn.num_anchors
    if images * n < m:
        raise ValueError(f"anchors={m} are drawn from the fit's tokens, but there are only {images * n}")
    u = units.detach().float().permute(2, 0, 1, 3).contiguous()  # (H, I, n, d)
    targets = attention_targets(u.view(heads * images, n, dim), pairs)

    def evaluate(fn: KernelizedHash) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, agreement, share of |y| <= 1), each (H,)."""
        y = fn.project(units).permute(2, 0, 1, 3)  # (H, I, n, b)
        codes = sign_ste(y).reshape(heads * images, n, -1)
        loss = code_loss(codes, targets).view(heads, images).mean(1)
        share = (y.abs() <= 1).flatten(1).float().mean(1)
        return loss, neighbour_agreement(codes, targets.similar).view(heads, images).mean(1), share

    loss_before, agreement_before, share_before = evaluate(hash_fn)

    tokens = u.view(heads, images * n, dim)
    pick = torch.rand(heads, images * n, generator=generator).argsort(-1)[:, :m].to(u.device)
    anchors = tokens.gather(1, pick[..., None].expand(-1, -1, dim))  # (H, m, d)
    sq_dist = (tokens.square().sum(-1, keepdim=True) + anchors.square().sum(-1)[:, None]
               - 2.0 * tokens @ anchors.transpose(1, 2)).clamp_min_(0.0)  # (H, I·n, m)
    bandwidth = sq_dist.mean((1, 2))
    if hash_fn.per_input_bandwidth:  # σ per image and head, as the forward computes it (the authors' code)
        per_image = sq_dist.view(heads, images, n, m)
        kernel = torch.exp(-per_image / (2.0 * per_image.mean((2, 3), keepdim=True))).view_as(sq_dist)
    else:
        kernel = torch.exp(-sq_dist / (2.0 * bandwidth[:, None, None]))
    kernel_mean = kernel.mean(1)
    projection = _fit_projection(kernel - kernel_mean[:, None], targets.y_sym, hash_fn.projection.float(),
                                 images, steps, lr, optimizer, target_rms)

    candidate = copy.deepcopy(hash_fn)
    for name, value in (("anchors", anchors), ("projection", projection), ("kernel_mean", kernel_mean),
                        ("bandwidth", bandwidth)):
        getattr(candidate, name).copy_(value)
    loss_after, agreement_after, share_after = evaluate(candidate)
    finite = all(torch.isfinite(t).all() for t in (*candidate.buffers(), loss_after, agreement_after))
    if not finite:
        _logger.warning("hash fit gave non-finite values; keeping the previous hash")
        keep_new = torch.zeros(heads, dtype=torch.bool, device=u.device)
    else:
        keep_new = ~(loss_after > loss_before)  # also replaces a previous hash whose loss is not finite
    for old, new in zip(hash_fn.buffers(), candidate.buffers()):
        mask = keep_new.view(-1, *([1] * (old.dim() - 1)))
        old.copy_(torch.where(mask, new, old))
    loss_after = torch.where(keep_new, loss_after, loss_before)
    agreement_after = torch.where(keep_new, agreement_after, agreement_before)
    share_after = torch.where(keep_new, share_after, share_before)
    return HashFitStats(loss_before.mean().item(), loss_after.mean().item(), agreement_before.mean().item(),
                        agreement_after.mean().item(), share_before.mean().item(), share_after.mean().item(),
                        int(keep_new.sum()))
