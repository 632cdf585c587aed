"""Config -> objects: the ``model`` and ``attn`` groups onto ``timm.create_model``, the ``optim`` group onto
``timm.optim.create_optimizer_v2``."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import timm
import timm.optim
import torch
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


def registry_name(optimizer_name: str) -> str:
    """timm's reading of an optimizer name: case-insensitive, a ``lookahead_`` prefix wraps the named optimizer."""
    return optimizer_name.lower().split("_")[-1]


def has_fused_step(optimizer_name: str) -> bool:
    """Whether timm's optimizer ``optimizer_name`` is a torch class with a fused (single-kernel) step (torch's Adam,
    AdamW, SGD, Adagrad). Names timm cannot resolve here (unknown, or bitsandbytes / apex not installed): False."""
    try:
        optimizer_class = timm.optim.get_optimizer_class(registry_name(optimizer_name), bind_defaults=False)
    except (ValueError, ImportError, AssertionError):
        return False
    return "fused" in inspect.signature(optimizer_class).parameters


def optimizer_args(optim_cfg: Any) -> Dict[str, Any]:
    """``optim`` config node -> keyword arguments of ``timm.optim.create_optimizer_v2`` (all but the model and lr).

    ``optim.fused``: null takes torch's fused step (all parameters updated by one kernel, CPU and CUDA) wherever the
    optimizer has one, true requires it, false keeps torch's default implementation (a loop over parameters on
    the CPU, multi-tensor kernels on CUDA).
    """
    name = str(optim_cfg["name"])
    kwargs: Dict[str, Any] = dict(opt=name, weight_decay=float(optim_cfg["weight_decay"]),
                                  momentum=float(optim_cfg["momentum"]), layer_decay=optim_cfg.get("layer_decay"))
    if "adam" in name.lower():
        kwargs.update(eps=float(optim_cfg["eps"]), betas=tuple(optim_cfg["betas"]))
    fused = optim_cfg.get("fused")
    if fused is None:
        fused = has_fused_step(name)
    if fused:
        kwargs["fused"] = True
    return kwargs


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)`` keeping this run's fused / loop choice (``optim.fused``).

    torch restores each param group's options from the saved state, ``fused`` included: a checkpoint written with
    the other choice would silently switch it (and break ``GradScaler``'s fp16 step, which was set up for the
    choice made at construction).
    """
    fused = optimizer.defaults.get("fused")
    groups = [dict(group, fused=fused) if "fused" in group else group for group in state["param_groups"]]
    optimizer.load_state_dict(dict(state, param_groups=groups))
