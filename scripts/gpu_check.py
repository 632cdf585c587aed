#!/usr/bin/env python
"""The Python steps of scripts/gpu_check.sh.

    python scripts/gpu_check.py hash-fit OUT.json   # fit every EcoFormer hash of pvtv2_b0 on the GPU, write its stats
    python scripts/gpu_check.py summary DIR         # DIR/gpu_check.json from DIR/steps.tsv, logs and results; exit 1
                                                    # if a step failed
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BENCH_KEYS = ["label", "size", "batch", "infer_img_s", "train_img_s", "limit_speed_vs_timm", "infer_speed_vs_timm",
              "train_speed_vs_timm", "infer_mem_mb", "train_mem_mb", "infer_mem_vs_timm", "train_mem_vs_timm", "status"]


def hash_fit(path: str) -> None:
    """HashLearningCallback.fit of an EcoFormer pvtv2_b0 on CUDA (32 images at 224 px, configs' defaults): the
    buffers stay on the GPU and every layer's loss goes down."""
    import timm
    import torch

    import models  # noqa: F401 (registers pvtv2_*)
    from hashing import HashLearningCallback

    model = timm.create_model("pvtv2_b0", attn="ecoformer", num_classes=10).cuda()
    callback = HashLearningCallback(torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    torch.cuda.synchronize()
    start = time.perf_counter()
    stats = callback.fit(model, epoch=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    devices = sorted({str(b.device) for name, b in model.named_buffers() if ".hash." in name})
    result = dict(seconds=seconds, layers=len(stats), buffer_devices=devices,
                  loss_before=[s["loss_before"] for s in stats.values()],
                  loss_after=[s["loss_after"] for s in stats.values()])
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    if not stats or devices != [str(torch.device("cuda", torch.cuda.current_device()))]:
        raise SystemExit(f"hash fit: expected EcoFormer hashes on the GPU, got {devices} ({len(stats)} layers)")
    if any(after >= before for before, after in zip(result["loss_before"], result["loss_after"])):
        raise SystemExit("hash fit: a layer's loss did not go down on the GPU")


def _tail(path: str, lines: int = 5) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip() for line in f.readlines()[-lines:]]
    except OSError:
        return []


def _json(path: str) -> Any:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    for candidate in (text, text.splitlines()[-1] if text else ""):  # one JSON document, or JSON as the last line
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def summary(out: str) -> int:
    """Write and print out/gpu_check.json; 0 if every step exited 0, else 1."""
    import torch

    steps: List[Dict[str, Any]] = []
    with open(os.path.join(out, "steps.tsv")) as f:
        for name, rc, ms, cmd in csv.reader(f, delimiter="\t"):
            step = dict(name=name, rc=int(rc), seconds=int(ms) / 1e3, command=cmd, log=f"logs/{name}.log")
            if step["rc"] != 0:
                step["log_tail"] = _tail(os.path.join(out, step["log"]))
            steps.append(step)
    bench_csv = os.path.join(out, "bench", "models.csv")
    bench: List[Dict[str, str]] = []
    if os.path.exists(bench_csv):
        with open(bench_csv, newline="") as f:
            bench = [{k: row[k] for k in BENCH_KEYS} for row in csv.DictReader(f)]
    result = dict(ok=all(s["rc"] == 0 for s in steps), failed=[s["name"] for s in steps if s["rc"] != 0],
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  torch=torch.__version__, cuda=torch.version.cuda, total_seconds=sum(s["seconds"] for s in steps),
                  steps=steps, hash_fit=_json(os.path.join(out, "hash_fit.json")),
                  eval={name: _json(os.path.join(out, f"eval_{name}.json"))
                        for name in ("ecoformer", "bitformer_packed")},
                  benchmark=bench)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def main(argv: List[str]) -> int:
    if len(argv) == 2 and argv[0] == "hash-fit":
        hash_fit(argv[1])
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        return summary(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
