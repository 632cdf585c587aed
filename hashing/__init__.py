"""EcoFormer's kernelized hash and its self-supervised learning (DESIGN §3-4).

- :class:`KernelizedHash`: the per-head hash H(u) = sign(A(κ(u) − μ)) with buffers only, straight-through backward;
  a fused C++ pass at CPU inference (:mod:`hashing.native` builds the project's C++ kernels).
- :func:`fit_hash`: re-fit one hash on captured unit vectors (greedy KSH on attention targets).
- :class:`HashLearningCallback`: re-fit every hash of a model every τ epochs, layer by layer.
"""
from .callback import HashLearningCallback
from .fit import (HashFitStats, PairTargets, attention_targets, check_pairs, code_loss, fit_hash,
                  neighbour_agreement, subsample_tokens)
from .kernel_hash import KernelizedHash, check_hash_sizes, sign_ste

__all__ = ["KernelizedHash", "check_hash_sizes", "sign_ste", "fit_hash", "HashFitStats", "PairTargets",
           "attention_targets", "code_loss", "neighbour_agreement", "subsample_tokens", "check_pairs",
           "HashLearningCallback"]
