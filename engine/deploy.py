"""ONNX deployment: export with the bitwise ops kept, metadata, verification against PyTorch, int8 weights, and an
onnxruntime classifier (export.py, eval.py, scripts/bench_deploy.py).

The graph comes from ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript; opset >= 18, every node in the
default domain). While exporting, Bitformer's packed path builds its scores from BitwiseXor and a popcount lookup
table (:func:`attention.bitformer.table_scores`) and EcoFormer's hash takes its signs from comparisons
(:func:`hashing.kernel_hash.sign_by_comparison`): the same numbers as in PyTorch, from ops every runtime has.
``onnx``, ``onnxruntime`` and ``onnxscript`` (the ``export`` extra) are imported on first use only.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from attention.bitformer import BitformerAttention
from models.pvtv2 import MIN_INPUT_SIZE

log = logging.getLogger(__name__)

METADATA_KEY = "ecopvt"
MIN_OPSET = 18
DYNAMIC = ("none", "batch", "size")      # fixed shape | any batch | any batch and height/width (multiples of 32)
QUANTIZE = ("none", "dynamic")
BITWISE_OPS = ("BitwiseXor", "BitwiseAnd", "BitwiseOr", "BitwiseNot", "BitShift")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXTRA_HINT = "install the export extra: pip install -e '.[export]' (onnx, onnxruntime, onnxscript)"
_MAX_BATCH, _MAX_SIDE_STEPS = 4096, 512   # bounds of the symbolic dimensions (512 x 32 = 16384 px)


class DeployError(ValueError):
    """An export or ONNX-loading request that cannot work; the message names the cause and the fix."""


def _require(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise DeployError(f"{module} is not installed ({err}); {EXTRA_HINT}") from None


# export ---------------------------------------------------------------------------------------------------------
def pooled_grids(model: nn.Module, img_size: int) -> List[Sequence[int]]:
    """Token grids (H, W) seen by attention with adaptive pooling (``pvtv2_b2_li``) at ``img_size``."""
    grids: List[Sequence[int]] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: grids.append(tuple(args[1])))
             for m in model.modules() if getattr(m, "pool", None) is not None]
    if hooks:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
        for hook in hooks:
            hook.remove()
    return grids


def check_exportable(model: nn.Module, img_size: int, dynamic: str, opset: int) -> None:
    """:class:`DeployError` for a request the exporter cannot honour, before any slow work."""
    if dynamic not in DYNAMIC:
        raise DeployError(f"dynamic={dynamic}: valid values are {', '.join(DYNAMIC)}")
    if opset < MIN_OPSET:
        raise DeployError(f"opset={opset}: the exporter needs opset >= {MIN_OPSET}")
    if img_size < MIN_INPUT_SIZE:
        raise DeployError(f"img_size={img_size}: PVTv2 needs at least {MIN_INPUT_SIZE} px")
    pooling = any(getattr(m, "pool", None) is not None for m in model.modules())
    if pooling and dynamic == "size":
        raise DeployError("this model pools keys/values to 7x7 with adaptive pooling (pvtv2_b2_li), which ONNX "
                          "exports only at fixed sizes: use dynamic=batch (or none) and a fixed img_size")
    bad = sorted({g for g in pooled_grids(model, img_size) if g[0] % 7 or g[1] % 7}) if pooling else []
    if bad:
        raise DeployError(f"img_size={img_size}: the adaptive 7x7 pooling of this model (pvtv2_b2_li) exports only "
                          f"on token grids divisible by 7, got {bad}; use a multiple of 224, e.g. img_size=224")
    if dynamic == "size" and img_size % 32:
        raise DeployError(f"img_size={img_size}: dynamic=size exports height/width as multiples of 32; "
                          "choose an img_size divisible by 32")


def dynamic_shapes(dynamic: str) -> Optional[Dict[str, Dict[int, Any]]]:
    """torch.export dynamic shapes of the image input for ``dynamic`` (see :data:`DYNAMIC`)."""
    if dynamic == "none":
        return None
    from torch.export import Dim

    dims: Dict[int, Any] = {0: Dim("batch", min=1, max=_MAX_BATCH)}
    if dynamic == "size":
        dims[2] = 32 * Dim("h32", min=1, max=_MAX_SIDE_STEPS)
        dims[3] = 32 * Dim("w32", min=1, max=_MAX_SIDE_STEPS)
    return {"x": dims}


def export_onnx(model: nn.Module, path: str, img_size: int, opset: int = MIN_OPSET, dynamic: str = "batch",
                batch: int = 2, metadata: Optional[Mapping[str, Any]] = None, optimize: bool = True) -> None:
    """Write ``model`` (eval mode) to ``path`` as one self-contained ONNX file.

    Input ``images`` (B, 3, img_size, img_size) float32, output ``logits`` (B, classes); ``batch`` is the example's
    (and, with ``dynamic=none``, the file's) batch size. ``metadata`` is stored as JSON under ``ecopvt``.
    Raises :class:`DeployError` if a node is outside the default ONNX domain.
    """
    _require("onnxscript")
    check_exportable(model, img_size, dynamic, opset)
    model.eval()
    example = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, optimize=optimize,
                                    dynamic_shapes=dynamic_shapes(dynamic), input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], verbose=False)
    foreign = sorted({node.domain for node in program.model.graph.all_nodes()} - {"", "ai.onnx"})
    if foreign:
        raise DeployError(f"the exported graph uses ops outside the default ONNX domain ({foreign}), which a stock "
                          "onnxruntime may not run")
    if metadata is not None:
        program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path, external_data=False)


def quantize_int8(src: str, dst: str) -> None:
    """int8 weights by onnxruntime's dynamic quantization: MatMul/Gemm/Conv weights stored as int8, activations
    quantized on the fly (DynamicQuantizeLinear). Products of two activations (attention scores, P·V, EcoFormer's
    code products) stay float (``MatMulConstBOnly``); metadata is kept."""
    quantization = _require("onnxruntime.quantization")
    quantization.quantize_dynamic(src, dst, weight_type=quantization.QuantType.QInt8,
                                  extra_options={"MatMulConstBOnly": True})


def check_file(path: str) -> Any:
    """``onnx.checker`` full check (structure, opset, shape inference) of ``path``; returns the loaded ModelProto."""
    onnx = _require("onnx")
    onnx.checker.check_model(path, full_check=True)
    return onnx.load(path)


def op_counts(proto: Any, ops: Sequence[str] = BITWISE_OPS) -> Dict[str, int]:
    """How many nodes of each type in ``ops`` the (flat: the exporter writes no subgraphs) graph has."""
    counts = Counter(node.op_type for node in proto.graph.node)
    return {op: counts.get(op, 0) for op in ops}


# metadata -------------------------------------------------------------------------------------------------------
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> Dict[str, str]:
    """Versions of the libraries that made the file (those installed)."""
    versions = {}
    for name in ("ecopvt", "torch", "timm", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def attention_options(model: nn.Module) -> Dict[str, Any]:
    """The model's attention, its options (Bitformer's score path as set on the modules), stages and bits."""
    options = dict(getattr(model, "attn_kwargs", {}))
    paths = {m.score_path for m in model.modules() if isinstance(m, BitformerAttention)}
    if paths:
        options["score_path"] = paths.pop() if len(paths) == 1 else sorted(paths)
    return dict(attn=getattr(model, "attn_name", "softmax"), attn_options=options,
                attn_stages=list(getattr(model, "attn_stages", [])), bits=options.get("bits"))


def set_metadata(path: str, metadata: Mapping[str, Any]) -> None:
    """Store ``metadata`` as JSON under ``ecopvt`` in the file at ``path`` (other entries kept)."""
    onnx = _require("onnx")
    proto = onnx.load(path)
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = json.dumps(metadata)
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, path)


def read_metadata(path: str) -> Dict[str, Any]:
    """The ``ecopvt`` metadata of an exported file; :class:`DeployError` for a missing, unreadable or foreign file."""
    onnx = _require("onnx")
    if not os.path.isfile(path):
        raise DeployError(f"{path} does not exist")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, others ValueError / RuntimeError
        raise DeployError(f"{path} is not a readable ONNX model (truncated, or not ONNX: {type(err).__name__}: "
                          f"{err}); re-create it with `python export.py ckpt=...`") from None
    if not len(proto.graph.node):
        raise DeployError(f"{path} is not a readable ONNX model (it has no graph: truncated or not ONNX); "
                          "re-create it with `python export.py ckpt=...`")
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise DeployError(f"{path} has no '{METADATA_KEY}' metadata (its preprocessing is unknown): export the "
                          "model with `python export.py ckpt=...`")
    return json.loads(props[METADATA_KEY])


def preprocessing_of(data_cfg: Optional[Mapping[str, Any]], model: nn.Module, img_size: int) -> Dict[str, Any]:
    """Input size, mean, std, crop and interpolation of the evaluation transform: the training data config's, or
    for bare weight files the model's timm pretrained config (ImageNet's)."""
    source = data_cfg if data_cfg is not None else getattr(model, "pretrained_cfg", {})
    return dict(input_size=[3, img_size, img_size], mean=[float(v) for v in source["mean"]],
                std=[float(v) for v in source["std"]], crop_pct=float(source["crop_pct"]),
                interpolation=str(source["interpolation"]))


def apply_preprocessing(data_cfg: Any, pre: Mapping[str, Any]) -> Any:
    """Set the evaluation transform keys of ``data_cfg`` (img_size, mean, std, crop_pct, interpolation) from a file's
    ``preprocessing`` metadata, so an exported model is fed exactly as it was trained."""
    data_cfg.img_size = int(pre["input_size"][-1])
    data_cfg.mean, data_cfg.std = list(pre["mean"]), list(pre["std"])
    data_cfg.crop_pct, data_cfg.interpolation = pre["crop_pct"], pre["interpolation"]
    return data_cfg


# onnxruntime ----------------------------------------------------------------------------------------------------
def inference_session(path: str, threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session of ``path`` with ``threads`` intra-op threads (default: torch's count)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise DeployError(f"onnxruntime cannot load {path} ({type(err).__name__}: {err}); re-export it with "
                          "`python export.py ckpt=...`") from None


class OnnxClassifier(nn.Module):
    """An exported classifier behind the ``nn.Module`` interface that :func:`engine.evaluate.evaluate` uses:
    ``forward(images (B, 3, H, W) float32) -> logits (B, classes)``, run by onnxruntime on the CPU. A file with a
    fixed batch size gets the input in chunks of that size (the last one zero-padded)."""

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        super().__init__()
        self.path = path
        self.session = inference_session(path, threads)
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().contiguous().numpy()
        step = self.fixed_batch or len(x)
        outputs = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            if len(chunk) < step:
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outputs.append(torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0]))
        return torch.cat(outputs)[:len(x)]


def load_onnx(path: str) -> Tuple[OnnxClassifier, Any, Dict[str, Any]]:
    """(classifier, a config holding the training data config or None, description) of an export.py file, as
    :func:`engine.restore.load_model` gives for a checkpoint; the description carries ``runtime: onnxruntime``,
    ``quantize``, ``use_ema``, ``params`` and ``preprocessing``."""
    metadata = read_metadata(path)
    train_cfg = OmegaConf.create({"data": metadata["data"]}) if metadata.get("data") else None
    info = {key: metadata[key] for key in ("model", "attn", "epoch") if key in metadata}
    info.update(runtime="onnxruntime", quantize=metadata["quantize"], use_ema=metadata["use_ema"],
                params=metadata["params"], preprocessing=metadata["preprocessing"])
    return OnnxClassifier(path), train_cfg, info


def compare(reference: torch.Tensor, logits: torch.Tensor) -> Dict[str, float]:
    """max and median |diff| and top-1 agreement (fraction of equal argmax) of two (B, classes) logit tensors."""
    diff = (reference.float() - logits.float()).abs()
    return dict(max_abs_diff=float(diff.max()), median_abs_diff=float(diff.median()),
                top1_agreement=float((reference.argmax(1) == logits.argmax(1)).float().mean()))


@torch.no_grad()
def verify(path: str, model: nn.Module, img_size: int, batch: int = 32, seed: int = 0) -> Dict[str, float]:
    """Run ``path`` in onnxruntime and ``model`` in PyTorch on one fixed batch of N(0, 1) images: :func:`compare`."""
    images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    reference = model.eval()(images)
    result = compare(reference, OnnxClassifier(path)(images))
    if not torch.isfinite(torch.tensor(list(result.values()))).all():
        raise DeployError(f"{path}: onnxruntime's logits are not finite ({result}); the export is broken")
    return dict(result, images=batch)
