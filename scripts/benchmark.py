#!/usr/bin/env python
"""Speed and memory benchmarks, one entry point. Nothing here asserts a timing.

    python scripts/benchmark.py --part ecoformer --threads 1,2 --out bench   # EcoFormer/Bitformer vs timm, 224-896 px
    python scripts/benchmark.py --part models --sizes 224 --out bench         # every attention vs timm at 224 px
    python scripts/benchmark.py --part scaling --out bench                    # every attention, 224/448/896 px + PNG
    python scripts/benchmark.py --part bitformer --threads 1 --out bench      # XOR/popcount kernels, stage shapes
    python scripts/benchmark.py --part deploy --out bench                     # ONNX Runtime (scripts/bench_deploy.py)
    python scripts/benchmark.py --part models,bitformer --quick --sizes 32 --out /tmp/bench   # smoke run
    python scripts/benchmark.py --part ecoformer --processes 5 --out bench    # the same in 5 fresh processes, combined
    python scripts/benchmark.py --markdown bench/ecoformer.csv                # the README speed table, from the CSV
    python scripts/benchmark.py --replot a/scaling.csv b/scaling.csv --out c  # one log-log plot of several runs

Parts (``PARTS``): ``models`` (DEFAULT_SETUPS, default 224 px), ``scaling`` (DEFAULT_SETUPS, 224/448/896 px),
``ecoformer`` (EcoFormer, Bitformer float, softmax SRA and timm at 224/448/896 px, plus one hash re-fit), ``bitformer``
(score kernels and attention modules at pvtv2_b0's stage shapes), ``deploy`` (``run(args) -> rows`` of
scripts/bench_deploy.py, the ONNX export's). ``--setups`` replaces a model part's setups; ``EcoFormer PyTorch ops``
(EcoFormer with ``attn.cpu_kernels=false``: its C++ CPU kernels off) runs only when named there, e.g.
``--part models --setups "EcoFormer,EcoFormer PyTorch ops,timm" --sizes 224,448`` for their same-process A/B.

Outputs in ``--out``: ``<part>.csv`` (one row per measurement), ``<part>_<table>.csv`` for a part's extra table
(``ecoformer_hash.csv``), ``<part>.md`` (the tables printed) and ``<part>.png`` for the model parts (log-log: ms and
peak MB per image against stage-0 tokens).

Timing (:func:`time_interleaved`, the one helper): after a warm-up call, ``--repeats`` rounds call every step in
turn, the order reversed every other round, so that drift of a shared machine hits all alike; the median seconds per
call are kept, and ratios are taken between steps of the same process. CPU: ``time.perf_counter`` (``--clock cpu``:
process CPU time, for one thread on a busy machine), float32.
CUDA (``--device cuda``): CUDA events recorded around the calls (synchronised first), bf16 autocast for the models,
peak memory from ``torch.cuda.max_memory_allocated``. ``--threads 1,2`` repeats every measurement per torch thread
count (rows carry ``threads``). ``--processes N`` (model parts) runs the whole measurement in N fresh processes one
after the other (``<out>/process_<k>/``) and writes their combination (:func:`combine_processes`) to ``<out>``: on a
shared CPU one ratio moves more between processes (memory placement, CPU state) than between rounds of one process.

Model parts: batch at size s: max(1, round(batch · min(1, (224/s)²))) (batch 64 on CUDA, 8 on CPU), the same for every
model. infer: eval mode, no_grad; train: forward + cross-entropy + backward + AdamW step (drop path 0). Ratios are
ours / timm's at the same size and thread count (> 1: faster, or more memory). ``limit_speed_vs_timm`` is the
op-count limit of that ratio: timm's multiplications / the setup's (``models.count_model_ops``, DESIGN §6, the `mul`
of scripts/energy.py; timm's are our softmax SRA's, the same function). Peak memory: one step after the warm-up,
above what was in use just before it (models, input, AdamW state). CPU: peak resident set (VmHWM, reset through
/proc/self/clear_refs; Linux) over VmRSS after gc and malloc_trim, i.e. every page the step touches: approximate.
Hash re-fit (``ecoformer``): seconds of one re-fit of every EcoFormer hash (hashing.HashLearningCallback with
configs/train.yaml `hash`) against one epoch of training at the measured train images/s.
"""
from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import functools
import gc
import importlib.util
import logging
import math
import os
import re
import statistics
import subprocess
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
from models import count_model_ops  # noqa: E402

log = logging.getLogger("benchmark")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
DEPLOY_SCRIPT = os.path.join(ROOT, "scripts", "bench_deploy.py")
NUM_CLASSES = 1000
TIMM = "timm"
# label -> attention overrides (None: timm's own model)
SETUPS: Dict[str, Optional[List[str]]] = {
    "softmax SRA": ["attn=softmax"],
    "softmax MSA": ["attn=softmax", "attn.sr=false"],
    "EcoFormer": ["attn=ecoformer"],
    "EcoFormer PyTorch ops": ["attn=ecoformer", "attn.cpu_kernels=false"],
    "Bitformer float": ["attn=bitformer", "attn.score_path=float"],
    "Bitformer packed": ["attn=bitformer", "attn.score_path=packed"],
    TIMM: None,
}
OPTIONAL_SETUPS = ("EcoFormer PyTorch ops",)  # only with --setups: EcoFormer's C++ CPU kernels off, for A/B
DEFAULT_SETUPS = [label for label in SETUPS if label not in OPTIONAL_SETUPS]
HASH_SHAPES = [("CIFAR-100", 32, 50_000), ("ImageNet", 224, 1_281_167)]
MODES = ("infer", "train")
Step = Callable[[], object]
Tables = Dict[str, List[Dict[str, object]]]  # table name ("" = the part's main table) -> rows


@dataclass
class Row:
    label: str
    size: int
    tokens: int
    batch: int
    threads: int
    device: str
    dtype: str
    mul_g: float = math.nan
    infer_img_s: float = math.nan
    train_img_s: float = math.nan
    infer_mem_mb: float = math.nan
    train_mem_mb: float = math.nan
    limit_speed_vs_timm: float = math.nan
    infer_speed_vs_timm: float = math.nan
    train_speed_vs_timm: float = math.nan
    infer_mem_vs_timm: float = math.nan
    train_mem_vs_timm: float = math.nan
    status: str = "ok"


# the timing helper ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_calls(step: Step, calls: int, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``calls`` back-to-back calls. CPU: ``clock`` (wall: perf_counter; cpu: this process's
    CPU time, user + system); CUDA: CUDA events recorded around the calls after a synchronize, read once the end
    event has completed."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = clock()
    for _ in range(calls):
        step()
    return (clock() - t0) / calls


def time_interleaved(steps: Dict[str, Step], repeats: int, device: torch.device, warmup: bool = True,
                     min_round_s: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median seconds per call of each step over ``repeats`` interleaved rounds; ratios of its results are
    same-process ratios.

    ``warmup`` times one call of each step first; with ``min_round_s`` > 0 that call also sets how many calls a
    step makes per round (so that a round of a microsecond op lasts about ``min_round_s``), else one. Rounds run the
    steps in turn, in reversed order every other round, so that drift of a shared machine hits all alike.
    """
    calls = {name: 1 for name in steps}
    if warmup:
        for name, step in steps.items():
            first = time_calls(step, 1, device, clock)
            calls[name] = max(1, math.ceil(min_round_s / max(first, 1e-9))) if min_round_s > 0 else 1
    times: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(time_calls(steps[name], calls[name], device, clock))
    return {name: statistics.median(ts) for name, ts in times.items()}


def ratio(a: float, b: float) -> float:
    """a / b, NaN unless b > 0."""
    return a / b if b > 0 else math.nan


# model parts ---------------------------------------------------------------------------------------------------
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
        model = build_model(cfg.model, cfg.attn, num_classes=NUM_CLASSES, load_pretrained=False)
    return model.to(device)


@functools.lru_cache(maxsize=None)
def mul_count(label: str, model_name: str, size: int) -> float:
    """Multiplications of one image (DESIGN §6, ``count_model_ops``); timm's are our softmax SRA model's."""
    model = build("softmax SRA" if SETUPS[label] is None else label, model_name, torch.device("cpu"))
    return float(count_model_ops(model, size)["mul"])


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


def make_step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    """One inference (eval, no_grad) or training step (CE + backward + AdamW, grads freed after the step);
    bf16 autocast on CUDA."""
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


def short(err: BaseException) -> str:
    """Exception type and the first clause of its message."""
    first = re.split(r":\s", str(err))[0][:120]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def bench_size(labels: Sequence[str], args: argparse.Namespace, size: int) -> List[Row]:
    """The setups at one size and every thread count: warm-up, memory (one step), interleaved timing, per mode."""
    device, batch = args.device, batch_for(size, args.batch)
    dtype = "bf16 autocast" if device.type == "cuda" else "float32"
    models: Dict[str, nn.Module] = {}
    broken: Dict[str, str] = {}
    for label in labels:
        try:
            models[label] = build(label, args.model, device)
        except NotImplementedError as err:
            broken[label] = f"skipped: not implemented ({str(err).splitlines()[0][:80]})"
            log.warning("%s: %s", label, broken[label])
    muls = {label: mul_count(label, args.model, size) for label in labels}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    memory = Memory(device)
    rows: List[Row] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        mine = {label: Row(label, size, stage_tokens(size)[0], batch, threads, str(device), dtype,
                           mul_g=muls[label] / 1e9, status=broken.get(label, "ok")) for label in labels}
        for mode in MODES:
            steps: Dict[str, Step] = {}
            for label, model in models.items():  # warm-up: one step each (and AdamW's state)
                try:
                    steps[label] = make_step(model, mode, x, y)
                    steps[label]()
                except Exception as err:  # noqa: BLE001 (a failing setup is a row: packed scores in training, OOM)
                    steps.pop(label)
                    note = f"{mode}: {short(err)}"
                    row = mine[label]
                    row.status = note if row.status == "ok" else f"{row.status}; {note}"
                    log.warning("%s %d px: %s", label, size, note)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            for label, step in steps.items():
                memory.start()
                step()
                setattr(mine[label], f"{mode}_mem_mb", memory.peak_mb())
            seconds = time_interleaved(steps, args.repeats, device, warmup=False, clock=CLOCKS[args.clock])
            for label, s in seconds.items():
                setattr(mine[label], f"{mode}_img_s", batch / s)
                log.info("%-16s %4d px %d thr %s: %.2f img/s, peak %.0f MB", label, size, threads, mode, batch / s,
                         getattr(mine[label], f"{mode}_mem_mb"))
        ref = mine.get(TIMM)
        for row in mine.values():
            row.limit_speed_vs_timm = ratio(mul_count(TIMM, args.model, size), muls[row.label])
            for mode in MODES:
                for key, name in (("img_s", "speed"), ("mem_mb", "mem")):
                    theirs = getattr(ref, f"{mode}_{key}") if ref is not None else math.nan
                    setattr(row, f"{mode}_{name}_vs_timm", ratio(getattr(row, f"{mode}_{key}"), theirs))
        rows += mine.values()
    del models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_models(args: argparse.Namespace, labels: Sequence[str], sizes: Sequence[int]) -> List[Dict[str, object]]:
    rows: List[Row] = []
    for size in sizes:
        rows += bench_size(labels, args, size)
    return [asdict(r) for r in rows]


def hash_cost(args: argparse.Namespace, rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Seconds per full re-fit of the EcoFormer model's hashes and its share of one epoch, per HASH_SHAPES."""
    from hashing import HashLearningCallback

    settings = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIGS, "train.yaml")).hash)
    settings.pop("enabled")  # the benchmark measures a re-fit whatever the training default
    num_images = settings.pop("num_images")
    pairs = settings.pop("pairs")
    if args.quick:  # smoke run: 8 images (25 anchors need >= 25 tokens at 32 px), 2 steps per bit
        num_images, settings["steps"] = 8, 2
    torch.set_num_threads(args.threads[0])
    out = []
    for dataset, size, images in HASH_SHAPES:
        model = build("EcoFormer", args.model, args.device)
        fixed = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(0))
        callback = HashLearningCallback(fixed, **dict(settings, pairs=pairs))
        fit = time_calls(lambda: callback.on_epoch_start(model, 0), 1, args.device, CLOCKS[args.clock])
        measured = [r["train_img_s"] for r in rows if r["label"] == "EcoFormer" and r["size"] == size
                    and r["threads"] == args.threads[0] and math.isfinite(r["train_img_s"])]
        if measured:
            speed = measured[0]
        else:
            batch = batch_for(size, args.batch)
            x, y = torch.randn(batch, 3, size, size).to(args.device), torch.randint(0, NUM_CLASSES, (batch,))
            step = make_step(model, "train", x, y.to(args.device))
            speed = batch / time_interleaved({"train": step}, args.repeats, args.device,
                                             clock=CLOCKS[args.clock])["train"]
        epoch = images / speed
        out.append(dict(dataset=dataset, img_size=size, images_per_epoch=images, threads=args.threads[0],
                        fit_s=fit, train_img_s=speed, epoch_train_s=epoch, fit_share=fit / (fit + epoch),
                        num_images=num_images, steps_per_bit=settings["steps"], pairs=pairs))
        log.info("hash re-fit %s %d px: %.2f s, epoch %.0f s, share %.4f", dataset, size, fit, epoch,
                 out[-1]["fit_share"])
    return out


def part_models(args: argparse.Namespace) -> Tables:
    """Every setup against timm at ``--sizes`` (default 224 px)."""
    return {"": bench_models(args, args.setups or DEFAULT_SETUPS, args.sizes or [224])}


def part_scaling(args: argparse.Namespace) -> Tables:
    """Every setup against timm at ``--sizes`` (default 224, 448, 896 px), for the log-log plot."""
    return {"": bench_models(args, args.setups or DEFAULT_SETUPS, args.sizes or [224, 448, 896])}


def part_ecoformer(args: argparse.Namespace) -> Tables:
    """EcoFormer, Bitformer (float) and softmax SRA (the same backbone with timm's attention) against timm at
    ``--sizes`` (default 224, 448, 896 px), and a hash re-fit."""
    rows = bench_models(args, args.setups or ["softmax SRA", "EcoFormer", "Bitformer float", TIMM],
                        args.sizes or [224, 448, 896])
    write_csv(os.path.join(args.out, "ecoformer.csv"), rows)  # kept if the hash re-fit fails
    return {"": rows, "hash": hash_cost(args, rows)}


# bitformer part ------------------------------------------------------------------------------------------------
def part_bitformer(args: argparse.Namespace) -> Tables:
    """Bitformer at pvtv2_b0's stage shapes (``--sizes``, default 224 px), one image, T = 16, µs per call.

    Score products alone (N queries, M = N/sr² keys): ``packed`` = XOR + popcount of codes packed beforehand (the
    fused C++ kernel on CPU), ``swar`` = the same in PyTorch ops (the fallback), ``float`` = the ±1 codes multiplied,
    ``softmax`` = q @ kᵀ at head size d. Whole attention modules (inference, eval, no_grad): ``attn_float`` (the fused
    float path), ``attn_packed`` (XOR/popcount scores, then softmax and P·v) and ``attn_softmax`` (SRA). Memory:
    KiB of both score operands plus the score matrix. Every score path is checked to give the same scores.
    """
    from attention import create_attention
    from attention.bitformer import bit_kernels, pack_bits, packed_scores

    device, bits, head_dim = args.device, 16, 32
    min_round_s = 0.002 if args.quick else 0.02
    gen = torch.Generator().manual_seed(0)
    rows: List[Dict[str, object]] = []
    for size in args.sizes or [224]:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for stage, (heads, sr) in enumerate(zip((1, 2, 5, 8), (8, 4, 2, 1))):
                side = int(math.isqrt(stage_tokens(size)[stage]))
                N, M, dim = side * side, (side // sr) ** 2, heads * head_dim
                zq = torch.randn(1, heads, N, bits, generator=gen).to(device)
                zk = torch.randn(1, heads, M, bits, generator=gen).to(device)
                q_codes, k_codes = torch.where(zq >= 0, 1.0, -1.0), torch.where(zk >= 0, 1.0, -1.0)
                q_words, k_words = pack_bits(zq), pack_bits(zk)
                q = torch.randn(1, heads, N, head_dim, generator=gen).to(device)
                k = torch.randn(1, heads, M, head_dim, generator=gen).to(device)
                exact = q_codes @ k_codes.mT
                for kernel in (True, False):
                    scores = packed_scores(pack_bits(zq, kernel=kernel), pack_bits(zk, kernel=kernel), bits, kernel)
                    if not torch.equal(scores.float(), exact):
                        raise AssertionError(f"stage {stage}: packed scores (kernel={kernel}) differ from the float")
                x = torch.randn(1, N, dim, generator=gen).to(device)
                modules = {name: create_attention(attn, dim, heads, sr_ratio=sr, **kw).to(device).eval() for
                           name, attn, kw in (("attn_float", "bitformer", dict(score_path="float")),
                                              ("attn_packed", "bitformer", dict(score_path="packed")),
                                              ("attn_softmax", "softmax", {}))}
                steps: Dict[str, Step] = {
                    "packed": lambda: packed_scores(q_words, k_words, bits),
                    "swar": lambda: packed_scores(q_words, k_words, bits, kernel=False),
                    "float": lambda: q_codes @ k_codes.mT,
                    "softmax": lambda: q @ k.mT,
                    **{name: (lambda m=m: m(x, (side, side))) for name, m in modules.items()},
                }
                with torch.no_grad():
                    us = {name: 1e6 * t for name, t in
                          time_interleaved(steps, args.repeats, device, min_round_s=min_round_s,
                                           clock=CLOCKS[args.clock]).items()}
                nbytes = [sum(t.numel() * t.element_size() for t in ts) / 1024 for ts in
                          ((q_words, k_words, packed_scores(q_words, k_words, bits)), (q_codes, k_codes, exact),
                           (q, k, exact))]
                rows.append(dict(size=size, threads=threads, stage=stage, N=N, M=M, heads=heads, bits=bits,
                                 kernels="fused C++" if bit_kernels() is not None and device.type == "cpu" else
                                 "PyTorch ops", **{f"{name}_us": t for name, t in us.items()},
                                 packed_vs_float=us["packed"] / us["float"],
                                 packed_vs_softmax=us["packed"] / us["softmax"],
                                 attn_packed_vs_float=us["attn_packed"] / us["attn_float"],
                                 attn_float_vs_softmax=us["attn_float"] / us["attn_softmax"],
                                 mem_packed_kib=nbytes[0], mem_float_kib=nbytes[1], mem_softmax_kib=nbytes[2]))
                log.info("bitformer %d px stage %d, %d thr: %s", size, stage, threads,
                         ", ".join(f"{n} {t:.1f} µs" for n, t in us.items()))
    return {"": rows}


# deploy part ---------------------------------------------------------------------------------------------------
def part_deploy(args: argparse.Namespace) -> Tables:
    """ONNX Runtime latency: ``run(args) -> rows`` of scripts/bench_deploy.py (the export extra's benchmark)."""
    if not os.path.exists(DEPLOY_SCRIPT):
        raise SystemExit("--part deploy needs scripts/bench_deploy.py, the ONNX Runtime benchmark of the export "
                         "extra (`pip install -e .[export]`: onnx, onnxruntime), which this checkout does not have; "
                         f"valid parts here: {', '.join(p for p in PARTS if p != 'deploy')}")
    spec = importlib.util.spec_from_file_location("bench_deploy", DEPLOY_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return {"": module.run(args)}


PARTS: Dict[str, Callable[[argparse.Namespace], Tables]] = {
    "models": part_models,
    "ecoformer": part_ecoformer,
    "bitformer": part_bitformer,
    "scaling": part_scaling,
    "deploy": part_deploy,
}
MODEL_PARTS = ("models", "ecoformer", "scaling")


# output --------------------------------------------------------------------------------------------------------
def fmt(value: object, digits: int = 2) -> str:
    """Floats with ``digits`` decimals (at least 2 significant digits), "-" for NaN; other values as str."""
    if not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" if abs(value) >= 10 ** (1 - digits) or value == 0 else f"{value:.2g}"


def markdown_table(rows: Sequence[Dict[str, object]], columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def speed_table(rows: Sequence[Dict[str, object]], target: str = "EcoFormer") -> str:
    """The README speed table of ``target`` (rows of a model part, e.g. read back from ``ecoformer.csv``): per size
    the multiplications of every setup, the op-count limit of ``target``'s speed vs timm and the measured ratios
    (inference / training) per thread count, with the share of the limit reached (and, for rows combined by
    ``--processes``, the ratio's range over the processes)."""
    labels = [label for label in SETUPS if any(r["label"] == label for r in rows)]
    if target not in labels or TIMM not in labels:
        raise ValueError(f"the speed table needs rows of {target!r} and {TIMM!r}; these rows have {labels}")
    threads = sorted({int(r["threads"]) for r in rows})
    others = [label for label in labels if label not in (TIMM, "softmax SRA")]  # softmax SRA's count is timm's
    head = (["px", "timm SRA mul (G)"] + [f"{label} mul (G)" for label in others]
            + [f"op-count limit, {target} vs timm"]
            + [f"{target} {mode} x timm, {t} thr (% of limit)" for t in threads for mode in MODES])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---:" for _ in head) + " |"]
    for size in sorted({int(r["size"]) for r in rows}):
        at = {(r["label"], int(r["threads"])): r for r in rows if int(r["size"]) == size}
        first = {label: next(r for (lab, _), r in at.items() if lab == label) for label in labels}
        limit = float(first[target]["limit_speed_vs_timm"])
        cells = [str(size), fmt(float(first[TIMM]["mul_g"]))] + [fmt(float(first[label]["mul_g"])) for label in others]
        cells.append(f"{limit:.2f}x")
        for t in threads:
            for mode in MODES:
                r = at.get((target, t)) or {}
                value = float(r.get(f"{mode}_speed_vs_timm", math.nan))
                low, high = (float(r.get(f"{mode}_speed_vs_timm_{end}", math.nan)) for end in ("min", "max"))
                spread = f"; {low:.2f}-{high:.2f}x" if math.isfinite(low) else ""
                cells.append(f"{value:.2f}x ({100 * value / limit:.0f}%{spread})" if math.isfinite(value) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MODEL_COLUMNS = ["label", "size", "batch", "threads", "mul_g", "limit_speed_vs_timm", "infer_img_s",
                 "infer_speed_vs_timm", "train_img_s", "train_speed_vs_timm", "infer_mem_mb", "infer_mem_vs_timm",
                 "train_mem_mb", "train_mem_vs_timm", "status"]


def report(part: str, tables: Tables, header: str) -> str:
    """The markdown printed for a part: its tables, and for model parts with EcoFormer and timm the speed table."""
    text = [f"## {part}", "", header, ""]
    for name, rows in tables.items():
        if not rows:
            continue
        if name:
            text += [f"### {part} {name}", ""]
        model_table = part in MODEL_PARTS and not name
        text += [markdown_table(rows, MODEL_COLUMNS + [c for c in RANGE_COLUMNS if c in rows[0]] if model_table
                                else None), ""]
    main = tables.get("", [])
    if part in MODEL_PARTS and {"EcoFormer", TIMM} <= {r["label"] for r in main}:
        text += ["### op-count limit and measured speed (EcoFormer vs timm)", "", speed_table(main), ""]
    return "\n".join(text)


def write_csv(path: str, records: Sequence[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def read_rows(paths: Sequence[str]) -> List[Dict[str, object]]:
    """Rows of model-part CSVs (``Row`` fields, typed, and the ``--processes`` ranges) written by earlier runs."""
    types = {f.name: f.type for f in fields(Row)}
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            for record in csv.DictReader(f):
                missing = set(types) - set(record)
                if missing:
                    raise ValueError(f"{path} is not a model-part CSV (no column {sorted(missing)[0]!r}); "
                                     f"use the {'/'.join(MODEL_PARTS)} part's <part>.csv")
                row = {k: v if types[k] == "str" else int(v) if types[k] == "int" else float(v)
                       for k, v in record.items() if k in types}
                row.update({k: number(record[k]) for k in RANGE_COLUMNS if record.get(k)})  # a --processes combination
                rows.append(row)
    return rows


def plot(rows: Sequence[Dict[str, object]], path: str) -> None:
    """Log-log against stage-0 tokens, one colour per setup (infer solid, train dashed; first thread count): ms per
    image and peak MB per image (peak / batch: batches shrink with the size, so this is the comparable quantity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = min(int(r["threads"]) for r in rows)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, label in enumerate(SETUPS):
        mine = sorted((r for r in rows if r["label"] == label and r["threads"] == threads), key=lambda r: r["tokens"])
        for mode, style in (("infer", "-o"), ("train", "--s")):
            pts = [(r["tokens"], 1e3 / r[f"{mode}_img_s"], r[f"{mode}_mem_mb"] / r["batch"])
                   for r in mine if math.isfinite(r[f"{mode}_img_s"])]
            if pts:
                ax_t.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", label=f"{label} {mode}")
                mem = [p for p in pts if math.isfinite(p[2]) and p[2] > 0]
                ax_m.plot([p[0] for p in mem], [p[2] for p in mem], style, color=f"C{i}", label=f"{label} {mode}")
    for ax, ylabel in ((ax_t, f"ms per image ({threads} thread(s))"),
                       (ax_m, "peak memory per image above the resting model (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stage-0 tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# several processes ------------------------------------------------------------------------------------------
SPEED_RATIOS = tuple(f"{mode}_speed_vs_timm" for mode in MODES)
CHILD_ENV = "ECOPVT_BENCHMARK_CHILD"
RANGE_COLUMNS = ["processes"] + [f"{name}_{end}" for name in SPEED_RATIOS for end in ("min", "max")]


def combine_processes(runs: Sequence[Sequence[Dict[str, object]]]) -> List[Dict[str, object]]:
    """Rows of one model part from N processes -> one row per (label, size, threads), in first-seen order: the median
    over the processes of every float column (a ratio's median is the median of the per-process ratios), the statuses
    joined (with their counts where they differ), ``processes`` (how many rows were combined) and each speed ratio's
    range over the processes where it was measured, ``<ratio>_min`` / ``_max``."""
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for rows in runs:
        for row in rows:
            groups.setdefault((row["label"], row["size"], row["threads"]), []).append(row)
    combined = []
    for rows in groups.values():
        out = dict(rows[0])
        for name, value in rows[0].items():
            if isinstance(value, float):
                finite = [r[name] for r in rows if math.isfinite(r[name])]
                out[name] = statistics.median(finite) if finite else math.nan
        statuses = collections.Counter(str(r["status"]) for r in rows)
        out["status"] = "; ".join(status if len(statuses) == 1 else f"{status} x{n}" for status, n in statuses.items())
        out["processes"] = len(rows)
        for name in SPEED_RATIOS:
            finite = [r[name] for r in rows if math.isfinite(r[name])]
            out[f"{name}_min"], out[f"{name}_max"] = (min(finite), max(finite)) if finite else (math.nan, math.nan)
        combined.append(out)
    return combined


def number(text: str) -> object:
    """A CSV cell as int or float where it is one, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_records(path: str) -> List[Dict[str, object]]:
    """The rows of any CSV this script wrote, numbers typed (:func:`number`)."""
    with open(path, newline="") as f:
        return [{key: number(value) for key, value in record.items()} for record in csv.DictReader(f)]


def run_processes(args: argparse.Namespace, argv: Sequence[str], header: str) -> None:
    """``--processes N``: ``argv`` measured by N fresh processes in turn (``<out>/process_<k>/``), then per part the
    combined rows and the processes' extra tables (with a ``process`` column) in ``<out>``."""
    if os.environ.get(CHILD_ENV):
        raise SystemExit(f"--processes {args.processes} inside a --processes child ({CHILD_ENV} is set); "
                         "a child measures in its own process")
    folders = [os.path.join(args.out, f"process_{k}") for k in range(args.processes)]
    for k, folder in enumerate(folders):
        log.info("process_%d (%d of %d) -> %s", k, k + 1, args.processes, folder)
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--processes", "1", "--out", folder],
                              env={**os.environ, CHILD_ENV: "1"})
        if done.returncode != 0:
            raise SystemExit(f"process_{k} ({k + 1} of {args.processes}) failed (exit {done.returncode}); its log "
                             f"is above and its outputs are in {folder}")
    header += (f" Combined over {args.processes} processes ({args.out}/process_<k>/): medians, ratio ranges "
               "min-max over the processes.")
    for part in args.parts:
        tables: Tables = {"": combine_processes([read_rows([os.path.join(f, f"{part}.csv")]) for f in folders])}
        written = [{name for name in os.listdir(f) if name.startswith(f"{part}_") and name.endswith(".csv")}
                   for f in folders]
        for name in sorted(set.intersection(*written)):  # an extra table of every process, e.g. ecoformer_hash.csv
            tables[name[len(part) + 1:-4]] = [{"process": k, **record} for k, f in enumerate(folders)
                                              for record in read_records(os.path.join(f, name))]
        write_part(args.out, part, tables, header)


# command line --------------------------------------------------------------------------------------------------
def int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="ecoformer", help=f"comma list of parts: {', '.join(PARTS)} "
                                                            "(default ecoformer)")
    parser.add_argument("--out", default="bench", help="output folder (<part>.csv, <part>.md, <part>.png)")
    parser.add_argument("--model", default="pvtv2_b0", help="this project's model; timm's counterpart is compared")
    parser.add_argument("--setups", default=None, help=f"comma list replacing a model part's setups: "
                                                       f"{', '.join(SETUPS)}")
    parser.add_argument("--sizes", type=int_list, default=None, help="comma list of input sizes in px (default: the "
                                                                     "part's; --quick: 32,64)")
    parser.add_argument("--batch", type=int, default=None, help="batch at 224 px (default 64 CUDA, 8 CPU; quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (default 5; quick 1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int_list, default=None,
                        help="comma list of torch thread counts, each measured in turn (default: torch's choice)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="CPU timing: wall (perf_counter) or cpu (process CPU time: with --threads 1, robust to "
                             "other processes taking the cores; with more threads it sums them)")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the measurement in N fresh processes one after the other and combine them "
                             "(medians, ratio ranges; model parts only)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and batches, 1 round, hash fit on 8 images with 2 steps per bit")
    parser.add_argument("--markdown", nargs="+", metavar="CSV", default=None,
                        help="measure nothing: print the README speed table from model-part CSVs")
    parser.add_argument("--replot", nargs="+", metavar="CSV", default=None,
                        help="measure nothing: plot the rows of model-part CSVs into --out/scaling.png")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes {args.processes}: expected a positive number of processes")
    args.parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown or not args.parts:
        parser.error(f"unknown part {unknown[0] if unknown else args.part!r}; valid parts: {', '.join(PARTS)}")
    others = [p for p in args.parts if p not in MODEL_PARTS]
    if args.processes > 1 and (others or args.markdown or args.replot):
        parser.error(f"--processes combines measurements of the model parts ({', '.join(MODEL_PARTS)}); "
                     + (f"run {', '.join(others)} without it" if others else "--markdown and --replot read CSVs"))
    if args.setups is not None:
        args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
        bad = [s for s in args.setups if s not in SETUPS]
        if bad or not args.setups:
            parser.error(f"unknown setup {bad[0] if bad else args.setups!r}; valid setups: {', '.join(SETUPS)}")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                         "use --device cpu")
    return device


def write_part(out: str, part: str, tables: Tables, header: str) -> None:
    """Print a part's report and write ``<part>.csv`` (and ``<part>_<table>.csv``), ``<part>.md``, ``<part>.png``."""
    text = report(part, tables, header)
    print(text)
    for name, rows in tables.items():
        if rows:
            write_csv(os.path.join(out, f"{part}_{name}.csv" if name else f"{part}.csv"), rows)
    with open(os.path.join(out, f"{part}.md"), "w") as f:
        f.write(text + "\n")
    if part in MODEL_PARTS:
        plot(tables[""], os.path.join(out, f"{part}.png"))
    log.info("wrote %s/%s.{csv,md%s}", out, part, ",png" if part in MODEL_PARTS else "")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.markdown:
        print(speed_table(read_rows(args.markdown)))
        return
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        plot(read_rows(args.replot), os.path.join(args.out, "scaling.png"))
        return
    args.device = resolve_device(args.device)
    args.threads = args.threads or [torch.get_num_threads()]
    if args.quick and args.sizes is None:
        args.sizes = [32, 64]
    args.batch = args.batch or (2 if args.quick else 64 if args.device.type == "cuda" else 8)
    args.repeats = args.repeats or (1 if args.quick else 5)
    where = (torch.cuda.get_device_name(args.device) + ", CUDA events" if args.device.type == "cuda" else
             f"CPU, {'/'.join(map(str, args.threads))} thread(s), {args.clock} clock")
    header = (f"{args.model} vs timm {args.model.replace('pvtv2_', 'pvt_v2_')}: torch {torch.__version__}, timm "
              f"{timm.__version__}, {where}; median of {args.repeats} interleaved rounds; batch {args.batch} at <= 224 "
              f"px, scaled by (224/px)^2 above; peak memory "
              f"{'torch.cuda.max_memory_allocated' if args.device.type == 'cuda' else 'VmHWM - VmRSS (approximate)'} "
              "above the resting state, one step after warm-up.")
    if args.processes > 1:
        run_processes(args, sys.argv[1:] if argv is None else list(argv), header)
        return
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        for part in args.parts:
            write_part(args.out, part, PARTS[part](args), header)


if __name__ == "__main__":
    main()
