#!/usr/bin/env python
"""Export a trained model to ONNX for edge runtimes; the last stdout line is one JSON object.

    python export.py ckpt=outputs/.../checkpoints/best.ckpt                    # -> .../checkpoints/best.onnx
    python export.py ckpt=best.ckpt out=b0.onnx img_size=224 dynamic=size quantize=dynamic
    python export.py ckpt=pvt_v2_b0.pth model=pvtv2_b0 attn=ecoformer         # bare timm / PVT / authors' weights

Bitformer keeps its bitwise scores in the graph (BitwiseXor + a popcount table, ``score_path=packed``), EcoFormer its
hash signs from comparisons (engine/deploy.py). After writing: ``onnx.checker`` full check, then onnxruntime against
PyTorch on a fixed batch (max / median |diff|, top-1 agreement), and the count of each bitwise op in the graph.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from attention.bitformer import SCORE_PATHS, BitformerAttention
from engine import deploy
from engine.config import ConfigError
from engine.restore import load_model

log = logging.getLogger("export")


def default_out(ckpt: str) -> str:
    """``<dir>/<name>.onnx`` beside the checkpoint ``<dir>/<name>.<ext>``."""
    return os.path.splitext(ckpt)[0] + ".onnx"


def int8_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".int8.onnx"


def file_report(path: str, model: torch.nn.Module, img_size: int, batch: int) -> Dict[str, Any]:
    """Full check, then onnxruntime against PyTorch and the graph's bitwise ops, for one written file."""
    proto = deploy.check_file(path)
    return dict(path=path, bytes=os.path.getsize(path), **deploy.verify(path, model, img_size, batch),
                bitwise_ops=deploy.op_counts(proto))


@hydra.main(config_path="configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> Dict[str, Any]:
    torch.manual_seed(0)
    try:
        if cfg.score_path not in SCORE_PATHS:
            raise ConfigError(f"score_path={cfg.score_path}: valid values are {', '.join(SCORE_PATHS)}")
        if cfg.quantize not in deploy.QUANTIZE:
            raise ConfigError(f"quantize={cfg.quantize}: valid values are {', '.join(deploy.QUANTIZE)}")
        model, train_cfg, info = load_model(cfg)
        for module in model.modules():
            if isinstance(module, BitformerAttention):
                module.score_path = cfg.score_path
        data_cfg = OmegaConf.to_container(train_cfg.data, resolve=True) if train_cfg is not None else None
        default_size = data_cfg["img_size"] if data_cfg else model.pretrained_cfg["input_size"][-1]
        img_size = int(cfg.img_size or default_size)
        model.eval()
        deploy.check_exportable(model, img_size, cfg.dynamic, int(cfg.opset))
    except (ConfigError, deploy.DeployError) as err:
        log.error("%s", err)
        raise SystemExit(2) from None
    out = str(cfg.out or default_out(str(cfg.ckpt)))
    metadata = dict(info, **deploy.attention_options(model), params=sum(p.numel() for p in model.parameters()),
                    num_classes=int(model.num_classes), use_ema=bool(cfg.use_ema), dynamic=cfg.dynamic,
                    preprocessing=deploy.preprocessing_of(data_cfg, model, img_size), data=data_cfg,
                    ckpt=os.path.basename(str(cfg.ckpt)), ckpt_sha256=deploy.file_sha256(str(cfg.ckpt)),
                    opset=int(cfg.opset), versions=deploy.library_versions())
    start = time.perf_counter()
    log.info("exporting %s (%s, %d px, dynamic=%s) to %s", info["model"], metadata["attn"], img_size, cfg.dynamic, out)
    deploy.export_onnx(model, out, img_size, int(cfg.opset), cfg.dynamic, metadata=dict(metadata, quantize="none"),
                       optimize=bool(cfg.optimize))
    result = dict(file_report(out, model, img_size, int(cfg.verify.batch)), opset=int(cfg.opset), model=info["model"],
                  attn=metadata["attn"], attn_options=metadata["attn_options"], img_size=img_size, dynamic=cfg.dynamic)
    if cfg.quantize == "dynamic":
        deploy.quantize_int8(out, int8_path(out))
        deploy.set_metadata(int8_path(out), dict(metadata, quantize="dynamic"))
        result["int8"] = file_report(int8_path(out), model, img_size, int(cfg.verify.batch))
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result), flush=True)
    if result["top1_agreement"] < cfg.verify.min_agreement:
        log.error("verification failed: onnxruntime's top-1 agrees with PyTorch on %.1f%% of %d images (min %.1f%%); "
                  "%s is written but does not compute the model", 100 * result["top1_agreement"], result["images"],
                  100 * cfg.verify.min_agreement, out)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
