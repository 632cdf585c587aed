#!/usr/bin/env bash
# What hash learning buys (README "The hash ablation"): the CIFAR-100 CPU protocol (pvtv2_b0, 32 px,
# 8 epochs) for EcoFormer with its hash (a) never fitted, (b) fitted once at epoch 0, (c) re-fitted every epoch
# (the default), (d) formula=authors re-fitted every epoch; then the paper's path like for like: 3 more epochs
# of MSA, EcoFormer and Bitformer from the same 8-epoch full-MSA checkpoint, with one schedule.
#   bash scripts/hash_ablation.sh DATA_ROOT [OUT] [PART] [-- OVERRIDES...]   # DATA_ROOT holds cifar-100-python/
# PART: all (default) | hash (a-d, seed 0) | control (MSA, then +3 epochs) | seeds (a and c, seed 1)
set -euo pipefail
root=${1:?usage: scripts/hash_ablation.sh DATA_ROOT [OUT] [PART] [-- OVERRIDES...]}
shift
positional=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do positional+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
out=${positional[0]:-runs/hash_ablation}
part=${positional[1]:-all}
cd "$(dirname "$0")/.."
train() { name=$1; shift; python train.py experiment=cifar100_cpu data.root="$root" hydra.run.dir="$out/$name" "$@"; }
if [ "$part" = all ] || [ "$part" = hash ]; then
  train c_every_epoch_s0 attn=ecoformer seed=0 "$@"
  train a_never_s0 attn=ecoformer hash.enabled=false seed=0 "$@"
  train d_authors_s0 attn=ecoformer attn.formula=authors seed=0 "$@"
  train b_once_s0 attn=ecoformer hash.every_epochs=100 seed=0 "$@"
fi
if [ "$part" = all ] || [ "$part" = control ]; then
  train msa attn=softmax attn.sr=false seed=0 "$@"
  for attn in "softmax attn.sr=false" ecoformer bitformer; do
    name=msa_plus3_${attn%% *}
    # shellcheck disable=SC2086
    train "$name" attn=$attn init="$out/msa/checkpoints/best.ckpt" epochs=3 optim.lr=5e-4 sched.warmup_epochs=0 "$@"
  done
fi
if [ "$part" = all ] || [ "$part" = seeds ]; then
  train c_every_epoch_s1 attn=ecoformer seed=1 "$@"
  train a_never_s1 attn=ecoformer hash.enabled=false seed=1 "$@"
fi
python scripts/summarize.py "$out"
