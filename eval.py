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
from typing import Any, Dict

import hydra
import torch
from omegaconf import DictConfig

from attention.bitformer import bit_kernels
from engine import deploy
from engine.config import ConfigError, validate_data_config
from engine.data import build_dataset, build_loader, build_transform, num_classes_of
from engine.errors import reported_errors
from engine.evaluate import amp_dtype, evaluate, resolve_device
from engine.restore import load_model, resolve_data

log = logging.getLogger("eval")


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> Dict[str, Any]:
    with reported_errors(log):
        return evaluate_checkpoint(cfg)


def evaluate_checkpoint(cfg: DictConfig) -> Dict[str, Any]:
    onnx_file = str(cfg.ckpt).endswith(".onnx")
    if onnx_file:  # an export.py file: onnxruntime, preprocessing and description from its metadata
        try:
            model, train_cfg, info = deploy.load_onnx(str(cfg.ckpt))
            data_cfg = deploy.apply_preprocessing(resolve_data(cfg, train_cfg), info.pop("preprocessing"))
        except deploy.DeployError as err:
            raise ConfigError(str(err)) from None
    else:
        model, train_cfg, info = load_model(cfg)
        info.update(runtime="pytorch", use_ema=bool(cfg.use_ema))
        data_cfg = resolve_data(cfg, train_cfg)
    errors: list = []
    validate_data_config(data_cfg, errors)
    if errors:
        raise ConfigError("invalid data configuration:\n  " + "\n  ".join(errors))
    device = torch.device("cpu") if onnx_file else resolve_device(cfg.device)
    # folder datasets: labels through the training class index (unknown class folders fail, listed)
    dataset = build_dataset(data_cfg, False, build_transform(data_cfg, train=False), info.pop("classes", None))
    data_classes = num_classes_of(data_cfg, dataset)
    if getattr(model, "num_classes", data_classes) != data_classes:
        raise ConfigError(f"{cfg.ckpt} predicts {model.num_classes} classes but data={data_cfg.name} "
                          f"(root {data_cfg.get('root')}) has {data_classes}; evaluate it on the classes it was "
                          "trained for")
    loader = build_loader(data_cfg, dataset, False, 0, 1, 0)
    model.to(device)
    if device.type == "cpu" and any(getattr(m, "score_path", None) == "packed" for m in model.modules()):
        bit_kernels()  # build (first use) or load Bitformer's packed-path kernels before the clock starts
    start = time.perf_counter()
    metrics = evaluate(model, loader, device, amp_dtype(cfg.amp, device))
    params = info.pop("params", None) or sum(p.numel() for p in model.parameters())
    result = dict(metrics, params=params, **info, ckpt=str(cfg.ckpt), data=data_cfg.name,
                  img_size=int(data_cfg.img_size), seconds=time.perf_counter() - start)
    if cfg.results:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.results)), exist_ok=True)
        with open(cfg.results, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
