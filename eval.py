#!/usr/bin/env python
"""Evaluate a checkpoint: top-1, top-5, loss on a validation set; the last stdout line is one JSON object.

    python eval.py ckpt=outputs/.../checkpoints/best.ckpt                       # data from the checkpoint
    python eval.py ckpt=best.ckpt data.root=DIR data.batch_size=256 use_ema=true results=res.json
    python eval.py ckpt=pvt_v2_b0.pth model=pvtv2_b0 data=imagenet data.root=DIR   # timm / original-PVT weights
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Tuple

import hydra
from omegaconf import DictConfig, OmegaConf

from attention.bitformer import bit_kernels
from engine import checkpoint as ckpt_io
from engine.build import build_model
from engine.config import ConfigError, validate_data_config
from engine.data import build_dataset, build_loader, build_transform, num_classes_of
from engine.errors import reported_errors
from engine.evaluate import amp_dtype, evaluate, resolve_device
from models import adapt_state_dict, load_checkpoint_state, model_state_of
from models.weights import CheckpointError

log = logging.getLogger("eval")


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


def load_model(cfg: DictConfig) -> Tuple[Any, Any, Dict[str, Any]]:
    """(model with weights, the checkpoint's train config or None, description; its ``classes``: the training
    class names in label order, when the checkpoint has them)."""
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


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> Dict[str, Any]:
    with reported_errors(log):
        return evaluate_checkpoint(cfg)


def evaluate_checkpoint(cfg: DictConfig) -> Dict[str, Any]:
    model, train_cfg, info = load_model(cfg)
    data_cfg = resolve_data(cfg, train_cfg)
    errors: list = []
    validate_data_config(data_cfg, errors)
    if errors:
        raise ConfigError("invalid data configuration:\n  " + "\n  ".join(errors))
    device = resolve_device(cfg.device)
    # folder datasets: labels through the training class index (unknown class folders fail, listed)
    dataset = build_dataset(data_cfg, False, build_transform(data_cfg, train=False), info.pop("classes", None))
    data_classes = num_classes_of(data_cfg, dataset)
    if model.num_classes != data_classes:
        raise ConfigError(f"{cfg.ckpt} predicts {model.num_classes} classes but data={data_cfg.name} "
                          f"(root {data_cfg.get('root')}) has {data_classes}; evaluate it on the classes it was "
                          "trained for")
    loader = build_loader(data_cfg, dataset, False, 0, 1, 0)
    model.to(device)
    if device.type == "cpu" and any(getattr(m, "score_path", None) == "packed" for m in model.modules()):
        bit_kernels()  # build (first use) or load Bitformer's packed-path kernels before the clock starts
    start = time.perf_counter()
    metrics = evaluate(model, loader, device, amp_dtype(cfg.amp, device))
    result = dict(metrics, params=sum(p.numel() for p in model.parameters()), **info, ckpt=str(cfg.ckpt),
                  use_ema=bool(cfg.use_ema), data=data_cfg.name, img_size=int(data_cfg.img_size),
                  seconds=time.perf_counter() - start)
    if cfg.results:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.results)), exist_ok=True)
        with open(cfg.results, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
