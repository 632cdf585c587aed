#!/usr/bin/env python
"""Attention benchmarks (no timings are asserted anywhere; ratios are measured in this one process).

    python scripts/bench_attention.py --part ecoformer   # pvtv2_b0 EcoFormer vs timm pvt_v2_b0 and full MSA
    python scripts/bench_attention.py --part bitformer   # packed XOR/popcount scores vs float path vs q@kᵀ
    python scripts/bench_attention.py                    # both
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_ecoformer(args: argparse.Namespace) -> None:
    raise NotImplementedError  # filled in by the EcoFormer work


def bench_bitformer(args: argparse.Namespace) -> None:
    raise NotImplementedError  # filled in by the Bitformer work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["ecoformer", "bitformer", "all"], default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.part in ("ecoformer", "all"):
        bench_ecoformer(args)
    if args.part in ("bitformer", "all"):
        bench_bitformer(args)


if __name__ == "__main__":
    main()
