"""Device / AMP resolution and the validation pass shared by train.py and eval.py."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's CUDA device when available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return device


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on CUDA where supported (else fp16), off on CPU; ``off`` | ``bf16`` | ``fp16`` explicitly."""
    mode = "off" if mode is False else mode  # YAML reads a bare off as false
    if mode == "off" or (mode == "auto" and device.type == "cpu"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type == "cpu":
        raise ValueError("amp=fp16 is not supported on the CPU; use amp=bf16 or amp=off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, dtype: Optional[torch.dtype] = None,
             progress: bool = True) -> Dict[str, float]:
    """Top-1, top-5 (%), mean cross-entropy and image count over ``loader``, summed across processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, images
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum"), hits[:, 0].sum(),
                               hits.any(dim=1).sum(), torch.tensor(len(targets), device=device)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "images": int(count)}
