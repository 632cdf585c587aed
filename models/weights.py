"""Weight files: safe loading (``weights_only=True``) and the model state inside a checkpoint.

Lives below ``engine`` so that models (timm's pretrained path) can read files without importing upward;
``engine.checkpoint.load`` is this module's :func:`load_checkpoint`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Union

import torch

PathLike = Union[str, os.PathLike]


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint written by ``engine.checkpoint.save_atomic`` with ``weights_only=True`` (a pickle that would run code is
    refused); a truncated or corrupt file raises a ``RuntimeError`` that says so."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as err:
        raise RuntimeError(f"checkpoint {path!r} is truncated or corrupt ({err}); use another checkpoint "
                           f"(e.g. last.ckpt / best.ckpt of the run)") from err
    except Exception as err:
        if "weights_only" in str(err):
            raise RuntimeError(f"checkpoint {path!r} holds objects other than tensors and plain data and was refused "
                               f"(loaded with weights_only=True for safety): {str(err).splitlines()[0]}") from err
        raise


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
                raise KeyError(f"checkpoint {path!r} has no EMA weights (saved without model_ema)")
            obj = obj["model_ema"]
        else:
            for key in ("model", "state_dict", "model_state"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
