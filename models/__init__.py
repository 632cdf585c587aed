"""PVTv2 family with pluggable attention, registered in timm as ``pvtv2_b0`` ... ``pvtv2_b5``, ``pvtv2_b2_li``."""
from .pvtv2 import VARIANTS, PVTv2, adapt_state_dict  # noqa: F401 (registers the models)
from .ops import count_model_ops, energy_pj
from .weights import load_checkpoint, load_checkpoint_state, model_state_of

__all__ = ["VARIANTS", "PVTv2", "adapt_state_dict", "load_checkpoint", "load_checkpoint_state", "model_state_of",
           "count_model_ops", "energy_pj"]
