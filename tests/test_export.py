"""ONNX deployment (engine/deploy.py, export.py, eval.py on .onnx): each attention exports with its bitwise ops kept
and agrees with PyTorch in onnxruntime; dynamic batch and resolution; exact Bitformer scores; real-data round trip."""
import importlib
import json
import os
from collections import deque

import numpy as np
import onnx
import pytest
import timm
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

import models  # noqa: F401 (registers pvtv2_*)
from attention.bitformer import BitformerAttention, bit_scores
from engine import deploy
from hashing.kernel_hash import sign_by_comparison, sign_ste
from helpers import ROOT, export_cifar, run

torch.set_num_threads(1)
IMG, INPUTS, BATCH = 64, 256, 32
STAGE_BITS = (8, 16, 32, 64)  # the Bitformer case: one code width per stage, all four word layouts in one file
# label -> (attention, options, dynamic); the Bitformer file is also the one of the dynamic batch/resolution test
CASES = {
    "softmax SRA": ("softmax", {}, "none"),
    "softmax MSA": ("softmax", {"sr": False}, "size"),
    "EcoFormer": ("ecoformer", {}, "none"),
    "Bitformer 8/16/32/64": ("bitformer", {"score_path": "packed"}, "none"),
}


def _model(attn, options):
    torch.manual_seed(0)
    model = timm.create_model("pvtv2_b0", attn=attn, attn_kwargs=options, num_classes=10).eval()
    if attn == "bitformer":
        for stage, bits in zip(model.stages, STAGE_BITS):
            for block in stage.blocks:
                old = block.attn
                block.attn = BitformerAttention(old.dim, old.num_heads, old.sr.kernel_size[0] if old.sr else 1,
                                                bits=bits, score_path="packed").eval()
    nn.init.normal_(model.head.weight, std=0.5)  # logits of a trained model's scale, not near-uniform ones
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """label -> (model, path), exporting each case once (``BATCH`` images per run for fixed-shape files). Without
    onnxscript's graph optimizer (export.py's default runs it; onnxruntime optimizes at load either way): the
    translation is what these tests check, and the optimizer would double their export time."""
    cache = {}

    def get(label):
        if label not in cache:
            attn, options, dynamic = CASES[label]
            model = _model(attn, options)
            path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
            deploy.export_onnx(model, path, IMG, dynamic=dynamic, batch=BATCH, metadata={"case": label},
                               optimize=False)
            cache[label] = model, path
        return cache[label]

    return get


def _images(n, size=IMG, seed=1, width=None):
    return torch.randn(n, 3, size, width or size, generator=torch.Generator().manual_seed(seed))


def _code_consumers(proto, outputs=None):
    """Op types reachable from the code comparisons (GreaterOrEqual nodes) before a Softmax, optionally only on the
    way to the graph outputs ``outputs``: what consumes the ±1 codes and their packed words."""
    consumers, producers = {}, {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    keep = None
    if outputs is not None:  # nodes the outputs depend on
        keep, stack = set(), [producers[o] for o in outputs if o in producers]
        while stack:
            node = stack.pop()
            if id(node) not in keep:
                keep.add(id(node))
                stack.extend(producers[i] for i in node.input if i in producers)
    queue = deque(n for n in proto.graph.node if n.op_type == "GreaterOrEqual")
    seen, types = set(), set()
    while queue:
        node = queue.popleft()
        if id(node) in seen or node.op_type == "Softmax" or (keep is not None and id(node) not in keep):
            continue
        seen.add(id(node))
        types.add(node.op_type)
        queue.extend(c for out in node.output for c in consumers.get(out, []))
    return types


@pytest.mark.parametrize("label", list(CASES))
def test_each_attention_exports_and_agrees_with_pytorch(label, exported):
    model, path = exported(label)
    proto = deploy.check_file(path)  # onnx.checker full check
    assert proto.opset_import[0].version >= 18 and {n.domain for n in proto.graph.node} == {""}
    assert deploy.read_metadata(path) == {"case": label}
    images = _images(INPUTS)
    session = deploy.OnnxClassifier(path)
    with torch.no_grad():
        reference = torch.cat([model(chunk) for chunk in images.split(BATCH)])
    result = deploy.compare(reference, torch.cat([session(chunk) for chunk in images.split(BATCH)]))
    if CASES[label][0] == "softmax":
        assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0, result
    else:  # hashed codes: a code whose projection is within rounding of 0 may flip
        assert result["top1_agreement"] >= 0.99 and result["median_abs_diff"] <= 1e-5, result
    if CASES[label][0] == "bitformer":  # one XOR per 16-bit word of a code, 2 blocks per stage
        assert deploy.op_counts(proto)["BitwiseXor"] == sum(2 * -(-bits // 16) for bits in STAGE_BITS)
        consumers = _code_consumers(proto)
        assert "BitwiseXor" in consumers and not consumers & {"MatMul", "Gemm", "Einsum", "Conv"}, consumers


def test_dynamic_batch_and_two_resolutions_from_one_file(exported):
    model, path = exported("softmax MSA")
    session = deploy.OnnxClassifier(path)
    assert session.fixed_batch is None
    images = _images(8, seed=2)
    singles = torch.cat([session(images[i:i + 1]) for i in range(8)])
    for n in (1, 3, 8):
        assert torch.allclose(session(images[:n]), singles[:n], rtol=0, atol=1e-5)
    for height, width in ((96, 96), (32, 128)):  # other sizes, a non-square one, from the same file
        x = _images(4, height, seed=3, width=width)
        with torch.no_grad():
            result = deploy.compare(model(x), session(x))
        assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4, (height, width, result)


SCORE_BITS = (1, 16, 17, 64)
SIGNS = torch.tensor([-0.0, 0.0, -1e-42, 1e-42, -2.5, 3.0, float("-inf"), float("inf")])
COPYSIGN = torch.tensor([-1.0, 1, -1, 1, -1, 1, -1, 1])  # copysign(1, y): -0.0 -> -1


class _Codes(nn.Module):
    """Bitformer's packed scores for each width of SCORE_BITS, its float scores, EcoFormer's hash signs."""

    def forward(self, signs, *codes):
        packed = [bit_scores(zq, zk, "packed") for zq, zk in zip(codes[::2], codes[1::2])]
        return (*packed, bit_scores(codes[2], codes[3], "float"), sign_ste(signs))


@pytest.fixture(scope="module")
def codes_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    codes = []
    for bits in SCORE_BITS:
        zq, zk = torch.randn(2, 3, 20, bits, generator=gen), torch.randn(2, 3, 12, bits, generator=gen)
        zq[..., 0, :], zk[..., -1, :] = 0.0, -0.0  # Bitformer: sign(0) = sign(-0) = +1
        codes += [zq, zk]
    path = str(tmp_path_factory.mktemp("codes") / "codes.onnx")
    torch.onnx.export(_Codes().eval(), (SIGNS, *codes), dynamo=True, opset_version=18, verbose=False,
                      input_names=["signs"] + [f"z{i}" for i in range(len(codes))],
                      output_names=[f"packed{b}" for b in SCORE_BITS] + ["float16", "eco_signs"]).save(path)
    outputs = deploy.inference_session(path).run(None, {"signs": SIGNS.numpy(),
                                                        **{f"z{i}": z.numpy() for i, z in enumerate(codes)}})
    return onnx.load(path), codes, outputs


def test_exported_scores_equal_bit_scores_exactly(codes_file):
    proto, codes, outputs = codes_file
    for i, bits in enumerate(SCORE_BITS):
        expected = bit_scores(codes[2 * i], codes[2 * i + 1], "packed")
        assert outputs[i].dtype.kind == "i" and np.array_equal(outputs[i], expected.numpy()), bits
        consumers = _code_consumers(proto, [f"packed{bits}"])
        assert "BitwiseXor" in consumers and "MatMul" not in consumers, (bits, consumers)


def test_code_consumer_check_sees_the_float_paths_matmul(codes_file):
    """The check above can fail: Bitformer's float path multiplies the ±1 codes with a MatMul."""
    proto, codes, outputs = codes_file
    assert "MatMul" in _code_consumers(proto, ["float16"])
    assert np.array_equal(outputs[len(SCORE_BITS)], bit_scores(codes[2], codes[3], "float").numpy())


def test_ecoformer_signs_from_comparisons_keep_copysign_semantics(codes_file):
    proto, _, outputs = codes_file
    assert torch.equal(sign_ste(SIGNS), COPYSIGN) and torch.equal(sign_by_comparison(SIGNS), COPYSIGN)
    assert "Sign" not in {n.op_type for n in proto.graph.node}  # ONNX Sign(0) = 0
    assert np.array_equal(outputs[-1], COPYSIGN.numpy())


def test_unexportable_requests_fail_before_work():
    li = timm.create_model("pvtv2_b2_li", num_classes=10).eval()
    with pytest.raises(deploy.DeployError, match="adaptive pooling.*dynamic=batch"):
        deploy.check_exportable(li, 224, "size", 18)
    with pytest.raises(deploy.DeployError, match=r"divisible by 7.*img_size=224"):
        deploy.check_exportable(li, 64, "batch", 18)
    deploy.check_exportable(li, 224, "batch", 18)
    b0 = _model("softmax", {})
    with pytest.raises(deploy.DeployError, match="opset >= 18"):
        deploy.check_exportable(b0, 64, "batch", 17)
    with pytest.raises(deploy.DeployError, match="valid values are none, batch, size"):
        deploy.check_exportable(b0, 64, "height", 18)
    with pytest.raises(deploy.DeployError, match="multiples of 32"):
        deploy.check_exportable(b0, 80, "size", 18)


def test_unreadable_files_fail_with_a_clear_error(tmp_path, exported):
    _, path = exported("softmax SRA")
    truncated, text, foreign = tmp_path / "cut.onnx", tmp_path / "text.onnx", tmp_path / "foreign.onnx"
    truncated.write_bytes(open(path, "rb").read()[:5000])
    text.write_text("not a model\n")
    for bad in (truncated, text):
        with pytest.raises(deploy.DeployError, match="not a readable ONNX model.*export.py"):
            deploy.read_metadata(str(bad))
    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    with pytest.raises(deploy.DeployError, match="no 'ecopvt' metadata"):
        deploy.read_metadata(str(foreign))


def _eval_main(overrides):
    """eval.py's main in this process (its command line is the one of every other eval test): the JSON result."""
    script = importlib.import_module("eval")
    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base="1.3"):
        return script.main.__wrapped__(compose("eval", overrides))


def test_export_then_eval_on_real_cifar100(tmp_path, caplog):
    """train.py (Bitformer, 1 epoch on 10 images per class) -> export.py (packed scores, int8 too) -> eval.py on the
    checkpoint, the ONNX file and the int8 file; a truncated file fails with a clear error."""
    data = export_cifar(tmp_path / "data", "pickle", 10)
    run_dir = tmp_path / "run"
    code, _, err = run("train.py", "data=cifar100", f"data.root={data}", "data.per_class=10", "data.batch_size=50",
                       "data.num_workers=0", "device=cpu", "attn=bitformer", "epochs=1", "sched.warmup_epochs=0",
                       "model.drop_path_rate=0", "seed=0", f"hydra.run.dir={run_dir}")
    assert code == 0, err[-3000:]
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    code, out, err = run("export.py", f"ckpt={ckpt}", "quantize=dynamic", f"hydra.run.dir={tmp_path}/export")
    assert code == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    onnx_path, int8 = str(run_dir / "checkpoints" / "best.onnx"), report["int8"]
    assert report["path"] == onnx_path and report["opset"] >= 18 and report["img_size"] == 32
    assert report["bitwise_ops"]["BitwiseXor"] == 8 and int8["bitwise_ops"]["BitwiseXor"] == 8
    assert report["top1_agreement"] >= 0.95 and report["median_abs_diff"] <= 1e-5
    assert int8["path"].endswith("best.int8.onnx") and int8["bytes"] < report["bytes"] / 2
    meta = deploy.read_metadata(onnx_path)
    assert meta["attn"] == "bitformer" and meta["attn_options"]["score_path"] == "packed" and meta["bits"] == 16
    assert meta["preprocessing"]["input_size"] == [3, 32, 32] and meta["ckpt_sha256"] == deploy.file_sha256(ckpt)
    assert {"torch", "onnx", "onnxruntime", "onnxscript"} <= set(meta["versions"])

    results = {name: _eval_main([f"ckpt={target}", f"data.root={data}"])
               for name, target in (("pytorch", ckpt), ("onnx", onnx_path), ("int8", int8["path"]))}
    assert results["pytorch"]["runtime"] == "pytorch" and results["onnx"]["runtime"] == "onnxruntime"
    assert results["onnx"]["images"] == results["pytorch"]["images"] == 1000
    assert abs(results["onnx"]["top1"] - results["pytorch"]["top1"]) <= 1.0  # >= 99% agreement
    assert results["int8"]["quantize"] == "dynamic" and 0 <= results["int8"]["top1"] <= 100
    assert set(results["pytorch"]) ^ set(results["onnx"]) == {"quantize"}

    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(open(onnx_path, "rb").read()[:10000])
    with pytest.raises(SystemExit) as exit_info:
        _eval_main([f"ckpt={truncated}", f"data.root={data}"])
    assert exit_info.value.code == 2 and "not a readable ONNX model" in caplog.text, caplog.text
