#!/usr/bin/env python
"""Parameters, multiply-accumulates, multiplications, additions, bitwise operations and energy per image (DESIGN §6).

    python scripts/energy.py model=pvtv2_b0 attn=ecoformer data.img_size=224
    python scripts/energy.py attn=softmax attn.sr=false          # full MSA, the EcoFormer paper's baseline
    python scripts/energy.py all=true [data.img_size=448]         # markdown table: every model x attention

energy = mul_pj·mul + add_pj·add + bitop_pj·bitops (3.7 pJ, 0.9 pJ, 0.1 pJ by default; configs/energy.yaml).
Counts come from a real forward pass with hooks (models/ops.py). The last stdout line is one JSON object.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
import timm  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from engine.build import build_model  # noqa: E402
from models import count_model_ops  # noqa: E402

log = logging.getLogger("energy")

# label, overrides: the attention columns of `all=true`
ATTENTIONS: List[Tuple[str, List[str]]] = [
    ("softmax SRA", ["attn=softmax"]),
    ("softmax MSA", ["attn=softmax", "attn.sr=false"]),
    ("EcoFormer", ["attn=ecoformer"]),
    ("Bitformer", ["attn=bitformer"]),
]


def attn_label(attn_cfg: DictConfig) -> str:
    """``softmax (MSA)`` for softmax without spatial reduction, else the attention name."""
    if attn_cfg.name == "softmax" and not attn_cfg.get("sr", True):
        return "softmax (MSA)"
    return str(attn_cfg.name)


def report(cfg: DictConfig) -> Dict[str, Any]:
    """Counts of the configured model at ``cfg.img_size`` as one flat dict (the JSON line)."""
    if cfg.num_classes is None:
        raise ValueError("num_classes is unknown for this data config; pass num_classes=N")
    model = build_model(cfg.model, cfg.attn, num_classes=int(cfg.num_classes))
    counts = count_model_ops(model, int(cfg.img_size), mul_pj=cfg.mul_pj, add_pj=cfg.add_pj, bitop_pj=cfg.bitop_pj)
    for name, ops in counts.pop("attention").items():
        log.debug("%-22s feat %-11s mul %.4g add %.4g bitops %.4g", name, "x".join(map(str, ops["feat_size"])),
                 ops["mul"], ops["add"], ops["bitops"])
    options = OmegaConf.to_container(cfg.attn, resolve=True)
    return dict(model=str(cfg.model.name), attn=str(cfg.attn.name), attn_label=attn_label(cfg.attn),
                attn_options={k: v for k, v in options.items() if k != "name"}, img_size=int(cfg.img_size),
                num_classes=int(cfg.num_classes), **counts, mul_pj=cfg.mul_pj, add_pj=cfg.add_pj,
                bitop_pj=cfg.bitop_pj)


def print_report(r: Dict[str, Any]) -> None:
    print(f"model        {r['model']}, attention {r['attn_label']} {r['attn_options']}")
    print(f"input        {r['img_size']} x {r['img_size']} px, {r['num_classes']} classes")
    print(f"parameters   {r['params'] / 1e6:.2f} M")
    print(f"MACs         {r['macs'] / 1e9:.3f} G   (Linear, Conv2d incl. bias, LayerNorm x2; 1 mul + 1 add each)")
    print(f"attention    mul {r['attn_mul'] / 1e9:.3f} G, add {r['attn_add'] / 1e9:.3f} G  (count_ops per block)")
    print(f"mul          {r['mul'] / 1e9:.3f} G")
    print(f"add          {r['add'] / 1e9:.3f} G")
    print(f"bitops       {r['bitops'] / 1e6:.3f} M")
    if r["uncalled_layers"]:
        print(f"NOT COUNTED  layers never called by the forward: {', '.join(r['uncalled_layers'])}")
    print(f"energy       {r['energy_pj']:.3e} pJ  = {r['mul_pj']} pJ x mul + {r['add_pj']} pJ x add "
          f"+ {r['bitop_pj']} pJ x bitops")


def table(cfg: DictConfig) -> Dict[str, Any]:
    """Every registered model x ATTENTIONS at the configured size; prints a markdown table."""
    keep = [o for o in HydraConfig.get().overrides.task
            if not o.split("=")[0].lstrip("+~").startswith(("model", "attn", "all"))]
    rows: List[Dict[str, Any]] = []
    print(f"Per image at {cfg.img_size} x {cfg.img_size} px, {cfg.num_classes} classes; energy = {cfg.mul_pj} pJ x "
          f"mul + {cfg.add_pj} pJ x add + {cfg.bitop_pj} pJ x bitops.\n")
    print("| model | attention | params (M) | mul (G) | add (G) | bitops (M) | energy (pJ) | energy / SRA "
          "| energy / MSA |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model_name in timm.list_models("pvtv2_*"):
        base: Dict[str, float] = {}  # energy of softmax SRA / MSA, the denominators of the ratio columns
        for label, overrides in ATTENTIONS:
            sub = hydra.compose("energy", overrides=[f"model={model_name}", *overrides, *keep])
            try:
                r = report(sub)
            except NotImplementedError as err:
                log.warning("%s %s: %s", model_name, label, err)
                rows.append(dict(model=model_name, attn_label=label, skipped=str(err)))
                print(f"| {model_name} | {label} | not implemented | | | | | | |")
                continue
            base[label] = r["energy_pj"]
            rows.append(r)
            ratio = {k: f"{r['energy_pj'] / base[k]:.2f}" if base.get(k) else ""
                     for k in ("softmax SRA", "softmax MSA")}
            print(f"| {model_name} | {label} | {r['params'] / 1e6:.2f} | {r['mul'] / 1e9:.2f} | {r['add'] / 1e9:.2f} | "
                  f"{r['bitops'] / 1e6:.2f} | {r['energy_pj']:.2e} | {ratio['softmax SRA']} | {ratio['softmax MSA']} |")
    return dict(img_size=int(cfg.img_size), num_classes=int(cfg.num_classes), rows=rows)


@hydra.main(version_base="1.3", config_path="../configs", config_name="energy")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if cfg.all:
        result = table(cfg)
    else:
        result = report(cfg)
        print_report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
