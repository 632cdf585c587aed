"""Hash learning during training (DESIGN §4): every τ epochs, re-fit each kernelized hash, layer by layer.

Usage in a training loop (pass the unwrapped model, not DDP)::

    callback = HashLearningCallback(fixed_images, every_epochs=1)
    for epoch in range(epochs):
        stats = callback.on_epoch_start(model, epoch)  # before the epoch's first optimizer step; None if not due
        ...
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, fields
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .fit import STE_TARGET_RMS, HashFitStats, check_fit_options, check_pairs, fit_hash, subsample_tokens
from .kernel_hash import KernelizedHash

_logger = logging.getLogger(__name__)


class _UnitsCaptured(Exception):
    """Raised by the capture hook to end a forward pass once the fitted layer's unit vectors are in."""


class HashLearningCallback:
    """Re-fits every :class:`KernelizedHash` of a model on fixed images every ``every_epochs`` (τ) epochs.

    Layers are fitted in forward order, each on the unit vectors u it receives from a forward pass (eval mode,
    no_grad, stopped at that layer) in which every earlier layer already uses its new hash. Under
    torch.distributed, rank 0 fits and broadcasts each layer's buffers before the next layer, so all replicas
    end with identical hashes.

    Args:
        images: (n, 3, H, W) fixed training images (kept on CPU, moved to the model's device in batches).
        every_epochs: τ >= 1; fits at epochs 0, τ, 2τ, ...
        max_tokens: tokens subsampled per image, bounding each problem to max_tokens² pairs; None: all tokens.
        pairs: l >= 1 similar and l dissimilar pairs per token; a layer with fewer than 2l tokens per image is
            fitted with l = tokens // 2.
        steps, lr, optimizer: gradient steps per bit and the step rule (see :func:`hashing.fit.fit_hash`).
        target_rms: scale each fitted row of A to this RMS of y (same codes, live straight-through gradient);
            None: no rescaling.
        seed: fits are deterministic for (seed, epoch).
        batch_size: images per forward pass.
    """

    def __init__(self, images: torch.Tensor, every_epochs: int = 1, max_tokens: Optional[int] = 256, pairs: int = 10,
                 steps: int = 100, lr: float = 0.3, seed: int = 0, batch_size: int = 32,
                 optimizer: str = "adam", target_rms: Optional[float] = STE_TARGET_RMS) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a non-empty (n, C, H, W) tensor, got {shape}")
        if not isinstance(every_epochs, int) or every_epochs < 1:
            raise ValueError(f"every_epochs={every_epochs!r} is out of range: tau = every_epochs >= 1")
        check_pairs(pairs)
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2 * pairs):
            raise ValueError(f"max_tokens={max_tokens!r} is out of range: max_tokens >= 2*pairs = {2 * pairs} "
                             "(or None for all tokens)")
        check_fit_options(steps, lr, optimizer)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is out of range: batch_size >= 1")
        self.images = images.detach().cpu()
        self.every_epochs, self.max_tokens, self.pairs = every_epochs, max_tokens, pairs
        self.steps, self.lr, self.optimizer, self.seed, self.batch_size = steps, lr, optimizer, seed, batch_size
        if target_rms is not None and not target_rms > 0:
            raise ValueError(f"target_rms={target_rms!r} is out of range: target_rms > 0, or None for no rescaling")
        self.target_rms = target_rms

    def should_fit(self, epoch: int) -> bool:
        """True at epochs 0, τ, 2τ, ..."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} is out of range: epoch >= 0")
        return epoch % self.every_epochs == 0

    def on_epoch_start(self, model: nn.Module, epoch: int) -> Optional[Dict[str, Dict[str, float]]]:
        """Re-fit the model's hashes when ``should_fit(epoch)``; per-layer stats, or None when not due."""
        return self.fit(model, epoch) if self.should_fit(epoch) else None

    def fit(self, model: nn.Module, epoch: int = 0) -> Dict[str, Dict[str, float]]:
        """Re-fit every hash of ``model`` now. Returns {layer name: loss/agreement before/after, heads_updated,
        seconds}; identical on all ranks."""
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        param = next(model.parameters())
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
        distributed = dist.is_available() and dist.is_initialized()
        fits_here = not distributed or dist.get_rank() == 0
        results: Dict[str, Dict[str, float]] = {}
        try:
            with torch.no_grad():
                for name, hash_fn in self._hashes_in_forward_order(model, param):
                    start = time.perf_counter()
                    stats = torch.zeros(len(fields(HashFitStats)), dtype=torch.float64)
                    if fits_here:
                        units = self._collect_units(model, hash_fn, generator, param)
                        pairs = min(self.pairs, units.shape[1] // 2)
                        if pairs < 1:
                            raise ValueError(f"{name} sees {units.shape[1]} token per image at this image size: "
                                             "too few to fit a hash; leave its stage out of attn.stages or use "
                                             "larger images (data.img_size)")
                        if pairs < self.pairs:  # small token grids (e.g. 4x4 tokens of a 32 px image in stage 1)
                            _logger.info("%s has %d tokens per image: fitting with pairs=%d instead of %d", name,
                                         units.shape[1], pairs, self.pairs)
                        fitted = fit_hash(hash_fn, units, pairs, self.steps, self.lr, self.optimizer, generator,
                                          self.target_rms)
                        stats = torch.tensor(list(asdict(fitted).values()), dtype=torch.float64)
                    if distributed:
                        stats = stats.to(hash_fn.anchors.device)
                        for buffer in hash_fn.buffers():
                            dist.broadcast(buffer, src=0)
                        dist.broadcast(stats, src=0)
                    layer = dict(zip([f.name for f in fields(HashFitStats)], stats.tolist()))
                    layer["heads_updated"] = int(layer["heads_updated"])
                    layer["seconds"] = time.perf_counter() - start
                    results[name] = layer
                    _logger.info("hash fit epoch %d %s: loss %.3f -> %.3f, top-%d agreement %.3f -> %.3f, "
                                 "|y|<=1 share %.3f -> %.3f, %d/%d heads updated, %.2fs", epoch, name,
                                 layer["loss_before"], layer["loss_after"], self.pairs, layer["agreement_before"],
                                 layer["agreement_after"], layer["ste_share_before"], layer["ste_share_after"],
                                 layer["heads_updated"], hash_fn.num_heads, layer["seconds"])
        finally:
            for module, mode in modes:
                module.training = mode
        return results

    def _hashes_in_forward_order(self, model: nn.Module, param: torch.Tensor
                                 ) -> List[Tuple[str, KernelizedHash]]:
        """(layer name, hash) pairs in the order one forward pass calls them."""
        named = {module: name.removesuffix(".hash") for name, module in model.named_modules()
                 if isinstance(module, KernelizedHash)}
        order: List[KernelizedHash] = []
        handles = [module.register_forward_pre_hook(lambda mod, args: order.append(mod) if mod not in order
                                                    else None) for module in named]
        try:
            model(self.images[:1].to(device=param.device, dtype=param.dtype))
        finally:
            for handle in handles:
                handle.remove()
        return [(named[module], module) for module in order]

    def _collect_units(self, model: nn.Module, hash_fn: KernelizedHash, generator: torch.Generator,
                       param: torch.Tensor) -> torch.Tensor:
        """Unit vectors reaching ``hash_fn`` for every image: (n_images, tokens, H, d), tokens subsampled."""
        captured: List[torch.Tensor] = []

        def grab(units: torch.Tensor) -> None:
            if units.ndim != 4:
                raise ValueError(f"hash learning expects (B, N, H, d) hash inputs, got shape {tuple(units.shape)}")
            captured.append(subsample_tokens(units, self.max_tokens, generator))
            raise _UnitsCaptured

        handle = hash_fn.register_unit_hook(grab)
        try:
            for batch in self.images.split(self.batch_size):
                try:
                    model(batch.to(device=param.device, dtype=param.dtype))
                except _UnitsCaptured:
                    pass
        finally:
            handle.remove()
        return torch.cat(captured)
