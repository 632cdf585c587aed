#!/usr/bin/env bash
# What hash learning buys (README "EcoFormer: the hash ablation"): the CIFAR-100 CPU protocol (pvtv2_b0, 32 px,
# 8 epochs) for EcoFormer with its hash (a) never fitted, (b) fitted once at epoch 0, (c) re-fitted every epoch
# (the default), (d) formula=authors re-fitted every epoch; then the paper's path like for like: 3 more epochs
# of MSA, EcoFormer and Bitformer from the same 8-epoch full-MSA checkpoint, with one schedule.
#   bash scripts/hash_ablation.sh DATA_ROOT [OUT] [SEEDS]     # DATA_ROOT holds cifar-100-python/; SEEDS "0 1"
set -euo pipefail
root=${1:?usage: scripts/hash_ablation.sh DATA_ROOT [OUT] [SEEDS]}
out=${2:-runs/hash_ablation}
seeds=${3:-0 1}
cd "$(dirname "$0")/.."
train() { name=$1; shift; python train.py experiment=cifar100_cpu data.root="$root" hydra.run.dir="$out/$name" "$@"; }
first=${seeds%% *}
train c_every_epoch_s$first attn=ecoformer seed="$first"
train a_never_s$first attn=ecoformer hash.enabled=false seed="$first"
train d_authors_s$first attn=ecoformer attn.formula=authors seed="$first"
train b_once_s$first attn=ecoformer hash.every_epochs=100 seed="$first"
train msa attn=softmax attn.sr=false seed="$first"
from_msa="init=$out/msa/checkpoints/best.ckpt epochs=3 optim.lr=5e-4 sched.warmup_epochs=0"
train msa_plus3_msa attn=softmax attn.sr=false $from_msa
train msa_plus3_ecoformer attn=ecoformer $from_msa
train msa_plus3_bitformer attn=bitformer $from_msa
for seed in ${seeds#"$first"}; do
  train c_every_epoch_s$seed attn=ecoformer seed="$seed"
  train a_never_s$seed attn=ecoformer hash.enabled=false seed="$seed"
done
python scripts/summarize.py "$out"
