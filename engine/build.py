"""Config -> model: the one place that maps the ``model`` and ``attn`` config groups onto ``timm.create_model``."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import timm
import timm.optim
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

import models  # noqa: F401 (registers pvtv2_* with timm)
from attention import get_attention_class


def attention_args(attn_cfg: Any) -> Dict[str, Any]:
    """``attn`` config node -> ``attn``, ``attn_kwargs``, ``attn_stages`` keyword arguments of the model."""
    options = OmegaConf.to_container(attn_cfg, resolve=True) if isinstance(attn_cfg, DictConfig) else dict(attn_cfg)
    name = options.pop("name")
    stages = options.pop("stages", None)
    get_attention_class(name).check_kwargs(options)
    return dict(attn=name, attn_kwargs=options, attn_stages=None if stages is None else list(stages))


def build_model(model_cfg: Any, attn_cfg: Any, num_classes: Optional[int] = None, load_pretrained: bool = True,
                **overrides: Any) -> nn.Module:
    """Build the configured PVTv2 (``model.name``) with the configured attention.

    ``model.pretrained`` / ``model.pretrained_file`` load timm's PVTv2 ImageNet weights (converted to the attention)
    unless ``load_pretrained`` is false (weights about to be replaced: resume, evaluation, checks).
    """
    name = model_cfg["name"]
    valid = timm.list_models("pvtv2_*")
    if name not in valid:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(valid)}")
    kwargs: Dict[str, Any] = dict(attention_args(attn_cfg), drop_rate=model_cfg.get("drop_rate", 0.0),
                                  drop_path_rate=model_cfg.get("drop_path_rate", 0.0), **overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    pretrained_file = model_cfg.get("pretrained_file") if load_pretrained else None
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
    pretrained = load_pretrained and bool(model_cfg.get("pretrained") or pretrained_file)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def has_fused_step(optimizer_name: str) -> bool:
    """Whether timm's optimizer ``optimizer_name`` is a torch class with a fused (single-kernel) step: Adam, AdamW, SGD."""
    optimizer_class = timm.optim.get_optimizer_class(optimizer_name, bind_defaults=False)
    return "fused" in inspect.signature(optimizer_class).parameters


def optimizer_kwargs(optim_cfg: Any) -> Dict[str, Any]:
    """``optim`` config node -> keyword arguments of ``timm.optim.create_optimizer_v2`` (all but the model and lr).

    ``optim.fused``: null takes torch's fused step (all parameters updated by one kernel, on CPU and CUDA; about 4x
    faster than the per-list loop for PVTv2-B0's ~200 tensors) wherever the optimizer has one, true requires it,
    false keeps torch's multi-tensor loop.
    """
    name = str(optim_cfg["name"])
    kwargs: Dict[str, Any] = dict(opt=name, weight_decay=float(optim_cfg["weight_decay"]),
                                  momentum=float(optim_cfg["momentum"]), layer_decay=optim_cfg.get("layer_decay"))
    if "adam" in name:
        kwargs.update(eps=float(optim_cfg["eps"]), betas=tuple(optim_cfg["betas"]))
    fused = optim_cfg.get("fused")
    if fused is None:
        fused = has_fused_step(name)
    if fused:
        kwargs["fused"] = True
    return kwargs
