"""A trained model back from its file: a train.py checkpoint or a bare timm / PVT / authors' weight file, and the
data config to evaluate it with (eval.py, export.py)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Tuple

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from engine import checkpoint as ckpt_io
from engine.build import build_model
from engine.config import ConfigError
from models import adapt_state_dict, load_checkpoint_state, model_state_of
from models.weights import CheckpointError

log = logging.getLogger(__name__)


def resolve_data(cfg: DictConfig, train_cfg: Any) -> DictConfig:
    """``data=<name>`` as chosen; otherwise the checkpoint's data config with the non-null keys of ``cfg.data``."""
    if cfg.data.get("img_size") is not None and cfg.data.name is not None:  # a whole data config (data=<name>)
        return cfg.data
    if cfg.data.name is not None and (train_cfg is None or cfg.data.name != train_cfg.data.name):
        raise ConfigError(f"data.name={cfg.data.name}: choose another dataset with data={cfg.data.name} "
                          "(the group), not data.name")
    if train_cfg is None:
        raise ConfigError("this weight file carries no data config: choose one with data=<cifar100|imagenet|folder|"
                          "fake> data.root=DIR")
    data = OmegaConf.create(OmegaConf.to_container(train_cfg.data))
    for key, value in cfg.data.items():
        if value is not None:
            data[key] = value
    return data


def load_model(cfg: DictConfig) -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """(model with weights, the checkpoint's train config or None, description; its ``classes``: the training
    class names in label order, when the checkpoint has them) from ``cfg.ckpt``, ``cfg.use_ema`` and, for bare
    weight files, ``cfg.model`` / ``cfg.attn`` (``cfg.attn`` also changes a checkpoint's attention options, e.g.
    ``attn=bitformer attn.score_path=packed``)."""
    path = cfg.ckpt
    state = ckpt_io.load(path) if not str(path).endswith(".safetensors") else {}
    if isinstance(state.get("config"), dict):  # a train.py checkpoint
        train_cfg = OmegaConf.create(state["config"])
        weights = state["model_ema"] if cfg.use_ema else state["model"]
        if weights is None:
            raise ConfigError(f"use_ema=true but {path} has no EMA weights (trained with ema.enabled=false)")
        if cfg.get("attn") is not None:  # e.g. attn=bitformer attn.score_path=packed: same attention, other options
            if cfg.attn.name != train_cfg.attn.name:
                raise ConfigError(f"attn={cfg.attn.name}: {path} was trained with attn={train_cfg.attn.name}; "
                                  "only that attention's options can be changed")
            train_cfg.attn = OmegaConf.merge(train_cfg.attn, cfg.attn)
        model = build_model(train_cfg.model, train_cfg.attn, int(weights["head.weight"].shape[0]),
                            load_pretrained=False)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: its weights do not fit attn={train_cfg.attn.name} with the options "
                                  f"given ({str(err).splitlines()[0]}); drop the attn.* overrides that change "
                                  "shapes") from None
        return model, train_cfg, {"model": train_cfg.model.name, "attn": train_cfg.attn.name,
                                  "epoch": int(state["epoch"]), "classes": state.get("classes")}
    if cfg.get("model") is None:
        raise ConfigError(f"{path} is a bare weight file: name its model with model=<pvtv2_b0|...> "
                          "(and attn=<name> if not softmax)")
    weights = (model_state_of(state, bool(cfg.use_ema), str(path)) if state  # already loaded above
               else load_checkpoint_state(path, use_ema=bool(cfg.use_ema)))
    head = weights.get("head.weight")
    attn_cfg = cfg.get("attn") or {"name": "softmax"}
    model = build_model(cfg.model, attn_cfg, int(head.shape[0]) if head is not None else 1000, load_pretrained=False)
    try:
        adapted, report = adapt_state_dict(weights, model)
    except ValueError as err:
        raise CheckpointError(f"ckpt={path}: {err}") from None
    model.load_state_dict(adapted)
    log.info("loaded %s: %s", path, {k: len(v) for k, v in report.items()})
    return model, None, {"model": cfg.model.name, "attn": attn_cfg["name"]}
