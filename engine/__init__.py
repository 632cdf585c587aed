"""Shared pieces of train.py, eval.py and scripts/: building models from configs, data, checkpoints."""
