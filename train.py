#!/usr/bin/env python
"""Train a PVTv2 backbone with softmax, Bitformer or EcoFormer attention.

    python train.py model=pvtv2_b0 attn=ecoformer data=cifar100 data.root=DIR
    python train.py -m attn=softmax,bitformer,ecoformer seed=0,1          # a sweep, one folder per job
    python train.py -m hparams_search=ecoformer_hash hydra/launcher=joblib  # Optuna search, parallel jobs (README)
    torchrun --nproc_per_node=N train.py ...                             # DistributedDataParallel

Read top to bottom: config checks, distributed set-up and the run folder's lock, data, model, optimizer/scheduler/
EMA, resume, the run folder (completed, recorded), then the epoch loop (hash re-fit callbacks -> train_one_epoch ->
evaluate -> checkpoints / metrics.jsonl, engine/run_folder.py). Nothing in the run folder changes before the config,
the data and the resume checkpoint are checked.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import hydra
import torch
import torch.distributed as dist
import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engine import checkpoint as ckpt_io
from engine import sweep
from engine.build import build_model, load_optimizer_state, optimizer_args
from engine.config import ConfigError, check_writable, config_differences, misfit_message, validate_train_config
from engine.data import (bad_image_count, build_dataset, build_loader, build_mixup, build_transform, class_names,
                         num_classes_of)
from engine.errors import reported_errors
from engine.evaluate import amp_dtype, autocast, evaluate, resolve_device
from engine.run_folder import RunFolder
from models import adapt_state_dict, load_checkpoint_state
from models.weights import CheckpointError

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    pass


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group (NCCL on CUDA, gloo on CPU) under torchrun."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_callbacks(cfg: DictConfig, model: nn.Module) -> List[Any]:
    """The hash-learning callback when the model has EcoFormer layers and ``hash.enabled`` (DESIGN §4), on fixed
    training images (with the evaluation transform). ``hash.enabled=false`` keeps the initial random hash."""
    if not cfg.hash.enabled or not any(m.attn_name == "ecoformer" for _, m in model.attention_modules()):
        return []
    from hashing import HashLearningCallback

    train_eval_ds = build_dataset(cfg.data, True, build_transform(cfg.data, train=False))
    generator = torch.Generator().manual_seed(int(cfg.hash.seed))
    count = min(int(cfg.hash.num_images), len(train_eval_ds))
    index = torch.randperm(len(train_eval_ds), generator=generator)[:count].tolist()
    images = torch.stack([train_eval_ds[i][0] for i in index])
    max_tokens = None if cfg.hash.max_tokens is None else int(cfg.hash.max_tokens)
    return [HashLearningCallback(images, every_epochs=int(cfg.hash.every_epochs), max_tokens=max_tokens,
                                 pairs=int(cfg.hash.pairs), steps=int(cfg.hash.steps), lr=float(cfg.hash.lr),
                                 seed=int(cfg.hash.seed),
                                 target_rms=None if cfg.hash.target_rms is None else float(cfg.hash.target_rms))]


def steps_per_epoch(cfg: DictConfig, loader: Any) -> int:
    return len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), int(cfg.max_steps_per_epoch))


def train_one_epoch(epoch: int, model: nn.Module, loader: Any, criterion: nn.Module, optimizer: Any, scheduler: Any,
                    scaler: Optional[torch.amp.GradScaler], ema: Optional[ModelEmaV3], mixup: Any,
                    cfg: DictConfig, device: torch.device, dtype: Optional[torch.dtype], rank: int) -> Dict[str, float]:
    """One pass over ``loader``: an optimizer step every ``grad_accum`` batches (whole windows only), the scheduler
    and EMA stepped per update. A window with a non-finite loss raises :class:`NonFiniteLossError` naming its step,
    or is skipped (``skip_nonfinite``); ranks decide together, once per update."""
    model.train()
    accum = int(cfg.grad_accum)
    updates_per_epoch = steps_per_epoch(cfg, loader) // accum
    steps = updates_per_epoch * accum
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # over the images of finite windows
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_finite = torch.ones((), device=device)
    seen, counted, window_images, skipped, start = 0, 0, 0, 0, time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        update = (step + 1) % accum == 0
        sync = update or not isinstance(model, DistributedDataParallel)
        with contextlib.nullcontext() if sync else model.no_sync():  # DDP: all-reduce gradients on updates only
            with autocast(device, dtype):
                loss = criterion(model(images), targets)
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        window_finite = window_finite * torch.isfinite(loss.detach())
        window_loss += loss.detach().double() * len(images)
        window_images += len(images)
        if update:
            if dist.is_initialized():  # every rank takes the same decision
                dist.all_reduce(window_finite, op=dist.ReduceOp.MIN)
            if window_finite.item():
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), float(cfg.grad_clip))
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                loss_sum += window_loss
                counted += window_images
            elif not cfg.skip_nonfinite:
                raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {step}")
            else:
                skipped += 1
                log.warning("skipping step %d of epoch %d: non-finite loss", step, epoch)
            optimizer.zero_grad(set_to_none=True)
            seen += window_images
            window_loss.zero_()
            window_finite.fill_(1.0)
            window_images = 0
            update_index = epoch * updates_per_epoch + (step + 1) // accum
            if ema is not None:
                ema.update(model, step=update_index)
            if scheduler is not None:
                scheduler.step_update(update_index)
        if rank == 0 and (step % int(cfg.log_interval) == 0 or step + 1 == steps):
            rate = seen * (dist.get_world_size() if dist.is_initialized() else 1) / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{rate:.0f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    totals = torch.stack([loss_sum, torch.tensor(float(counted), dtype=torch.float64, device=device),
                          torch.tensor(float(seen), dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    train_loss = (totals[0] / totals[1]).item() if totals[1] > 0 else None  # None: every update was skipped
    return {"train_loss": train_loss, "images_per_s": totals[2].item() / seconds, "seconds": seconds,
            "skipped_steps": skipped}


def check_buffers_in_sync(model: nn.Module) -> None:
    """Raise unless every rank holds the same buffers (EcoFormer hashes) as rank 0."""
    device = next(model.parameters()).device
    local = torch.cat([b.double().flatten() for b in model.buffers()] or [torch.zeros(1, device=device)])
    reference = local.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor(float(torch.equal(local, reference)), device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if not same.item():
        raise RuntimeError("hash buffers differ between ranks after the hash fit")
    log.info("hash buffers identical on %d ranks", dist.get_world_size())


def end_of_run(best_top1: float) -> float:
    """Close the process group; stop with status 3 when no epoch had a finite result (all skipped)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if best_top1 < 0:
        log.error("no epoch of this run had finite results (every one was skipped, see metrics.jsonl), so there is "
                  "no best.ckpt; lower optim.lr or set grad_clip")
        raise SystemExit(3)
    return best_top1


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
@sweep.job  # scheduler rank variables; in a sweep: joblib slot, failures raised for Hydra / Optuna
def main(cfg: DictConfig) -> Optional[float]:
    folder = RunFolder(HydraConfig.get().runtime.output_dir)
    try:
        with reported_errors(log):
            return train(cfg, folder)
    finally:
        folder.unlock()


def train(cfg: DictConfig, folder: RunFolder) -> Optional[float]:
    validate_train_config(cfg)
    rank, world_size, device = setup_distributed(cfg.device)
    run_dir = folder.path
    if rank == 0:  # one writer per run folder, before anything is written: a second run stops here naming this one
        folder.lock()
    dtype = amp_dtype(cfg.amp, device)
    seed_everything(int(cfg.seed) + rank)
    resume_path = folder.resume_path(cfg.resume)
    resume_state = ckpt_io.load_training_state(resume_path) if resume_path else None
    if rank == 0:
        log.info("run folder %s (%d process%s, %s, amp %s)", run_dir, world_size, "es" * (world_size > 1), device,
                 dtype)

    # data ------------------------------------------------------------------------------------------------------
    if world_size > 1 and rank != 0:
        dist.barrier()  # rank 0 downloads (data.download=true) and checks the data first
    train_ds = build_dataset(cfg.data, True, build_transform(cfg.data, train=True))
    classes = class_names(train_ds)  # validation labels follow the training split's class index
    val_ds = build_dataset(cfg.data, False, build_transform(cfg.data, train=False), classes)
    if world_size > 1 and rank == 0:
        dist.barrier()
    if len(train_ds) // world_size < int(cfg.data.batch_size):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training set per process "
                          f"({len(train_ds) // world_size} images); lower data.batch_size")
    num_classes = num_classes_of(cfg.data, train_ds)
    train_loader = build_loader(cfg.data, train_ds, True, rank, world_size, int(cfg.seed))
    val_loader = build_loader(cfg.data, val_ds, False, rank, world_size, int(cfg.seed))
    mixup = build_mixup(cfg.data, num_classes)
    if mixup is not None:
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg.data.aug.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(float(cfg.data.aug.smoothing))
    else:
        criterion = nn.CrossEntropyLoss()

    # model -----------------------------------------------------------------------------------------------------
    model = build_model(cfg.model, cfg.attn, num_classes, load_pretrained=resume_path is None)
    if cfg.init and not resume_path:
        try:
            adapted, report = adapt_state_dict(load_checkpoint_state(cfg.init), model)
        except ValueError as err:
            raise CheckpointError(f"init={cfg.init}: {err}") from None
        model.load_state_dict(adapted)
        log.info("init from %s: %s", cfg.init, {k: len(v) for k, v in report.items()})
    callbacks = build_callbacks(cfg, model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        log.info("%s attn=%s: %.2f M parameters, %d classes", cfg.model.name, cfg.attn.name, params / 1e6, num_classes)

    # optimizer, schedule, EMA, AMP scaler --------------------------------------------------------------------------
    updates_per_epoch = steps_per_epoch(cfg, train_loader) // int(cfg.grad_accum)
    if updates_per_epoch < 1:
        raise ConfigError(f"grad_accum={cfg.grad_accum} is larger than the {steps_per_epoch(cfg, train_loader)} steps "
                         "of an epoch; lower grad_accum or data.batch_size")
    lr = float(cfg.optim.lr)
    if cfg.optim.lr_base_batch:
        lr *= int(cfg.data.batch_size) * world_size * int(cfg.grad_accum) / float(cfg.optim.lr_base_batch)
    optimizer = create_optimizer_v2(model, lr=lr, **optimizer_args(cfg.optim))
    # warmup_prefix: the decay starts at its peak after the warm-up and spans the remaining epochs (one-cycle like)
    prefix = int(cfg.sched.warmup_epochs) if cfg.sched.warmup_prefix else 0
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched.name, num_epochs=int(cfg.epochs) - prefix,
                                       warmup_epochs=int(cfg.sched.warmup_epochs), warmup_lr=float(cfg.sched.warmup_lr),
                                       warmup_prefix=bool(cfg.sched.warmup_prefix), min_lr=float(cfg.sched.min_lr),
                                       cooldown_epochs=int(cfg.sched.cooldown_epochs), step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    # buffers (EcoFormer hashes) are copied, not averaged: the EMA model always uses the current hashes
    ema = (ModelEmaV3(model, decay=float(cfg.ema.decay), use_warmup=bool(cfg.ema.warmup), exclude_buffers=True)
           if cfg.ema.enabled else None)

    # resume ----------------------------------------------------------------------------------------------------
    start_epoch, best_top1, best_epoch = 0, -1.0, None
    if resume_state:
        state, requested = resume_state, OmegaConf.to_container(cfg, resolve=True)
        if state.get("classes") and classes and state["classes"] != classes:
            raise CheckpointError(f"resume={resume_path}: the class folders changed since it was written (now "
                                  f"{len(classes)}, then {len(state['classes'])}; labels would shift); restore them or "
                                  "train in another folder with hydra.run.dir=DIR")
        try:
            model.load_state_dict(state["model"])
            load_optimizer_state(optimizer, state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(misfit_message(resume_path, state.get("config"), requested, err)) from None
        changed = config_differences(state.get("config") or {}, requested)
        if changed and rank == 0:
            log.info("resuming with changed settings: %s", "; ".join(changed))
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("model_ema") is not None:
            ema.module.load_state_dict(state["model_ema"])
        elif ema is not None:  # EMA newly enabled on resume: start it from the resumed weights
            ema.set(model)
        ckpt_io.set_rng_state(state["rng"])
        if rank != 0:  # each rank continues its own stream
            torch.manual_seed(int(cfg.seed) + rank + 1000 * int(state["epoch"]))
        start_epoch, best_top1, best_epoch = int(state["epoch"]), float(state["best_top1"]), state.get("best_epoch")
        log.info("resumed from %s at epoch %d", resume_path, start_epoch)

    # the run folder: complete the last epoch of a killed run, stop here if the run is done, record the config ------
    if rank == 0:
        check_writable(folder.ckpt_dir)
        folder.recover(resume_state if resume_path == folder.last else None)
    if start_epoch >= int(cfg.epochs):
        log.info("%s: the run is finished (%d epochs, epochs=%d); nothing to do. Raise epochs to train on", run_dir,
                 start_epoch, int(cfg.epochs))
        return end_of_run(best_top1)
    if rank == 0:
        folder.open(cfg, HydraConfig.get())

    train_model: nn.Module = model
    if cfg.compile:
        train_model = torch.compile(model)
    if world_size > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    wandb_run = None
    if rank == 0 and cfg.logger.name == "wandb":
        import wandb

        os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, dir=run_dir,
                               config=OmegaConf.to_container(cfg, resolve=True), tags=list(cfg.logger.tags),
                               name=os.path.basename(run_dir), resume="allow",
                               settings=wandb.Settings(init_timeout=30))

    # epochs ----------------------------------------------------------------------------------------------------
    for epoch in range(start_epoch, int(cfg.epochs)):
        train_loader.sampler.set_epoch(epoch)
        record: Dict[str, Any] = {"epoch": epoch}
        for callback in callbacks:
            stats = callback.on_epoch_start(model, epoch)
            if stats:
                record["hash_fit"] = stats
                if world_size > 1:
                    check_buffers_in_sync(model)
        try:
            record.update(train_one_epoch(epoch, train_model, train_loader, criterion, optimizer, scheduler, scaler,
                                          ema, mixup, cfg, device, dtype, rank))
        except NonFiniteLossError as err:
            log.error("%s; stopping without saving (last good checkpoint: %s). Lower optim.lr, set grad_clip, or "
                      "set skip_nonfinite=true to skip such steps", err,
                      folder.last if os.path.isfile(folder.last) else "none")
            raise SystemExit(3) from None
        record["lr"] = optimizer.param_groups[0]["lr"]
        if bad_image_count(train_ds):
            record["bad_images"] = bad_image_count(train_ds)
        if (epoch + 1) % int(cfg.eval_every) == 0 or epoch + 1 == int(cfg.epochs):
            val = evaluate(model, val_loader, device, dtype, progress=rank == 0)
            record.update({f"val_{k}": v for k, v in val.items() if k != "images"})
            if ema is not None:
                record.update({f"val_ema_{k}": v for k, v in evaluate(ema.module, val_loader, device, dtype,
                                                                       progress=False).items() if k != "images"})
        skipped = ("every update was skipped (non-finite loss)" if record["train_loss"] is None else
                   "the validation loss is not finite" if not math.isfinite(record.get("val_loss", 0.0)) else None)
        if skipped and not cfg.skip_nonfinite:
            log.error("epoch %d: %s; stopping without saving (last good checkpoint: %s). Lower optim.lr, set "
                      "grad_clip, or set skip_nonfinite=true to record such epochs as skipped", epoch, skipped,
                      folder.last if os.path.isfile(folder.last) else "none")
            raise SystemExit(3)
        if skipped:  # recorded, never the best
            record["skipped"] = skipped
            log.warning("epoch %d skipped: %s", epoch, skipped)
        if not torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all():
            log.error("non-finite weights after epoch %d; stopping without saving", epoch)
            raise SystemExit(3)
        if not skipped and record.get("val_top1", -1.0) > best_top1:
            best_top1, best_epoch = record["val_top1"], epoch
        if rank == 0:
            state = {"model": model.state_dict(), "model_ema": ema.module.state_dict() if ema else None,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                     "scaler": scaler.state_dict() if scaler else None, "epoch": epoch + 1, "best_top1": best_top1,
                     "best_epoch": best_epoch, "rng": ckpt_io.rng_state(),
                     "config": OmegaConf.to_container(cfg, resolve=True), "classes": classes, "metrics": record}
            folder.commit(state)
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=epoch)
            log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v
                                             for k, v in record.items() if k != "hash_fit"})
    if wandb_run is not None:
        wandb_run.finish()
    return end_of_run(best_top1)


if __name__ == "__main__":
    sweep.check_plugins(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"))
    main()
