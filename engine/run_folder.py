"""A training run's folder: one writer, nothing written before the run is checked, crash-consistent epochs.

``<run dir>/``: ``checkpoints/last.ckpt``, ``checkpoints/best.ckpt``, ``metrics.jsonl``, ``config.yaml``, ``.hydra/``,
``train.log``, and ``train.lock`` while a run holds the folder.

Each epoch is committed in three atomic replacements (temporary file, fsync, rename):

1. ``last.ckpt``, the commit point: it holds the epoch's metrics record and ``best_epoch``;
2. ``best.ckpt``, a copy of ``last.ckpt`` when the epoch is the best so far;
3. ``metrics.jsonl``, rewritten with the epoch's line.

A kill before step 1 loses that epoch only (the next run repeats it; on the CPU with the same numbers). A kill after
it leaves steps 2-3 to :meth:`RunFolder.recover`, which the next run calls before writing anything else: it re-does
them from ``last.ckpt`` and removes the temporary files of a killed writer. So the folder always reads as "epochs
``0 .. last.ckpt's epoch - 1`` done", each with exactly one metrics line, ``best.ckpt`` the best of them.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import TEMP_PREFIX, publish, write_temp

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
FAULT_ENV = "ECOPVT_TEST_FAULT"


class RunFolderError(RuntimeError):
    """A run folder that this run must not write: held by another run, or holding another run."""


def fault_point(name: str, epoch: int) -> None:
    """Crash-test hook: ``ECOPVT_TEST_FAULT=<name>@<epoch>`` SIGKILLs this process here, ``<name>@<epoch>:wait=PATH``
    pauses here until PATH exists. Names, in write order: ``commit`` (epoch trained and validated, nothing written),
    ``last.tmp``, ``last``, ``best.tmp``, ``best``, ``metrics.tmp``, ``metrics`` (``*.tmp``: temporary file written,
    not renamed; else: renamed into place). No-op unless the variable is set."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    where, _, action = spec.partition(":")
    if where != f"{name}@{epoch}":
        return
    if action.startswith("wait="):
        log.info("test hook: waiting at %s until %s exists", where, action[len("wait="):])
        while not os.path.exists(action[len("wait="):]):
            time.sleep(0.05)
        return
    os.kill(os.getpid(), signal.SIGKILL)


class RunLogHandler(logging.FileHandler):
    """Hydra's ``train.log`` handler for train.py (``configs/hydra/job_logging/ecopvt.yaml``): records are held in
    memory until :func:`start_run_log`, so a launch that is refused (bad config, folder in use, checkpoint that does
    not fit) leaves the folder's log as it was; the console shows them either way."""

    def __init__(self, filename: str, mode: str = "a", encoding: Optional[str] = None) -> None:
        super().__init__(filename, mode, encoding, delay=True)
        self.pending: Optional[List[logging.LogRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.pending is None:
            super().emit(record)
        elif len(self.pending) < 10_000:
            self.pending.append(record)

    def start(self) -> None:
        pending, self.pending = self.pending or [], None
        for record in pending:
            super().emit(record)


def start_run_log() -> None:
    """Write the held-back and all later log records to the run folder's log file."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogHandler):
            handler.start()


def _finite(value: Any) -> Any:
    """The record with non-finite floats as None (metrics.jsonl stays JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _text_writer(text: str) -> Any:
    return lambda f: f.write(text.encode())


class RunFolder:
    """The files of one training run (see the module docstring); only rank 0 calls the writing methods."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ckpt_dir = os.path.join(path, "checkpoints")
        self.last = os.path.join(self.ckpt_dir, "last.ckpt")
        self.best = os.path.join(self.ckpt_dir, "best.ckpt")
        self.metrics = os.path.join(path, "metrics.jsonl")
        self.lock_path = os.path.join(path, LOCK_NAME)
        self._lock_fd: Optional[int] = None

    # one writer --------------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's lock for this process, or raise naming the process that holds it. The lock is an
        exclusive ``flock`` on ``train.lock``, which the kernel releases when the process ends however it ends; a
        file left by a killed run is taken over with a warning."""
        try:
            os.makedirs(self.path, exist_ok=True)
            while True:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise RunFolderError(
                        f"run folder {self.path} is in use by {holder}: one training per folder. Wait for it to "
                        "finish (or stop it), or train elsewhere with hydra.run.dir=DIR") from None
                if os.path.exists(self.lock_path) and os.path.samestat(os.fstat(fd), os.stat(self.lock_path)):
                    break
                os.close(fd)  # the holder removed the file between our open and flock: lock the new one
        except OSError as err:
            raise RunFolderError(f"cannot lock run folder {os.path.abspath(self.path)} ({err.strerror}); choose "
                                 "another with hydra.run.dir=DIR") from err
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.warning("taking over the lock of %s in %s: that process is gone (killed?)", previous, self.path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n"
                  .encode(), 0)
        os.fsync(fd)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Remove ``train.lock`` (while still holding it), then release it."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):  # removed by hand meanwhile
            os.unlink(self.lock_path)
        os.close(self._lock_fd)
        self._lock_fd = None

    # checks before writing -----------------------------------------------------------------------------------------
    def resume_path(self, resume: Optional[str]) -> Optional[str]:
        """The checkpoint to resume from: ``auto``: ``last.ckpt`` when present. A folder that already holds a run
        only continues that run: any other ``resume`` there, or metrics without a checkpoint, is an error."""
        own = os.path.isfile(self.last)
        if not own and self.records()[0]:
            raise RunFolderError(f"{self.metrics} has records but {self.last} is missing: this folder holds another "
                                 "run's record; train in a new folder with hydra.run.dir=DIR")
        if resume == "auto":
            return self.last if own else None
        if own and (resume is None or not os.path.samefile(str(resume), self.last)):
            raise RunFolderError(f"{self.path} already holds a run ({self.last}); continue it with resume=auto, or "
                                 f"start resume={resume} in another folder with hydra.run.dir=DIR")
        return resume

    def records(self) -> Tuple[List[Dict[str, Any]], bool]:
        """(the records of metrics.jsonl, whether every line was readable)."""
        if not os.path.isfile(self.metrics):
            return [], True
        records, clean = [], True
        with open(self.metrics) as f:
            for number, line in enumerate(f, 1):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    clean = False
                    log.warning("%s: line %d is not JSON (half-written by an older version?); ignoring it",
                                self.metrics, number)
        return records, clean

    # writing -----------------------------------------------------------------------------------------------------
    def open(self, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
        """Record the run's configuration once every check has passed: ``config.yaml`` (resolved) and Hydra's
        ``.hydra/{config,hydra,overrides}.yaml`` (hydra.output_subdir=null keeps Hydra from writing them before
        ``main``); start the log file."""
        hydra_dir = os.path.join(self.path, ".hydra")
        files = {os.path.join(self.path, "config.yaml"): OmegaConf.to_yaml(cfg, resolve=True),
                 os.path.join(hydra_dir, "config.yaml"): OmegaConf.to_yaml(cfg),
                 os.path.join(hydra_dir, "hydra.yaml"): OmegaConf.to_yaml({"hydra": hydra_cfg}),
                 os.path.join(hydra_dir, "overrides.yaml"): OmegaConf.to_yaml(hydra_cfg.overrides.task)}
        for path, text in files.items():
            publish(write_temp(path, _text_writer(text)), path)
        start_run_log()

    def recover(self, state: Optional[Dict[str, Any]]) -> bool:
        """Before anything else is written: remove temporary files of a killed writer, and complete the last epoch
        of ``state`` (this folder's last.ckpt) with its best.ckpt copy and metrics line where they are missing.
        Returns whether anything changed."""
        leftovers = [os.path.join(folder, name) for folder in (self.path, self.ckpt_dir) if os.path.isdir(folder)
                     for name in os.listdir(folder) if name.startswith(TEMP_PREFIX)]
        for path in leftovers:
            log.info("removing %s (left by a killed run)", path)
            os.unlink(path)
        changed = self._complete(state, recovering=True) if state is not None else False
        if changed or leftovers:
            start_run_log()  # the repair belongs to the folder's log
        return changed or bool(leftovers)

    def commit(self, state: Dict[str, Any]) -> None:
        """Write epoch ``state["epoch"] - 1``: last.ckpt (the commit), then best.ckpt and metrics.jsonl."""
        epoch = int(state["epoch"]) - 1
        fault_point("commit", epoch)
        tmp = write_temp(self.last, lambda f: torch.save(state, f))
        fault_point("last.tmp", epoch)
        publish(tmp, self.last)
        fault_point("last", epoch)
        self._complete(state, recovering=False)

    def _complete(self, state: Dict[str, Any], recovering: bool) -> bool:
        epoch, changed = int(state["epoch"]) - 1, False
        if state.get("best_epoch") == epoch and not (recovering and _epoch_of(self.best) == epoch + 1):
            if recovering:
                log.info("completing epoch %d: best.ckpt", epoch)
            with open(self.last, "rb") as source:
                tmp = write_temp(self.best, lambda f: shutil.copyfileobj(source, f))
            fault_point("best.tmp", epoch)
            publish(tmp, self.best)
            fault_point("best", epoch)
            changed = True
        records, clean = self.records()
        if not clean or [r.get("epoch") for r in records if r.get("epoch", -1) >= epoch] != [epoch]:
            if recovering:
                log.info("completing epoch %d: its metrics.jsonl line", epoch)
            kept = [r for r in records if r.get("epoch", -1) < epoch] + [state["metrics"]]
            tmp = write_temp(self.metrics, _text_writer("".join(json.dumps(_finite(r)) + "\n" for r in kept)))
            fault_point("metrics.tmp", epoch)
            publish(tmp, self.metrics)
            fault_point("metrics", epoch)
            changed = True
        return changed


def _epoch_of(path: str) -> Optional[int]:
    """The ``epoch`` of a checkpoint file, None when missing or unreadable (it is then rewritten)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # missing, truncated or foreign: the caller replaces it
        return None
