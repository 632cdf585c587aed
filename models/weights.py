"""Weight files: safe loading (``weights_only=True``), the model state inside a checkpoint, and the three key
layouts that PVTv2 weights come in, mapped to timm's names (which this project's models use).

Layouts (:func:`weight_layout` names them):

- ``timm``: timm's ``pvt_v2_*`` and this project's (``patch_embed.proj``, ``stages.<i>.blocks.<j>``).
- ``pvt``: the original PVT repository's (``patch_embed1..4``, ``block1..4.<j>``, ``norm1..4``); timm's
  ``checkpoint_filter_fn`` renames them.
- ``ecoformer_authors``: the EcoFormer authors' (ziplab/EcoFormer ``pvt/``): PVT names, and in their EcoFormer
  blocks ``attn.to_qk``, ``attn.to_v`` and the hash ``attn.fast_attention.ksh.{A, mvec, anchor}``; their full-MSA
  blocks (every stage of ``attn_type=msa``, the last stage of their EcoFormer models) fuse ``attn.qkv``.
  Mapped to ``attn.qk``, ``attn.v``, ``attn.hash.{projection, kernel_mean, anchors}`` and ``attn.q`` /
  ``attn.kv`` (rows C..3C of qkv: keys then values, as in timm's kv). Their files hold no bandwidth σ (their
  code recomputes it from every input: ``attn.formula=authors``) and an unused Performer buffer
  ``fast_attention.projection_matrix``, dropped.

Lives below ``engine`` so that models (timm's pretrained path) can read files without importing upward;
``engine.checkpoint.load`` is this module's :func:`load_checkpoint`.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Dict, Mapping, Union

import torch
from timm.models.pvt_v2 import checkpoint_filter_fn as _pvt_to_timm_names

PathLike = Union[str, os.PathLike]
# The EcoFormer authors' checkpoints (DeiT-style main.py) store their argparse options beside the weights:
# weights_only loads allow that plain attribute container and nothing else (as timm's loader does).
_SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(RuntimeError):
    """A weight or checkpoint file that cannot be used; the message names the file and what to do."""


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint or weight file with ``weights_only=True`` (a pickle that would run code is refused); a missing, truncated, corrupt or foreign file raises :class:`CheckpointError` saying so."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
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


def weight_layout(state: Mapping[str, Any]) -> str:
    """Which layout (``timm``, ``pvt`` or ``ecoformer_authors``) a PVTv2 state dict uses; a ``ValueError`` naming its keys when it is none of them."""
    keys = list(state)
    if any(re.search(r"\.attn\.(to_qk|to_v|qkv|fast_attention)\.", k) for k in keys):
        return "ecoformer_authors"
    if "patch_embed.proj.weight" in state:
        return "timm"
    if "patch_embed1.proj.weight" in state:
        return "pvt"
    raise ValueError(f"these weights are not PVTv2 weights in a known layout (timm's / this project's: "
                     f"'patch_embed.proj.weight', 'stages.*'; the PVT repository's: 'patch_embed1.*', 'block1.*'; the "
                     f"EcoFormer authors': 'block1.0.attn.to_qk.*', '...fast_attention.ksh.A'); the file has "
                     f"{len(keys)} tensors, e.g. {keys[:6]}")


def to_timm_names(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict in any of the three layouts with timm's (this project's) names; see the module docstring."""
    layout = weight_layout(state)
    if layout == "timm":
        return dict(state)
    state = _pvt_to_timm_names(dict(state), None)
    if layout == "pvt":
        return state
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix, sep, name = key.partition(".attn.")
        if not sep:
            out[key] = value
        elif name.startswith("qkv."):  # (3C, ...) -> q (C, ...), kv (2C, ...)
            dim = value.shape[0] // 3
            out[f"{prefix}.attn.q.{name[4:]}"] = value[:dim]
            out[f"{prefix}.attn.kv.{name[4:]}"] = value[dim:]
        elif name == "fast_attention.ksh.A":
            out[f"{prefix}.attn.hash.projection"] = value
        elif name in ("fast_attention.ksh.mvec", "fast_attention.ksh.anchor"):  # (1, H, 1, m), (1, H, m, d)
            if value.dim() != 4 or value.shape[0] != 1:
                raise ValueError(f"{key} has shape {tuple(value.shape)}; the authors' released checkpoints hold "
                                 "(1, heads, 1, anchors) / (1, heads, anchors, head_dim)")
            mapped = "kernel_mean" if name.endswith("mvec") else "anchors"
            out[f"{prefix}.attn.hash.{mapped}"] = value[0, :, 0] if mapped == "kernel_mean" else value[0]
        elif name != "fast_attention.projection_matrix":
            out[f"{prefix}.attn.{name.replace('to_qk.', 'qk.').replace('to_v.', 'v.')}"] = value
    return out
