#!/usr/bin/env python
"""Speed of this project's ``pvtv2_b0`` (attn=softmax) against timm's ``pvt_v2_b0``, measured in one process.

For each setting (32 px and 224 px) both models get the same weights and inputs; after warm-up, the repeats
alternate between the two models (ours, timm, ours, timm, ...) so that drift of a shared CPU hits both alike,
and the median of the repeats is reported with its spread (min..max). The ratio ours/timm (>1: ours faster) is
given for the medians, its range over the repeats (ours/timm within one repeat) and for the best repeats.

    python scripts/bench_models.py                              # full run: 32 px batch 64, 224 px batch 8
    python scripts/bench_models.py --threads 2                  # fix torch's thread count
    python scripts/bench_models.py --threads 1 --clock cpu      # process CPU time: robust on a busy machine
    python scripts/bench_models.py --quick                      # smoke run (tiny batches, few repeats)

train = forward + cross-entropy backward + AdamW step (train mode, drop path 0); infer = eval mode, no_grad.
No timing is asserted anywhere; numbers on a shared machine are noisy, so repeat the run and compare ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import timm  # noqa: E402

import models  # noqa: E402,F401  (registers pvtv2_*)


def build_pair(variant: str, num_classes: int) -> Tuple[nn.Module, nn.Module]:
    """(ours, timm) with identical weights."""
    torch.manual_seed(0)
    ref = timm.create_model(f"pvt_v2_{variant}", num_classes=num_classes)
    ours = timm.create_model(f"pvtv2_{variant}", attn="softmax", num_classes=num_classes)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def make_step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model(x)

        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def bench(steps: Dict[str, Callable[[], None]], warmup: int, repeats: int, iters: int,
          clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds per step for each named step; repeats interleave the steps, each repeat runs ``iters`` steps."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first, too
            t0 = clock()
            for _ in range(iters):
                steps[name]()
            times[name].append((clock() - t0) / iters)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="b0", help="PVTv2 variant (default b0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny batches and few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per model (default 7)")
    parser.add_argument("--modes", default="train,infer", help="comma list of train, infer")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time (with --threads 1, less sensitive "
                             "to other processes taking the cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # (image size, batch, iters per repeat)
    settings = [(32, 64, 3), (224, 8, 2)] if not args.quick else [(32, 4, 1), (224, 1, 1)]
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = 1 if args.quick else 2
    modes = [m for m in args.modes.split(",") if m]
    num_classes = 100

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, "
          f"variant {args.variant}, {args.clock} clock, {repeats} interleaved repeats (median, min..max)")
    ratios = []
    for size, batch, iters in settings:
        for mode in modes:
            ours, ref = build_pair(args.variant, num_classes)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(batch, 3, size, size, generator=g)
            y = torch.randint(0, num_classes, (batch,), generator=g)
            times = bench({"ours": make_step(ours, mode, x, y), "timm": make_step(ref, mode, x, y)},
                          warmup, repeats, iters, clock)
            ips = {name: [batch / t for t in ts] for name, ts in times.items()}
            med = {name: statistics.median(v) for name, v in ips.items()}
            per_repeat = [a / b for a, b in zip(ips["ours"], ips["timm"])]
            ratio = med["ours"] / med["timm"]
            ratios.append(ratio)
            for name in ("ours", "timm"):
                print(f"{mode:5s} {size:3d}px batch {batch:3d} {name:4s}: {med[name]:9.1f} img/s "
                      f"({min(ips[name]):.1f}..{max(ips[name]):.1f})")
            best = max(ips["ours"]) / max(ips["timm"])
            print(f"ratio {mode:5s} {size:3d}px ours/timm: {ratio:.3f} "
                  f"(per-repeat {min(per_repeat):.3f}..{max(per_repeat):.3f}, best-of {best:.3f})")
    print(f"ratio geometric mean ours/timm: {statistics.geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    main()
