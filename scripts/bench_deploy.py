#!/usr/bin/env python
"""Edge latency of pvtv2_b0: PyTorch eager against onnxruntime (fp32 and int8 files) at batch 1, in one process.

    python scripts/bench_deploy.py                                   # 224 px, 1 and 2 threads, 30 repeats
    python scripts/bench_deploy.py --sizes 224 --threads 1 --repeats 50 --out bench_deploy
    python scripts/benchmark.py --part deploy --out bench          # the same through the benchmark entry point

Attentions: softmax SRA, EcoFormer (paper formula), Bitformer with packed scores (PyTorch: the C++ XOR/popcount
kernels; ONNX: BitwiseXor + a popcount table). Random weights (latency does not depend on them), 1000 classes.
Each model is exported by engine/deploy.py (fixed shape, as export.py writes it with dynamic=none) and quantized
(export.py quantize=dynamic). Per thread count, one call of each (attention, runtime) pair per repeat, the order
alternating between repeats, after two warm-up calls each (scripts/benchmark.py's ``time_interleaved``); onnxruntime's
idle threads do not spin (they would take PyTorch's cores between interleaved calls: it doubled PyTorch's 2-thread time
in a first run); the table gives medians in ms and PyTorch / onnxruntime ratios (> 1: onnxruntime faster), with the
model's energy per image by the EcoFormer paper's rules (DESIGN §6, models.count_model_ops, as scripts/energy.py prints
it). The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: the benchmark's timing helper

import timm  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402,F401 (registers pvtv2_*)
from attention.bitformer import bit_kernels  # noqa: E402
from engine import deploy  # noqa: E402
from benchmark import time_interleaved  # noqa: E402
from models import count_model_ops  # noqa: E402

log = logging.getLogger("bench_deploy")
SETUPS: Dict[str, tuple] = {
    "softmax SRA": ("softmax", {}),
    "EcoFormer": ("ecoformer", {}),
    "Bitformer packed": ("bitformer", {"score_path": "packed"}),
}
RUNTIMES = ("pytorch", "ort_fp32", "ort_int8")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="pvtv2_b0")
    parser.add_argument("--sizes", default="224", help="comma-separated input sides in px")
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per (attention, runtime, threads)")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    parser.add_argument("--out", default=None, help="folder for bench_deploy.md / .json (and the exported files)")
    return parser


def _int_list(value: Any) -> List[int]:
    return [int(v) for v in str(value).split(",")] if isinstance(value, (str, int)) else [int(v) for v in value]


def options(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with this script's defaults for what it leaves unset (None or absent), lists parsed: the namespace
    of this script's command line or of ``scripts/benchmark.py --part deploy``."""
    merged = vars(add_arguments(argparse.ArgumentParser()).parse_args([]))
    merged.update({k: v for k, v in vars(args).items() if k in merged and v is not None})
    merged["sizes"], merged["threads"] = _int_list(merged["sizes"]), _int_list(merged["threads"])
    setups = merged["setups"]
    merged["setups"] = [label.strip() for label in (setups.split(",") if isinstance(setups, str) else setups)
                        if label.strip()]
    unknown = [label for label in merged["setups"] if label not in SETUPS]
    if unknown:
        raise ValueError(f"unknown setup(s) {unknown}; valid: {', '.join(SETUPS)}")
    return argparse.Namespace(**merged)


def _runners(model: torch.nn.Module, fp32: str, int8: str, image: torch.Tensor, threads: int
             ) -> Dict[str, Callable[[], Any]]:
    sessions = {"ort_fp32": deploy.inference_session(fp32, threads, spinning=False),
                "ort_int8": deploy.inference_session(int8, threads, spinning=False)}
    feed = {deploy.INPUT_NAME: image.numpy()}

    def eager() -> Any:
        with torch.no_grad():
            return model(image)

    return {"pytorch": eager, **{name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}}


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """One row per (attention, size, threads): median ms per runtime, ratios, energy per image."""
    args = options(args)
    folder = args.out or tempfile.mkdtemp(prefix="bench_deploy_")
    os.makedirs(folder, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    for size in args.sizes:
        built: Dict[str, tuple] = {}
        for label in args.setups:
            attn, kwargs = SETUPS[label]
            torch.manual_seed(0)
            model = timm.create_model(args.model, attn=attn, attn_kwargs=kwargs, num_classes=1000).eval()
            fp32 = os.path.join(folder, f"{args.model}_{attn}_{size}.onnx")
            int8 = os.path.join(folder, f"{args.model}_{attn}_{size}.int8.onnx")
            log.info("exporting %s at %d px to %s", label, size, fp32)
            deploy.export_onnx(model, fp32, size, dynamic="none", batch=1)
            deploy.quantize_int8(fp32, int8)
            built[label] = model, fp32, int8, count_model_ops(model, size)["energy_pj"]
        if any(SETUPS[label][1].get("score_path") == "packed" for label in args.setups):
            bit_kernels()  # build (first use) or load the C++ kernels before timing
        image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        for threads in args.threads:
            rows += _measure(built, image, threads, args.repeats, args.model)
    return rows


def _measure(built: Dict[str, tuple], image: torch.Tensor, threads: int, repeats: int, model_name: str
             ) -> List[Dict[str, Any]]:
    torch.set_num_threads(threads)
    steps = {(label, runtime): fn for label, (model, fp32, int8, _) in built.items()
             for runtime, fn in _runners(model, fp32, int8, image, threads).items()}
    for fn in steps.values():  # first warm-up call; time_interleaved's timed one is the second
        fn()
    seconds = time_interleaved(steps, repeats, torch.device("cpu"))
    rows = []
    for label, (*_, energy) in built.items():
        ms = {runtime: 1e3 * seconds[label, runtime] for runtime in RUNTIMES}
        rows.append(dict(attention=label, model=model_name, size=image.shape[-1], batch=1, threads=threads,
                         repeats=repeats, **{f"{r}_ms": ms[r] for r in RUNTIMES},
                         fp32_speedup=ms["pytorch"] / ms["ort_fp32"], int8_speedup=ms["pytorch"] / ms["ort_int8"],
                         energy_mj=energy * 1e-9))
    return rows


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    header = ("attention", "size", "threads", "PyTorch eager (ms)", "ORT fp32 (ms)", "ORT int8 (ms)",
              "PyTorch / ORT fp32", "PyTorch / ORT int8", "energy / image (mJ)")
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for r in rows:
        cells = (r["attention"], r["size"], r["threads"], f"{r['pytorch_ms']:.1f}", f"{r['ort_fp32_ms']:.1f}",
                 f"{r['ort_int8_ms']:.1f}", f"{r['fp32_speedup']:.2f}", f"{r['int8_speedup']:.2f}",
                 f"{r['energy_mj']:.2f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args()
    rows = run(args)
    table = markdown(rows)
    print(table)
    if args.out:
        with open(os.path.join(args.out, "bench_deploy.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "bench_deploy.json"), "w") as f:
            json.dump(rows, f, indent=2)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
