"""Training checkpoints: atomic writes, safe loads (``weights_only=True``), RNG state capture.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only: ``model``, ``model_ema``, ``optimizer``,
``scheduler``, ``scaler``, ``epoch`` (epochs completed), ``best_top1``, ``best_epoch`` (index of the best epoch so
far, None while none has a finite validation), ``rng``, ``config`` (the resolved config), ``metrics`` (the epoch's
record), ``classes`` (class names in label order, or None). EcoFormer hash buffers travel inside ``model``.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, BinaryIO, Callable, Dict, Union

import numpy as np
import torch

from models.weights import CheckpointError
from models.weights import load_checkpoint as load  # weights_only loading lives below engine

PathLike = Union[str, os.PathLike]
TEMP_PREFIX = ".tmp-"  # files being written; a run folder's are removed when its next run starts
_UMASK = os.umask(0o022)  # the process's umask (reading it means setting it), for write_temp's file mode
os.umask(_UMASK)


def write_temp(path: PathLike, write: Callable[[BinaryIO], None]) -> str:
    """Write a temporary file ``.tmp-*`` beside ``path`` with ``write(f)`` and fsync it; returns its path (removed
    again when ``write`` fails). :func:`publish` then puts it in place."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as an ordinary file (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def publish(tmp: str, path: PathLike) -> None:
    """Rename ``tmp`` over ``path`` and fsync the folder: readers see the old file or the new one, never a part."""
    path = os.fspath(path)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(obj: Dict[str, Any], path: PathLike) -> None:
    """``torch.save`` through a temporary file, fsync and rename: a crash at any moment leaves either the previous
    file or the new one, never a partial file (at most a ``.tmp-*`` file beside it)."""
    publish(write_temp(path, lambda f: torch.save(obj, f)), path)


def load_training_state(path: PathLike) -> Dict[str, Any]:
    """A train.py checkpoint to resume from (see the module docstring); another kind of file fails naming it."""
    state = load(path)
    missing = [key for key in ("model", "optimizer", "epoch", "rng") if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"resume={path} is not a train.py checkpoint (no {', '.join(missing)}): to start from "
                              f"its weights, use init={path} in a new run folder")
    return state


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and plain data."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
