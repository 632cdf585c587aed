"""Start-up checks of a composed train/eval config: every bad value fails here, naming the key and the fix.

Misspelt keys are already refused by Hydra (configs are in struct mode: ``Key 'bach_size' is not in struct``).
"""
from __future__ import annotations

import os
import tempfile
from typing import List

import timm
import timm.optim
from omegaconf import DictConfig

from engine.build import build_model, has_fused_step, registry_name
from engine.data import DATASETS
from models.pvtv2 import MIN_INPUT_SIZE

AMP_MODES = ("auto", "off", "bf16", "fp16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what would."""


def _check(errors: List[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def validate_model_config(cfg: DictConfig, errors: List[str]) -> None:
    names = timm.list_models("pvtv2_*")
    _check(errors, cfg.model.name in names, f"model={cfg.model.name}: unknown model; valid: {', '.join(names)}")
    if errors:
        return
    try:  # every attention option is checked by its constructor (a second or two for the largest models)
        build_model(cfg.model, cfg.attn, num_classes=1, load_pretrained=False)
    except (ValueError, NotImplementedError) as err:
        errors.append(f"attn={cfg.attn.name}: {err}")
    if cfg.attn.get("score_path") == "packed":
        errors.append("attn.score_path=packed is Bitformer's inference path (no gradient through XOR/popcount): "
                      "train with attn.score_path=float, then evaluate with "
                      "`python eval.py ckpt=... attn=bitformer attn.score_path=packed`")


def validate_data_config(data: DictConfig, errors: List[str]) -> None:
    _check(errors, data.name in DATASETS, f"data={data.name}: unknown dataset; valid: {', '.join(DATASETS)}")
    _check(errors, int(data.img_size) >= MIN_INPUT_SIZE,
           f"data.img_size={data.img_size}: PVTv2 needs at least {MIN_INPUT_SIZE} px")
    _check(errors, int(data.batch_size) >= 1, f"data.batch_size={data.batch_size}: must be >= 1")
    _check(errors, int(data.num_workers) >= 0, f"data.num_workers={data.num_workers}: must be >= 0")
    mixing = data.get("aug") is not None and (data.aug.mixup > 0 or data.aug.cutmix > 0)
    _check(errors, not mixing or int(data.batch_size) % 2 == 0,
           f"data.batch_size={data.batch_size}: mixup/cutmix need an even batch size")
    if data.get("per_class") is not None:
        _check(errors, int(data.per_class) >= 1, f"data.per_class={data.per_class}: must be >= 1 or null")


def validate_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every bad value of a train.py config."""
    errors: List[str] = []
    validate_model_config(cfg, errors)
    validate_data_config(cfg.data, errors)
    _check(errors, int(cfg.epochs) >= 1, f"epochs={cfg.epochs}: must be >= 1")
    _check(errors, not cfg.sched.warmup_prefix or int(cfg.epochs) > int(cfg.sched.warmup_epochs),
           f"sched.warmup_prefix=true with epochs={cfg.epochs} <= sched.warmup_epochs={cfg.sched.warmup_epochs}: "
           "nothing left to decay; raise epochs or lower sched.warmup_epochs")
    optimizers = timm.optim.list_optimizers()
    known = registry_name(cfg.optim.name) in optimizers
    _check(errors, known, f"optim.name={cfg.optim.name}: unknown optimizer; valid (timm's registry, optionally "
                          f"prefixed lookahead_): {', '.join(optimizers)}")
    if known and cfg.optim.fused and not has_fused_step(cfg.optim.name):
        fused = ", ".join(name for name in optimizers if has_fused_step(name))
        errors.append(f"optim.fused=true: {cfg.optim.name} has no fused step ({fused} have one); set "
                      "optim.fused=null (use it where available) or false")
    _check(errors, float(cfg.optim.lr) > 0, f"optim.lr={cfg.optim.lr}: the learning rate must be > 0")
    _check(errors, float(cfg.optim.weight_decay) >= 0, f"optim.weight_decay={cfg.optim.weight_decay}: must be >= 0")
    _check(errors, int(cfg.grad_accum) >= 1, f"grad_accum={cfg.grad_accum}: must be >= 1")
    _check(errors, cfg.grad_clip is None or float(cfg.grad_clip) > 0, f"grad_clip={cfg.grad_clip}: > 0 or null")
    _check(errors, cfg.amp in AMP_MODES, f"amp={cfg.amp}: valid values {', '.join(AMP_MODES)}")
    _check(errors, int(cfg.eval_every) >= 1, f"eval_every={cfg.eval_every}: must be >= 1")
    _check(errors, 0 < float(cfg.ema.decay) < 1, f"ema.decay={cfg.ema.decay}: must be in (0, 1)")
    _check(errors, int(cfg.hash.every_epochs) >= 1,
           f"hash.every_epochs={cfg.hash.every_epochs}: tau must be >= 1 (re-fit every tau epochs)")
    _check(errors, int(cfg.hash.num_images) >= 1, f"hash.num_images={cfg.hash.num_images}: must be >= 1")
    _check(errors, int(cfg.hash.pairs) >= 1, f"hash.pairs={cfg.hash.pairs}: must be >= 1")
    _check(errors, cfg.hash.max_tokens is None or int(cfg.hash.max_tokens) >= 2 * int(cfg.hash.pairs),
           f"hash.max_tokens={cfg.hash.max_tokens}: must be >= 2 * hash.pairs ({2 * int(cfg.hash.pairs)}), or null "
           "for all tokens")
    _check(errors, float(cfg.hash.lr) > 0, f"hash.lr={cfg.hash.lr}: must be > 0")
    for key in ("init", "resume"):
        value = cfg.get(key)
        if value not in (None, "auto") and not os.path.isfile(str(value)):
            errors.append(f"{key}={value}: no such file")
    if cfg.logger.name not in ("none", "wandb"):
        errors.append(f"logger={cfg.logger.name}: valid loggers: none, wandb")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def check_writable(folder: str) -> None:
    """Fail at start-up, not at the first checkpoint, when the run folder cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"run folder {os.path.abspath(folder)} is not writable ({err.strerror}); choose another "
                          f"with hydra.run.dir=DIR") from err

