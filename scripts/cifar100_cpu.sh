#!/usr/bin/env bash
# The CIFAR-100 CPU protocol (README "Results on real data"): pvtv2_b0 at 32 px, 8 epochs, 2 CPU cores, for
# softmax SRA, full MSA, EcoFormer, Bitformer, and the EcoFormer paper's path (MSA, then init= -> EcoFormer).
#   bash scripts/cifar100_cpu.sh DATA_ROOT [OUT]      # DATA_ROOT holds cifar-100-python/
set -euo pipefail
root=${1:?usage: scripts/cifar100_cpu.sh DATA_ROOT [OUT]}
out=${2:-runs/cifar100_cpu}
cd "$(dirname "$0")/.."
train() { name=$1; shift; python train.py experiment=cifar100_cpu data.root="$root" hydra.run.dir="$out/$name" "$@"; }
train softmax attn=softmax
train msa attn=softmax attn.sr=false
train ecoformer attn=ecoformer
train bitformer attn=bitformer
train msa_to_ecoformer attn=ecoformer init="$out/msa/checkpoints/best.ckpt" epochs=3 optim.lr=5e-4 \
    sched.warmup_epochs=0
python scripts/summarize.py "$out" --png "$out/val_top1.png"
