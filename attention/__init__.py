"""Attention registry: one name -> one token-mixer class.

Every attention is a module ``forward(x: (B, N, C), feat_size: (H, W)) -> (B, N, C)`` registered with
:func:`register_attention`. Every module in this package is imported on first use, so adding an
attention takes one new file here (with ``@register_attention("name")``) and one ``configs/attn/name.yaml``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Dict, List, Type

from .base import AttentionBase, OpCount

_REGISTRY: Dict[str, Type[AttentionBase]] = {}
_discovered = False


def register_attention(name: str):
    """Class decorator: make ``cls`` available as ``attn=name``."""

    def wrap(cls: Type[AttentionBase]) -> Type[AttentionBase]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.attn_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _discover() -> None:
    global _discovered
    if not _discovered:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _discovered = True


def list_attentions() -> List[str]:
    """Names accepted by ``attn=``, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_attention_class(name: str) -> Type[AttentionBase]:
    """The class registered as ``name``; a ``ValueError`` listing the valid names otherwise."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_attention(name: str, dim: int, num_heads: int, sr_ratio: int = 1, linear: bool = False,
                     qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                     **attn_kwargs: Any) -> AttentionBase:
    """Build attention ``name`` for one block; ``attn_kwargs`` are that attention's own options."""
    cls = get_attention_class(name)
    cls.check_kwargs(attn_kwargs)
    return cls(dim, num_heads=num_heads, sr_ratio=sr_ratio, linear=linear, qkv_bias=qkv_bias,
               attn_drop=attn_drop, proj_drop=proj_drop, **attn_kwargs)


__all__ = ["AttentionBase", "OpCount", "register_attention", "list_attentions", "get_attention_class",
           "create_attention"]
