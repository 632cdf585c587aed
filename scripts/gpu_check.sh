#!/usr/bin/env bash
# The CUDA check, one command for a GPU owner (README "CUDA check"; about 6-8 minutes on one recent GPU):
#   bash scripts/gpu_check.sh [--out DIR] [--wheels DIR] [--plan]
# runs, each step logged to DIR/logs/<step>.log (default DIR: gpu_check):
#   a few bf16 and fp16 (GradScaler) training steps of each attention (fake data, experiment=smoke; EcoFormer's run
#   re-fits its hashes on the GPU at epoch 0), compile=true for EcoFormer (+ its softmax stage) and Bitformer, a
#   1-process NCCL DDP run (torchrun), a standalone EcoFormer hash fit on the GPU, eval.py on a trained checkpoint
#   (EcoFormer; Bitformer with the packed XOR/popcount path), and scripts/benchmark.py --part models at 224/448 px
#   against timm (bf16 autocast, CUDA events, torch.cuda peak memory);
# then writes one JSON summary, DIR/gpu_check.json (also printed; scripts/gpu_check.py), and exits 1 if a step failed.
# Without CUDA it says so and exits 0, running nothing. Python packages the project needs beyond torch and timm
# (hydra-core, omegaconf, wandb, tqdm, torchvision, matplotlib) are installed offline from --wheels DIR
# (pip install --no-index --find-links DIR) where missing; without --wheels, missing ones are named and it exits 1.
# --plan prints the steps' commands and exits 0 (no CUDA needed). PYTHON (default python) picks the interpreter.
set -uo pipefail

usage() { sed -n '2,3p' "$0" | sed 's/^# *//'; }
die() { echo "gpu_check: $1" >&2; exit "${2:-2}"; }

out=gpu_check
wheels=""
plan=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a folder (--out DIR)"; out=$2; shift 2 ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a folder of wheel files (--wheels DIR)"; wheels=$2; shift 2 ;;
        --plan) plan=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'; valid: --out DIR, --wheels DIR, --plan, --help" ;;
    esac
done
if [ -n "$wheels" ] && [ ! -d "$wheels" ]; then
    die "--wheels $wheels is not a folder; pass the folder holding the .whl files"
fi
PYTHON=${PYTHON:-python}
out=$(realpath -m "$out")
cd "$(dirname "$0")/.." || exit 2

# name|command, in order; $out is absolute
common="experiment=smoke device=cuda epochs=1 max_steps_per_epoch=4"
steps=()
for attn in softmax ecoformer bitformer; do
    steps+=("train_${attn}_bf16|$PYTHON train.py $common attn=$attn amp=bf16 hydra.run.dir=$out/runs/train_${attn}_bf16")
    steps+=("train_${attn}_fp16|$PYTHON train.py $common attn=$attn amp=fp16 hydra.run.dir=$out/runs/train_${attn}_fp16")
done
steps+=("train_softmax_wandb|$PYTHON train.py $common attn=softmax amp=bf16 logger=wandb logger.mode=offline hydra.run.dir=$out/runs/train_softmax_wandb")
for attn in ecoformer bitformer; do
    steps+=("compile_${attn}|$PYTHON train.py $common attn=$attn amp=bf16 compile=true hydra.run.dir=$out/runs/compile_${attn}")
done
steps+=("ddp_ecoformer|$PYTHON -m torch.distributed.run --standalone --nproc_per_node=1 train.py $common attn=ecoformer amp=bf16 hydra.run.dir=$out/runs/ddp_ecoformer")
steps+=("hash_fit_gpu|$PYTHON scripts/gpu_check.py hash-fit $out/hash_fit.json")
steps+=("eval_ecoformer|$PYTHON eval.py ckpt=$out/runs/train_ecoformer_bf16/checkpoints/best.ckpt device=cuda amp=bf16 results=$out/eval_ecoformer.json hydra.run.dir=$out/runs/eval_ecoformer")
steps+=("eval_bitformer_packed|$PYTHON eval.py ckpt=$out/runs/train_bitformer_bf16/checkpoints/best.ckpt attn=bitformer attn.score_path=packed device=cuda results=$out/eval_bitformer_packed.json hydra.run.dir=$out/runs/eval_bitformer_packed")
steps+=("benchmark|$PYTHON scripts/benchmark.py --part models --sizes 224,448 --device cuda --out $out/bench")

if [ "$plan" = 1 ]; then
    for step in "${steps[@]}"; do echo "${step%%|*}: ${step#*|}"; done
    exit 0
fi

cuda=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()), torch.__version__)" 2>/dev/null) \
    || die "cannot import torch with $PYTHON: install torch (2.4 or newer; 2.11+ on the GPU host) first" 1
if [ "${cuda%% *}" != 1 ]; then
    echo "gpu_check: no CUDA device visible to torch ${cuda#* } (torch.cuda.is_available() is False): nothing run."
    exit 0
fi

# import name -> distribution (the project's dependencies besides torch, timm)
declare -A dists=([hydra]=hydra-core [omegaconf]=omegaconf [wandb]=wandb [tqdm]=tqdm [torchvision]=torchvision
                  [matplotlib]=matplotlib [timm]=timm)
missing=()
for module in "${!dists[@]}"; do
    "$PYTHON" -c "import $module" 2>/dev/null || missing+=("${dists[$module]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ -z "$wheels" ]; then
        die "missing Python packages: ${missing[*]}; install them (pip install ${missing[*]}) or pass --wheels DIR, a folder with their wheels (and their dependencies')" 1
    fi
    echo "gpu_check: installing ${missing[*]} from $wheels (offline)"
    "$PYTHON" -m pip install --no-index --find-links "$wheels" "${missing[@]}" \
        || die "pip could not install ${missing[*]} from $wheels: add the wheels it names above to that folder" 1
fi

mkdir -p "$out/logs" || die "cannot create --out $out" 1
results="$out/steps.tsv"
: > "$results"
export WANDB_MODE=offline
for step in "${steps[@]}"; do
    name=${step%%|*}
    cmd=${step#*|}
    echo "gpu_check: $name: $cmd"
    start=$(date +%s%N)
    timeout 420 bash -c "$cmd" > "$out/logs/$name.log" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    echo "gpu_check: $name: exit $rc, $ms ms"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$ms" "$cmd" >> "$results"
done
"$PYTHON" scripts/gpu_check.py summary "$out"
