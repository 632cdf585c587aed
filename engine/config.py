"""Start-up checks of a composed train/eval config: every bad value fails here, naming the key and the fix.

Misspelt keys are already refused by Hydra (configs are in struct mode: ``Key 'bach_size' is not in struct``).
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import timm
import timm.optim
from omegaconf import DictConfig, ListConfig, OmegaConf

from engine.build import build_model, has_fused_step, registry_name
from engine.data import DATASETS
from models.pvtv2 import MIN_INPUT_SIZE

AMP_MODES = ("auto", "off", "bf16", "fp16")
# timm's create_scheduler_v2 names that step per update (``plateau`` steps per epoch only); none = constant lr
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant", "wsd", "rsqrt", "none")

# The type of every number and switch of a train config (data keys relative to ``data``): a quoted number, a float
# where an integer is needed or text where a number is needed fails naming the key. "?": may be null; "[]": a list.
INTEGERS = ("epochs", "seed", "grad_accum", "eval_every", "log_interval", "max_steps_per_epoch?", "sched.warmup_epochs",
            "sched.cooldown_epochs", "optim.lr_base_batch?", "hash.every_epochs", "hash.num_images", "hash.max_tokens?",
            "hash.pairs", "hash.steps", "hash.seed")
REALS = ("grad_clip?", "optim.lr", "optim.weight_decay", "optim.eps", "optim.momentum", "optim.layer_decay?",
         "optim.betas[]", "sched.warmup_lr", "sched.min_lr", "ema.decay", "hash.lr", "hash.target_rms?", "model.drop_rate",
         "model.drop_path_rate")
SWITCHES = ("compile", "channels_last", "skip_nonfinite", "ema.enabled", "ema.warmup", "sched.warmup_prefix",
            "optim.fused?", "model.pretrained", "hash.enabled")
DATA_INTEGERS = ("img_size", "batch_size", "eval_batch_size?", "num_workers", "num_classes?", "per_class?",
                 "train_size", "val_size")
DATA_REALS = ("mean[]", "std[]", "crop_pct", "aug.scale[]", "aug.hflip", "aug.color_jitter?", "aug.reprob",
              "aug.mixup", "aug.cutmix", "aug.mixup_prob", "aug.mixup_switch_prob", "aug.smoothing")
DATA_SWITCHES = ("download", "pin_memory", "skip_bad_images")
FREE_TEXT = ("root", "init", "resume", "pretrained_file", "logger")  # keys (and groups) whose text may look numeric
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
TYPES = ((INTEGERS, "an integer"), (REALS, "a number"), (SWITCHES, "true or false"))
DATA_TYPES = ((DATA_INTEGERS, "an integer"), (DATA_REALS, "a number"), (DATA_SWITCHES, "true or false"))
KINDS = {"an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
         "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
         "true or false": lambda v: isinstance(v, bool)}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what would."""


def _check(errors: List[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def _quoted(value: Any) -> bool:
    return isinstance(value, str) and NUMBER.fullmatch(value.strip()) is not None


def check_types(node: DictConfig, prefix: str, keys: Sequence[str], kind: str, errors: List[str]) -> None:
    """Append an error for each of ``keys`` (see :data:`INTEGERS`) of ``node`` that is not of ``kind``."""
    for spec in keys:
        key, listed, nullable = spec.rstrip("?[]"), spec.endswith("[]"), spec.endswith("?")
        value = OmegaConf.select(node, key, default=KeyError)
        if value is KeyError or (value is None and nullable):
            continue  # not a key of this config (e.g. data.train_size of data=fake only)
        items = list(value) if listed and isinstance(value, ListConfig) else [value]
        if (listed and not isinstance(value, ListConfig)) or not all(map(KINDS[kind], items)):
            shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            expected = "a list of numbers" if listed else kind + " or null" * nullable
            hint = " (a quoted number is text: drop the quotes)" if any(map(_quoted, items)) else ""
            errors.append(f"{prefix}{key}={shown!r}: must be {expected}{hint}")


def check_quoted_numbers(node: Any, prefix: str, errors: List[str]) -> None:
    """Append an error for every text value that is a number in quotes (``attn.bits='16'``), outside
    :data:`FREE_TEXT` keys (paths, names)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if str(key) in FREE_TEXT or any(e.startswith(f"{name}=") for e in errors):
            continue  # free text, or already reported by check_types
        if _quoted(value):
            errors.append(f"{name}={value!r}: a quoted number is text; drop the quotes")
        check_quoted_numbers(value, name, errors)


def validate_model_config(cfg: DictConfig, errors: List[str]) -> None:
    names = timm.list_models("pvtv2_*")
    _check(errors, cfg.model.name in names, f"model={cfg.model.name}: unknown model; valid: {', '.join(names)}")
    if errors:
        return
    try:  # every attention option is checked by its constructor (a second or two for the largest models)
        build_model(cfg.model, cfg.attn, num_classes=1, load_pretrained=False)
    except (ValueError, TypeError, NotImplementedError) as err:
        errors.append(f"attn={cfg.attn.name}: {err}")
    if cfg.attn.get("score_path") == "packed":
        errors.append("attn.score_path=packed is Bitformer's inference path (no gradient through XOR/popcount): "
                      "train with attn.score_path=float, then evaluate with "
                      "`python eval.py ckpt=... attn=bitformer attn.score_path=packed`")


def validate_data_config(data: DictConfig, errors: List[str]) -> None:
    """Append an error for each bad value of a ``data`` node (types first: the value checks need them)."""
    known = len(errors)
    for keys, kind in DATA_TYPES:
        check_types(data, "data.", keys, kind, errors)
    if len(errors) > known:
        return
    _check(errors, data.name in DATASETS, f"data={data.name}: unknown dataset; valid: {', '.join(DATASETS)}")
    _check(errors, int(data.img_size) >= MIN_INPUT_SIZE,
           f"data.img_size={data.img_size}: PVTv2 needs at least {MIN_INPUT_SIZE} px")
    _check(errors, int(data.batch_size) >= 1, f"data.batch_size={data.batch_size}: must be >= 1")
    _check(errors, int(data.num_workers) >= 0, f"data.num_workers={data.num_workers}: must be >= 0")
    mixing = data.get("aug") is not None and (data.aug.mixup > 0 or data.aug.cutmix > 0)
    _check(errors, not mixing or int(data.batch_size) % 2 == 0,
           f"data.batch_size={data.batch_size}: mixup/cutmix need an even batch size")
    for key in ("eval_batch_size", "train_size", "val_size"):
        _check(errors, data.get(key) is None or int(data[key]) >= 1, f"data.{key}={data.get(key)}: must be >= 1")
    if data.get("per_class") is not None:
        _check(errors, int(data.per_class) >= 1, f"data.per_class={data.per_class}: must be >= 1 or null")


def validate_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every bad value of a train.py config."""
    errors: List[str] = []
    for node, prefix, types in ((cfg, "", TYPES), (cfg.data, "data.", DATA_TYPES)):
        for keys, kind in types:
            check_types(node, prefix, keys, kind, errors)
    check_quoted_numbers(OmegaConf.to_container(cfg, resolve=True), "", errors)
    if errors:  # the checks below need the right types
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    validate_model_config(cfg, errors)
    validate_data_config(cfg.data, errors)
    _check(errors, int(cfg.epochs) >= 1, f"epochs={cfg.epochs}: must be >= 1")
    _check(errors, cfg.max_steps_per_epoch is None or int(cfg.max_steps_per_epoch) >= 1,
           f"max_steps_per_epoch={cfg.max_steps_per_epoch}: must be >= 1, or null for whole epochs")
    _check(errors, cfg.sched.name in SCHEDULERS,
           f"sched.name={cfg.sched.name}: unknown scheduler; valid (timm's): {', '.join(SCHEDULERS)}")
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
    _check(errors, cfg.hash.target_rms is None or float(cfg.hash.target_rms) > 0,
           f"hash.target_rms={cfg.hash.target_rms}: must be > 0, or null for no rescaling")
    for key in ("init", "resume"):
        value = cfg.get(key)
        if value not in (None, "auto") and not os.path.isfile(str(value)):
            errors.append(f"{key}={value}: no such file")
    if cfg.logger.name not in ("none", "wandb"):
        errors.append(f"logger={cfg.logger.name}: valid loggers: none, wandb")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def config_differences(saved: Any, requested: Any, prefix: str = "") -> List[str]:
    """``key: saved -> requested`` for every leaf that differs between two config dicts."""
    if isinstance(saved, dict) and isinstance(requested, dict):
        return [line for key in sorted(set(saved) | set(requested), key=str)
                for line in config_differences(saved.get(key, "(absent)"), requested.get(key, "(absent)"),
                                               f"{prefix}{key}.")]
    return [] if saved == requested else [f"{prefix[:-1]}: {saved} -> {requested}"]


def misfit_message(path: str, saved: Optional[Dict[str, Any]], requested: Dict[str, Any], err: Exception) -> str:
    """Why the resume checkpoint ``path`` (its resolved config ``saved``) does not fit the ``requested`` config:
    both configurations and the keys of the model, attn and data groups that differ (not state-dict keys)."""
    def describe(c: Dict[str, Any]) -> str:
        return f"model={c['model']['name']} attn={c['attn']['name']} data={c['data']['name']}"

    if saved is None:
        return f"resume={path} does not fit this run ({describe(requested)}): {str(err).splitlines()[0][:200]}"
    differing = [line for group in ("model", "attn", "data")
                 for line in config_differences(saved[group], requested[group], f"{group}.")]
    return (f"resume={path} does not fit this run: it holds {describe(saved)}, this run asks for "
            f"{describe(requested)}; differing config keys: {'; '.join(differing[:12]) or 'none'}. Continue it with "
            "its own settings, or train the new configuration in another folder with hydra.run.dir=DIR")


def check_writable(folder: str) -> None:
    """Fail at start-up, not at the first checkpoint, when the run folder cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"run folder {os.path.abspath(folder)} is not writable ({err.strerror}); choose another "
                          f"with hydra.run.dir=DIR") from err

