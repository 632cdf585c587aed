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
    """Inference images/s of pvtv2_b0 with EcoFormer vs timm's ``pvt_v2_b0`` (SRA) and pvtv2_b0 full MSA (sr=False).

    224 and 448 px (``--quick``: 64 and 96 px, batch 2), the three models timed in turn (interleaved repeats in this
    one process, after a warm-up), median per model, ratios to timm. Then the seconds of one hash re-fit of the
    whole EcoFormer model (``HashLearningCallback.fit``: 32 images at 224 px, defaults; ``--quick``: 4 at 96 px).
    """
    import statistics
    import time

    import timm
    import torch

    import models  # noqa: F401 (registers pvtv2_*)
    from hashing import HashLearningCallback

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    reference = "timm pvt_v2_b0 (SRA)"
    nets = {
        reference: timm.create_model("pvt_v2_b0"),
        "pvtv2_b0 softmax MSA": timm.create_model("pvtv2_b0", attn="softmax", attn_kwargs={"sr": False}),
        "pvtv2_b0 EcoFormer": timm.create_model("pvtv2_b0", attn="ecoformer"),
    }
    nets = {name: net.to(device).eval() for name, net in nets.items()}
    sizes = [(64, 2), (96, 2)] if args.quick else [(224, 32), (448, 8)]
    repeats = 2 if args.quick else 9
    print(f"EcoFormer inference on {device} ({torch.get_num_threads()} threads), median of {repeats} interleaved runs")
    print(f"{'px':>5} {'batch':>5}  {'model':<24} {'img/s':>9} {'vs timm':>8}")
    for size, batch in sizes:
        x = torch.randn(batch, 3, size, size, device=device)
        seconds = {name: [] for name in nets}
        with torch.inference_mode():
            for net in nets.values():
                net(x)
            for _ in range(repeats):
                for name, net in nets.items():
                    synchronize()
                    start = time.perf_counter()
                    net(x)
                    synchronize()
                    seconds[name].append(time.perf_counter() - start)
        rates = {name: batch / statistics.median(times) for name, times in seconds.items()}
        for name, rate in rates.items():
            print(f"{size:>5} {batch:>5}  {name:<24} {rate:>9.2f} {rate / rates[reference]:>7.2f}x")

    n_images, size = (4, 96) if args.quick else (32, 224)
    model = nets["pvtv2_b0 EcoFormer"]
    fixed = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    callback = HashLearningCallback(fixed, steps=5 if args.quick else 100)
    start = time.perf_counter()
    stats = callback.fit(model, epoch=0)
    synchronize()
    print(f"hash re-fit of all {len(stats)} EcoFormer layers ({n_images} images at {size} px, {callback.steps} steps "
          f"per bit, {callback.max_tokens} tokens per image): {time.perf_counter() - start:.1f} s")
    for name, layer in stats.items():
        print(f"  {name:<24} loss {layer['loss_before']:7.2f} -> {layer['loss_after']:7.2f}  top-{callback.pairs} "
              f"agreement {layer['agreement_before']:.3f} -> {layer['agreement_after']:.3f}  {layer['seconds']:.1f} s")


def bench_bitformer(args: argparse.Namespace) -> None:
    """Score matrices at pvtv2_b0's stage shapes (224 px; ``--quick``: 64 px), one image, T = 16 bits.

    N queries, M = N/sr² keys, H heads of size d = 32. Score products alone: ``packed`` = XOR + popcount of codes
    packed beforehand (the fused C++ kernel on CPU), ``swar`` = the same in PyTorch ops (the fallback), ``float`` =
    the ±1 codes (float32) multiplied, Q @ Kᵀ, ``softmax`` = q @ kᵀ at head size d. Whole score paths from the
    projections z (what Bitformer's forward runs): ``pk path`` = pack both sides + packed scores, ``fl path`` =
    sign both sides + float product (``bit_scores``). Memory: bytes of both operands plus the score matrix. Times
    are medians of several runs; all paths are checked to give identical scores.
    """
    import statistics
    import time

    import torch

    from attention.bitformer import bit_kernels, bit_scores, pack_bits, packed_scores

    target_s, repeats = (0.002, 3) if args.quick else (0.02, 7)

    def per_call_us(fn) -> float:
        fn()
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < target_s:
            fn()
            calls += 1
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            runs.append((time.perf_counter() - start) / calls * 1e6)
        return statistics.median(runs)

    def nbytes(*tensors: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    size, bits, head_dim = (64 if args.quick else 224), 16, 32
    gen = torch.Generator().manual_seed(0)
    print(f"\nBitformer scores, pvtv2_b0 stage shapes at {size} px, T = {bits}, batch 1, "
          f"{torch.get_num_threads()} thread(s); times in µs, memory in KiB (operands + scores); packed = "
          + ("fused C++ kernels" if bit_kernels() is not None else "PyTorch ops (no kernels: see the log above)"))
    columns = ["packed", "swar", "float", "softmax", "pk path", "fl path"]
    header = (f"{'stage':>5} {'N':>5} {'M':>5} {'H':>2} | " + " ".join(f"{c:>8}" for c in columns)
              + f" | {'pk/fl':>6} {'pk/sm':>6} {'paths':>6} | {'mem pk':>7} {'mem fl':>7} {'mem sm':>7} {'pk/fl':>6}")
    print(header + "\n" + "-" * len(header))
    totals = [0.0] * len(columns)
    with torch.no_grad():
        for stage, (heads, sr) in enumerate(zip((1, 2, 5, 8), (8, 4, 2, 1))):
            side = size // (4 * 2 ** stage)
            N, M = side * side, (side // sr) ** 2
            zq = torch.randn(1, heads, N, bits, generator=gen)
            zk = torch.randn(1, heads, M, bits, generator=gen)
            q_codes, k_codes = torch.where(zq >= 0, 1.0, -1.0), torch.where(zk >= 0, 1.0, -1.0)
            q_words, k_words = pack_bits(zq), pack_bits(zk)
            q, k = torch.randn(1, heads, N, head_dim, generator=gen), torch.randn(1, heads, M, head_dim, generator=gen)
            packed, exact = packed_scores(q_words, k_words, bits), q_codes @ k_codes.mT
            for name, scores in [("swar", packed_scores(pack_bits(zq, kernel=False), pack_bits(zk, kernel=False),
                                                        bits, kernel=False)),
                                 ("pk path", bit_scores(zq, zk, "packed")), ("fl path", bit_scores(zq, zk, "float"))]:
                if not (torch.equal(packed, scores) or torch.equal(exact, scores)):
                    raise AssertionError(f"stage {stage}: {name} scores differ from the packed kernel's")
            if not torch.equal(packed.float(), exact):
                raise AssertionError(f"stage {stage}: packed and float scores differ")
            times = [per_call_us(lambda: packed_scores(q_words, k_words, bits)),
                     per_call_us(lambda: packed_scores(q_words, k_words, bits, kernel=False)),
                     per_call_us(lambda: q_codes @ k_codes.mT),
                     per_call_us(lambda: q @ k.mT),
                     per_call_us(lambda: bit_scores(zq, zk, "packed")),
                     per_call_us(lambda: bit_scores(zq, zk, "float"))]
            totals = [a + b for a, b in zip(totals, times)]
            memory = [nbytes(q_words, k_words, packed), nbytes(q_codes, k_codes, exact), nbytes(q, k, exact)]
            print(f"{stage:>5} {N:>5} {M:>5} {heads:>2} | " + " ".join(f"{t:8.1f}" for t in times)
                  + f" | {times[0] / times[2]:6.2f} {times[0] / times[3]:6.2f} {times[4] / times[5]:6.2f} | "
                  + " ".join(f"{m / 1024:7.1f}" for m in memory) + f" {memory[0] / memory[1]:6.2f}")
    print(f"{'all':>5} {'':>5} {'':>5} {'':>2} | " + " ".join(f"{t:8.1f}" for t in totals)
          + f" | {totals[0] / totals[2]:6.2f} {totals[0] / totals[3]:6.2f} {totals[4] / totals[5]:6.2f} |")
    print("pk/fl, pk/sm: packed scores / float, / softmax products; paths: pk path / fl path (< 1: packed faster)")


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
