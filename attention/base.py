"""What every attention shares: the interface, spatial reduction (SRA) and the operation count."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn


@dataclass
class OpCount:
    """Operation counts of one forward pass of one image (DESIGN §6)."""

    mul: float = 0.0
    add: float = 0.0
    bitops: float = 0.0

    def __add__(self, other: "OpCount") -> "OpCount":
        return OpCount(self.mul + other.mul, self.add + other.add, self.bitops + other.bitops)


class AttentionBase(nn.Module):
    """Base of every token mixer.

    Subclasses implement ``forward(x: (B, N, C), feat_size: (H, W)) -> (B, N, C)`` and
    ``count_ops(feat_size) -> OpCount`` (the attention products only: the Linear, Conv2d and LayerNorm
    layers inside are counted by walking the model). ``attn_name`` is set by the registry;
    ``default_stages`` is used when the model is built with ``attn_stages=None``.
    """

    attn_name: str = ""
    default_stages: Tuple[int, ...] = (0, 1, 2, 3)

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

    @classmethod
    def option_names(cls) -> List[str]:
        """The attention's own options (constructor keywords beyond the shared block arguments)."""
        shared = {"self", "dim", "num_heads", "sr_ratio", "linear", "qkv_bias", "attn_drop", "proj_drop"}
        return [p for p in inspect.signature(cls.__init__).parameters if p not in shared]

    @classmethod
    def check_kwargs(cls, kwargs: Mapping[str, Any]) -> None:
        unknown = sorted(set(kwargs) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for attention {cls.attn_name!r}; "
                             f"valid options: {cls.option_names()}")

    def build_reduction(self, sr_ratio: int, linear: bool) -> None:
        """Keys/values token reduction of PVTv2's SRA (DESIGN §1-2), parameters named as in timm.

        ``sr_ratio > 1``: conv k=s=sr_ratio then LayerNorm, M = N / sr_ratio². ``linear``: adaptive average
        pool to 7x7, 1x1 conv, LayerNorm, GELU, M = 49. Otherwise the tokens pass unchanged (M = N).
        """
        self.pool = nn.AdaptiveAvgPool2d(7) if linear else None
        self.act = nn.GELU() if linear else None
        if linear or sr_ratio > 1:
            kernel = 1 if linear else sr_ratio
            self.sr = nn.Conv2d(self.dim, self.dim, kernel_size=kernel, stride=kernel)
            self.norm = nn.LayerNorm(self.dim)
        else:
            self.sr = None
            self.norm = None

    def reduce(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """(B, N, C) tokens on an H x W grid -> (B, M, C) key/value tokens."""
        if self.sr is None:
            return x
        B, N, C = x.shape
        grid = x.transpose(1, 2).reshape(B, C, feat_size[0], feat_size[1])
        if self.pool is not None:
            grid = self.pool(grid)
        x = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        return self.act(x) if self.act is not None else x

    def reduced_tokens(self, feat_size: Sequence[int]) -> int:
        """M, the number of key/value tokens for an H x W query grid."""
        H, W = feat_size
        if getattr(self, "pool", None) is not None:
            return 49
        if getattr(self, "sr", None) is None:
            return H * W
        k = self.sr.kernel_size[0]
        return (H // k) * (W // k)

    def count_ops(self, feat_size: Sequence[int]) -> OpCount:
        raise NotImplementedError

    def adapt_softmax_state(self, state: Dict[str, torch.Tensor], report: Dict[str, List[str]],
                            prefix: str) -> Dict[str, torch.Tensor]:
        """Map this block's keys of a softmax (SRA or MSA) checkpoint onto this module.

        ``state`` holds the checkpoint's tensors under this module's prefix (keys relative to it). Returns
        a state dict for this module; records ``prefix + key`` under ``report['converted' | 'copied' |
        'dropped' | 'new']``. Default: copy every tensor whose name and shape match, keep the module's own
        initialisation for the rest.
        """
        own = self.state_dict()
        out = {}
        for key, value in own.items():
            if key in state and state[key].shape == value.shape:
                out[key] = state[key]
                report["copied"].append(prefix + key)
            else:
                out[key] = value
                report["new"].append(prefix + key)
        report["dropped"].extend(prefix + k for k in state if k not in out or state[k].shape != own[k].shape)
        return out
