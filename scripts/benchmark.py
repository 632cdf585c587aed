#!/usr/bin/env python
"""Speed, peak memory and scaling of pvtv2_b0 with every attention against timm's pvt_v2_b0, in one process.

    python scripts/benchmark.py --out bench                         # 224, 448, 896 px
    python scripts/benchmark.py --sizes 224 --repeats 5 --out bench
    python scripts/benchmark.py --quick --sizes 32 --out /tmp/bench  # smoke run
    python scripts/benchmark.py --replot a/benchmark.csv b/benchmark.csv --out c   # one plot of several runs

Configurations: softmax SRA, full MSA (sr=false), EcoFormer, Bitformer (score_path float and packed), timm's model.
Batch at size s: max(1, round(batch · min(1, (224/s)²))) (batch 64 on CUDA, 8 on CPU), the same for every model.

- infer: eval mode, no_grad; train: forward + cross-entropy + backward + AdamW step (drop path 0).
  CUDA: autocast bf16, timed with torch.cuda.synchronize; CPU: float32.
- images/s: batch / median seconds per step over ``--repeats`` repeats that interleave the models (the order
  alternates), after one warm-up step each; ratios are ours / timm's at the same size (> 1: faster, more memory).
- peak memory: one step after the warm-up, above what was in use just before it (models, input, AdamW state), i.e.
  activations, gradients and workspace. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
  CPU: the peak resident set size (VmHWM, reset through /proc/self/clear_refs; Linux) over VmRSS after gc and
  malloc_trim: every page the step touches (allocator slack included), so approximate; tracemalloc would miss
  torch's tensors entirely.
- hash learning: seconds of one re-fit of every EcoFormer hash (hashing.HashLearningCallback on random images with
  the settings of configs/train.yaml `hash`: 32 images; a layer with fewer than 2l tokens per image uses l = tokens // 2),
  against one epoch of training estimated from the measured train images/s; share = fit / (fit + epoch), i.e. for
  a re-fit every epoch (τ = 1).

Writes ``benchmark.csv``, ``hash_cost.csv``, ``benchmark.png`` (log-log: ms and peak MB per image against
stage-0 tokens) and ``benchmark.md`` (the tables printed here) to ``--out``. No timing is asserted anywhere.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import logging
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from engine.build import build_model  # noqa: E402

log = logging.getLogger("benchmark")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NUM_CLASSES = 1000
TIMM = "timm"
# label -> attention overrides (None: timm's own model)
SETUPS: Dict[str, Optional[List[str]]] = {
    "softmax SRA": ["attn=softmax"],
    "softmax MSA": ["attn=softmax", "attn.sr=false"],
    "EcoFormer": ["attn=ecoformer"],
    "Bitformer float": ["attn=bitformer", "attn.score_path=float"],
    "Bitformer packed": ["attn=bitformer", "attn.score_path=packed"],
    TIMM: None,
}
HASH_SHAPES = [("CIFAR-100", 32, 50_000), ("ImageNet", 224, 1_281_167)]
MODES = ("infer", "train")


@dataclass
class Row:
    label: str
    size: int
    tokens: int
    batch: int
    device: str
    dtype: str
    infer_img_s: float = math.nan
    train_img_s: float = math.nan
    infer_mem_mb: float = math.nan
    train_mem_mb: float = math.nan
    infer_speed_vs_timm: float = math.nan
    train_speed_vs_timm: float = math.nan
    infer_mem_vs_timm: float = math.nan
    train_mem_vs_timm: float = math.nan
    status: str = "ok"


def stage_tokens(size: int) -> List[int]:
    """Tokens of stages 0-3: side (size - 1) // 4 + 1 after the k7 s4 p3 embedding, then (side - 1) // 2 + 1."""
    sides = [(size - 1) // 4 + 1]
    for _ in range(3):
        sides.append((sides[-1] - 1) // 2 + 1)
    return [side * side for side in sides]


def batch_for(size: int, base: int) -> int:
    """max(1, round(base · min(1, (224/size)²))): at most ``base``, about the same pixels per batch above 224 px."""
    return max(1, round(base * min(1.0, (224 / size) ** 2)))


def build(label: str, model_name: str, device: torch.device) -> nn.Module:
    """The configured model (through engine.build_model and configs/), or timm's counterpart for ``TIMM``."""
    if SETUPS[label] is None:
        model = timm.create_model(model_name.replace("pvtv2_", "pvt_v2_"), num_classes=NUM_CLASSES)
    else:
        cfg = compose("energy", overrides=[f"model={model_name}", "model.drop_path_rate=0", *SETUPS[label]])
        model = build_model(cfg.model, cfg.attn, num_classes=NUM_CLASSES)
    return model.to(device)


class Memory:
    """Peak memory of a step above the memory in use before it (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None
        self.base = 0.0

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.libc.malloc_trim(0)
            self.base = self._status_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status_kb("VmHWM") * 1024
        return (peak - self.base) / 2 ** 20


def make_step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One inference (eval, no_grad) or training step (CE + backward + AdamW, grads freed after the step)."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    if mode == "infer":
        def step() -> None:
            model.eval()
            with torch.no_grad(), amp:
                model(x)
        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        model.train()
        with amp:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ratio(a: float, b: float) -> float:
    """a / b, NaN unless b > 0."""
    return a / b if b > 0 else math.nan


def short(err: BaseException) -> str:
    """Exception type and the first clause of its message."""
    first = re.split(r":\s", str(err))[0][:120]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def bench_size(model_name: str, size: int, batch: int, device: torch.device, repeats: int) -> List[Row]:
    """Every setup at one size: memory (first two steps), then interleaved timed repeats, per mode."""
    dtype = "bf16 autocast" if device.type == "cuda" else "float32"
    rows = {label: Row(label, size, stage_tokens(size)[0], batch, str(device), dtype) for label in SETUPS}
    models: Dict[str, nn.Module] = {}
    for label in SETUPS:
        try:
            models[label] = build(label, model_name, device)
        except NotImplementedError as err:
            rows[label].status = f"skipped: not implemented ({str(err).splitlines()[0][:80]})"
            log.warning("%s: %s", label, rows[label].status)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    memory = Memory(device)
    for mode in MODES:
        steps: Dict[str, Callable[[], None]] = {}
        for label, model in models.items():  # warm-up: one step each (and AdamW's state)
            try:
                steps[label] = make_step(model, mode, x, y)
                steps[label]()
            except Exception as err:  # noqa: BLE001 (a failing setup is a row, e.g. packed scores in training, OOM)
                steps.pop(label)
                note = f"{mode}: {short(err)}"
                rows[label].status = note if rows[label].status == "ok" else f"{rows[label].status}; {note}"
                log.warning("%s %d px: %s", label, size, note)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for label, step in steps.items():
            memory.start()
            step()
            setattr(rows[label], f"{mode}_mem_mb", memory.peak_mb())
        order = list(steps)
        times: Dict[str, List[float]] = {label: [] for label in order}
        for r in range(repeats):
            for label in (order if r % 2 == 0 else order[::-1]):
                sync(device)
                t0 = time.perf_counter()
                steps[label]()
                sync(device)
                times[label].append(time.perf_counter() - t0)
        for label, ts in times.items():
            setattr(rows[label], f"{mode}_img_s", batch / statistics.median(ts))
            log.info("%-16s %4d px %s: %.1f img/s, peak %.0f MB", label, size, mode,
                     getattr(rows[label], f"{mode}_img_s"), getattr(rows[label], f"{mode}_mem_mb"))
    ref = rows[TIMM]
    for row in rows.values():
        for mode in MODES:
            for key, name in (("img_s", "speed"), ("mem_mb", "mem")):
                value = ratio(getattr(row, f"{mode}_{key}"), getattr(ref, f"{mode}_{key}"))
                setattr(row, f"{mode}_{name}_vs_timm", value)
    del models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def train_img_s(model_name: str, size: int, batch: int, device: torch.device, repeats: int) -> float:
    """Training images/s of the EcoFormer model at ``size`` (median of ``repeats`` after one warm-up)."""
    model = build("EcoFormer", model_name, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    step = make_step(model, "train", x, y)
    step()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def hash_cost(model_name: str, rows: List[Row], base_batch: int, device: torch.device, repeats: int,
              quick: bool) -> List[Dict[str, object]]:
    """Seconds per full re-fit of the EcoFormer model's hashes and its share of one epoch, per HASH_SHAPES."""
    settings = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIGS, "train.yaml")).hash)
    num_images = settings.pop("num_images")
    config_pairs = settings.pop("pairs")
    if quick:  # smoke run: 8 images (25 anchors need >= 25 tokens at 32 px), 2 steps per bit
        num_images, settings["steps"] = 8, 2
    out = []
    for dataset, size, images in HASH_SHAPES:
        result: Dict[str, object] = dict(dataset=dataset, img_size=size, images_per_epoch=images, fit_s=math.nan,
                                         train_img_s=math.nan, epoch_train_s=math.nan, fit_share=math.nan,
                                         num_images=num_images, steps_per_bit=settings["steps"], pairs=config_pairs,
                                         status="ok")
        out.append(result)
        try:
            from hashing import HashLearningCallback

            model = build("EcoFormer", model_name, device)
            callback = HashLearningCallback(torch.randn(num_images, 3, size, size, generator=torch.Generator()
                                                        .manual_seed(0)), **dict(settings, pairs=config_pairs))
            sync(device)
            t0 = time.perf_counter()
            callback.on_epoch_start(model, 0)
            sync(device)
            fit = time.perf_counter() - t0
            measured = [r.train_img_s for r in rows if r.label == "EcoFormer" and r.size == size]
            speed = measured[0] if measured and math.isfinite(measured[0]) else train_img_s(
                model_name, size, batch_for(size, base_batch), device, repeats)
        except (ImportError, NotImplementedError) as err:
            result["status"] = f"skipped: {short(err)}"
            log.warning("hash cost %s: %s", dataset, result["status"])
            continue
        epoch = images / speed
        result.update(fit_s=fit, train_img_s=speed, epoch_train_s=epoch, fit_share=fit / (fit + epoch))
        log.info("hash re-fit %s %d px: %.2f s, epoch %.0f s, share %.4f", dataset, size, fit, epoch,
                 result["fit_share"])
    return out


def fmt(value: float, digits: int = 1) -> str:
    """``digits`` decimals, at least 2 significant digits; "-" for NaN."""
    if not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" if abs(value) >= 10 ** (1 - digits) or value == 0 else f"{value:.2g}"


def tables(rows: List[Row], hashes: List[Dict[str, object]], header: str) -> str:
    lines = [header, "",
             "| setup | px | tokens (stage 0) | batch | infer img/s | x timm | train img/s | x timm | infer peak MB "
             "| x timm | train peak MB | x timm | status |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.label} | {r.size} | {r.tokens} | {r.batch} | {fmt(r.infer_img_s)} | "
                     f"{fmt(r.infer_speed_vs_timm, 2)} | {fmt(r.train_img_s)} | {fmt(r.train_speed_vs_timm, 2)} | "
                     f"{fmt(r.infer_mem_mb)} | {fmt(r.infer_mem_vs_timm, 2)} | {fmt(r.train_mem_mb)} | "
                     f"{fmt(r.train_mem_vs_timm, 2)} | {r.status} |")
    lines += ["", "Hash learning (one re-fit of every EcoFormer hash; share of an epoch with a re-fit every epoch):",
              "",
              "| data | px | images/epoch | fit images | steps/bit | pairs l | re-fit s | train img/s | epoch s (est.) "
              "| re-fit share | status |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for h in hashes:
        lines.append(f"| {h['dataset']} | {h['img_size']} | {h['images_per_epoch']} | {h['num_images']} | "
                     f"{h['steps_per_bit']} | {h['pairs']} | {fmt(h['fit_s'], 2)} | {fmt(h['train_img_s'])} | "
                     f"{fmt(h['epoch_train_s'], 0)} | {fmt(100 * h['fit_share'], 2)}% | {h['status']} |")
    return "\n".join(lines)


def plot(rows: List[Row], path: str) -> None:
    """Log-log against stage-0 tokens, one colour per setup (infer solid, train dashed): ms per image and peak MB
    per image (peak / batch: batches shrink with the size, so this is the comparable quantity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, label in enumerate(SETUPS):
        mine = sorted((r for r in rows if r.label == label), key=lambda r: r.tokens)
        for mode, style in (("infer", "-o"), ("train", "--s")):
            pts = [(r.tokens, 1e3 / getattr(r, f"{mode}_img_s"), getattr(r, f"{mode}_mem_mb") / r.batch)
                   for r in mine if math.isfinite(getattr(r, f"{mode}_img_s"))]
            if pts:
                ax_t.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", label=f"{label} {mode}")
                mem = [p for p in pts if math.isfinite(p[2]) and p[2] > 0]
                ax_m.plot([p[0] for p in mem], [p[2] for p in mem], style, color=f"C{i}", label=f"{label} {mode}")
    for ax, ylabel in ((ax_t, "ms per image"), (ax_m, "peak memory per image above the resting model (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stage-0 tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(path: str, records: Sequence[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def read_rows(paths: Sequence[str]) -> List[Row]:
    """Rows of earlier runs' benchmark.csv files (for --replot)."""
    types = {f.name: f.type for f in fields(Row)}
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            for record in csv.DictReader(f):
                rows.append(Row(**{k: v if types[k] == "str" else int(v) if types[k] == "int" else float(v)
                                   for k, v in record.items()}))
    return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench", help="output folder (CSV, PNG, markdown)")
    parser.add_argument("--model", default="pvtv2_b0", help="this project's model; timm's counterpart is compared")
    parser.add_argument("--sizes", default=None, help="comma list of input sizes in px (default 224,448,896; "
                                                       "--quick: 32,64)")
    parser.add_argument("--batch", type=int, default=None, help="batch at 224 px (default 64 CUDA, 8 CPU; quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per setup (default 5; quick 1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--replot", nargs="+", metavar="CSV", default=None,
                        help="measure nothing: plot the rows of these benchmark.csv files (e.g. runs at different "
                             "sizes) into --out/benchmark.png")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and batches, 1 repeat, hash fit on 8 images with 2 steps per bit")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        plot(read_rows(args.replot), os.path.join(args.out, "benchmark.png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    sizes = [int(s) for s in (args.sizes or ("32,64" if args.quick else "224,448,896")).split(",")]
    base = args.batch or (2 if args.quick else 64 if device.type == "cuda" else 8)
    repeats = args.repeats or (1 if args.quick else 5)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = (f"{args.model} vs timm {args.model.replace('pvtv2_', 'pvt_v2_')}: torch {torch.__version__}, "
              f"timm {timm.__version__}, {where}, {NUM_CLASSES} classes, median of {repeats} interleaved repeats; "
              f"batch {base} at <= 224 px, scaled by (224/px)^2 above; peak memory: "
              f"{'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'VmHWM - VmRSS (approximate)'} "
              f"above the resting state, one step after warm-up.")
    rows: List[Row] = []
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        for size in sizes:
            rows += bench_size(args.model, size, batch_for(size, base), device, repeats)
        hashes = hash_cost(args.model, rows, base, device, repeats, args.quick)
    text = tables(rows, hashes, header)
    print(text)
    write_csv(os.path.join(args.out, "benchmark.csv"), [asdict(r) for r in rows])
    write_csv(os.path.join(args.out, "hash_cost.csv"), hashes)
    with open(os.path.join(args.out, "benchmark.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(args.out, "benchmark.png"))
    log.info("wrote %s/{benchmark.csv,hash_cost.csv,benchmark.md,benchmark.png}", args.out)


if __name__ == "__main__":
    main()
