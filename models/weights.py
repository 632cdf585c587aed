"""Weight files: safe loading (``weights_only=True``) and the model state inside a checkpoint.

Lives below ``engine`` so that models (timm's pretrained path) can read files without importing upward;
``engine.checkpoint.load`` is this module's :func:`load_checkpoint`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Union

import torch

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A weight or checkpoint file that cannot be used; the message names the file and what to do."""


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint written by ``engine.checkpoint.save_atomic`` with ``weights_only=True`` (a pickle that would
    run code is refused); a missing, truncated, corrupt or foreign file raises :class:`CheckpointError` saying so."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError, ... for such files
        reason = " ".join(str(err).split()) or type(err).__name__
        if "GLOBAL" in reason:
            raise CheckpointError(f"checkpoint {path!r} holds objects other than tensors and plain data and was "
                                  f"refused (loaded with weights_only=True for safety): {reason[:300]}") from err
        raise CheckpointError(f"{path!r} is not a readable PyTorch checkpoint (truncated or corrupt, or another kind "
                              f"of file: {type(err).__name__} {reason[:200]}); use another checkpoint (e.g. "
                              "last.ckpt / best.ckpt of the run)") from err


def load_checkpoint_state(path: PathLike, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Model weights from a file: this project's checkpoints (``model`` / ``model_ema``), a timm or original PVT
    state dict (``.pth``/``.bin``/``.safetensors``, optionally under ``state_dict``/``model``). Always loaded with
    ``weights_only=True``: a pickle that would run code is refused."""
    path = os.fspath(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)
    return model_state_of(load_checkpoint(path), use_ema, path)


def model_state_of(obj: Any, use_ema: bool = False, path: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint object (see :func:`load_checkpoint_state`)."""
    if isinstance(obj, dict):
        if use_ema:
            if obj.get("model_ema") is None:
                raise CheckpointError(f"checkpoint {path!r} has no EMA weights (trained with ema.enabled=false); "
                                      "drop use_ema=true")
            obj = obj["model_ema"]
        else:
            for key in ("model", "state_dict", "model_state"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
