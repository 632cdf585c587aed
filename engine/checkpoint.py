"""Training checkpoints: atomic writes, safe loads (``weights_only=True``), RNG state capture.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only: ``model``, ``model_ema``, ``optimizer``,
``scheduler``, ``scaler``, ``epoch`` (epochs completed), ``best_top1``, ``rng``, ``config`` (the resolved config),
``metrics`` (the epoch's record). EcoFormer hash buffers travel inside ``model``.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict, Union

import numpy as np
import torch

from models.weights import load_checkpoint as load  # noqa: F401 (weights_only loading lives below engine)

PathLike = Union[str, os.PathLike]


def save_atomic(obj: Dict[str, Any], path: PathLike) -> None:
    """Write ``obj`` to a temporary file beside ``path``, fsync it, then rename over ``path``: a crash at any
    moment leaves either the previous file or the new one, never a partial file."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
