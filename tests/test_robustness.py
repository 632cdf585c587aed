"""Crashes and bad input: atomic checkpoints, non-finite losses, safe loading, and start-up errors that name the fix."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import train
from attention.bitformer import bit_kernels
from attention.ecoformer import attention_kernels
from hashing.kernel_hash import hash_kernels
from hashing.native import library_name
from engine import checkpoint as ckpt_io
from engine.data import build_dataset
from helpers import ROOT, built_kernels, export_cifar, run
from models.weights import CheckpointError

FAST = ["experiment=smoke", "epochs=1"]
USER_ENV = {"HYDRA_FULL_ERROR": "0"}  # what a user sees (the other runs show tracebacks, for debugging)


# crashes ---------------------------------------------------------------------------------------------------------
WRITER = """
import sys, torch
from engine.checkpoint import save_atomic
path, i = sys.argv[1], 0
while True:
    i += 1
    save_atomic({"step": i, "weights": torch.full((4_000_000,), float(i))}, path)
    print(i, flush=True)
"""


def test_killing_a_checkpoint_writer_leaves_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "last.ckpt")
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, path], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete save
        time.sleep(0.05 * attempt + 0.01)  # then kill it at some point of a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = ckpt_io.load(path)
        assert torch.equal(state["weights"], torch.full((4_000_000,), float(state["step"])))
    assert not [f for f in os.listdir(tmp_path) if f != "last.ckpt" and not f.startswith(".tmp-")] 


class _Batches:
    """Four batches of a linearly separable problem."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)]

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


class _NanOnSecondCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, logits, targets):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls == 2 else loss


def _one_epoch(skip):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = OmegaConf.create({"grad_accum": 1, "max_steps_per_epoch": None, "channels_last": False, "grad_clip": None,
                            "skip_nonfinite": skip, "log_interval": 1})
    stats = train.train_one_epoch(0, model, _Batches(), _NanOnSecondCall(), optimizer, None, None, None, None, cfg,
                                  torch.device("cpu"), None, rank=1)
    return model, stats


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped():
    with pytest.raises(train.NonFiniteLossError, match="epoch 0 step 1"):
        _one_epoch(skip=False)
    model, stats = _one_epoch(skip=True)
    assert stats["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_from_nan_weights_stops_the_run_without_writing_a_checkpoint(tmp_path):
    from models import load_checkpoint_state  # noqa: F401  (init path uses it)
    import timm

    model = timm.create_model("pvtv2_b0", num_classes=10)
    state = model.state_dict()
    state["head.weight"][0, 0] = float("nan")
    init = str(tmp_path / "nan.pth")
    torch.save(state, init)
    code, out, err = run("train.py", *FAST, f"init={init}", f"hydra.run.dir={tmp_path}/run")
    assert code == 3
    assert "non-finite loss" in out and "epoch 0 step 0" in out and "skip_nonfinite=true" in out
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "last.ckpt")


# unsafe / broken checkpoints ---------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.ckpt")
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil(str(marker))}, evil)
    with pytest.raises(RuntimeError, match="weights_only"):
        ckpt_io.load(evil)
    code, out, err = run("eval.py", f"ckpt={evil}", f"hydra.run.dir={tmp_path}/eval")
    assert code == 2 and "refused" in err + out
    assert "Traceback" in out + err  # HYDRA_FULL_ERROR=1: the message with its traceback, for debugging
    code, out, err = run("train.py", *FAST, f"init={evil}", f"hydra.run.dir={tmp_path}/run")
    assert code != 0 and "refused" in err + out
    assert not marker.exists()


def test_a_truncated_checkpoint_says_so(tmp_path):
    path = str(tmp_path / "last.ckpt")
    ckpt_io.save_atomic({"model": {"w": torch.randn(1000, 100)}}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="truncated"):
        ckpt_io.load(path)


def test_a_checkpoint_of_another_architecture_names_the_mismatching_keys(tmp_path):
    import timm

    b1 = str(tmp_path / "b1.pth")
    torch.save(timm.create_model("pvtv2_b1", num_classes=10).state_dict(), b1)
    code, out, err = run("eval.py", f"ckpt={b1}", "model=pvtv2_b0", "data=fake", f"hydra.run.dir={tmp_path}/e")
    assert code != 0
    assert "patch_embed.proj.weight" in err + out and "another architecture" in err + out


# start-up errors -------------------------------------------------------------------------------------------------
def test_invalid_values_fail_at_start_up_naming_each_key(tmp_path):
    code, out, err = run("train.py", *FAST, "data.batch_size=0", "data.img_size=16", "optim.lr=-0.1",
                         "hash.every_epochs=0", "attn.stages=[7]", "sched.warmup_prefix=true", "sched.warmup_epochs=1",
                         f"hydra.run.dir={tmp_path}/run")
    text = out + err
    assert code == 2
    for message in ("data.batch_size=0: must be >= 1", "data.img_size=16: PVTv2 needs at least 32 px",
                    "optim.lr=-0.1: the learning rate must be > 0", "hash.every_epochs=0: tau must be >= 1",
                    "sched.warmup_prefix=true with epochs=1 <= sched.warmup_epochs=1: nothing left to decay"):
        assert message in text
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    code, out, err = run("train.py", *FAST, "attn=bitformer", "attn.stages=[7]", "attn.score_path=packed",
                         f"hydra.run.dir={tmp_path}/run")
    assert code == 2 and "valid stages: 0..3" in out + err and "train with attn.score_path=float" in out + err


@pytest.mark.parametrize("group, bad, valid", [("model", "pvtv2_b9", "pvtv2_b2_li"), ("attn", "linformer", "ecoformer"),
                                               ("data", "mnist", "cifar100"), ("optim", "adamw2", "sgd")])
def test_unknown_names_list_the_valid_ones(group, bad, valid):
    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base="1.3"):
        with pytest.raises(MissingConfigException) as info:
            compose("train", [f"{group}={bad}"])
    assert bad in str(info.value) and valid in str(info.value)


@pytest.mark.parametrize("attn, bits", [("ecoformer", 65), ("bitformer", 0)])
def test_code_lengths_outside_1_to_64_fail_the_config_check(attn, bits):
    from engine.config import ConfigError, validate_train_config

    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose("train", [f"attn={attn}", f"attn.bits={bits}", "data=fake"])
    with pytest.raises(ConfigError, match=f"attn={attn}: .*bits.*{bits}"):
        validate_train_config(cfg)


def test_optimizer_names_and_fused_steps_are_checked_at_start_up():
    from engine.config import ConfigError, validate_train_config

    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base="1.3"):
        unknown = compose("train", ["optim.name=adamz"])
        unfused = compose("train", ["optim.name=lamb", "optim.fused=true"])
        valid = [compose("train", overrides) for overrides in (  # fused=null: lamb simply runs without it
            ["optim.name=lamb"], ["optim.fused=true"], ["optim.name=AdamW"], ["optim.name=lookahead_adamw"])]
    with pytest.raises(ConfigError, match="optim.name=adamz: unknown optimizer; valid .*adamw.*lamb"):
        validate_train_config(unknown)
    with pytest.raises(ConfigError, match="optim.fused=true: lamb has no fused step.*optim.fused=null"):
        validate_train_config(unfused)
    for cfg in valid:  # timm's spellings are accepted too
        validate_train_config(cfg)


def test_unknown_names_in_python_list_the_valid_ones():
    import timm

    with pytest.raises(ValueError, match="valid names: bitformer, ecoformer, softmax"):
        timm.create_model("pvtv2_b0", attn="linformer")
    with pytest.raises(ValueError, match="valid datasets: cifar100, imagenet, folder, fake"):
        build_dataset(OmegaConf.create({"name": "mnist"}), True, None)


def test_missing_cifar_says_where_it_looked_and_how_to_get_it(tmp_path):
    code, out, err = run("train.py", "data=cifar100", f"data.root={tmp_path}/nowhere", "device=cpu",
                         f"hydra.run.dir={tmp_path}/run", env=USER_ENV)
    text = out + err
    assert code == 2 and f"{tmp_path}/nowhere/cifar-100-python/train" in text and "Traceback" not in text
    assert "data.download=true" in text and "cifar100_export.py" in text


def test_empty_image_folder_says_where_it_looked(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    code, out, err = run("train.py", "data=folder", f"data.root={tmp_path}/empty", "device=cpu",
                         f"hydra.run.dir={tmp_path}/run", env=USER_ENV)
    assert code == 2 and f"{tmp_path}/empty/train" in out + err and "<class>" in out + err
    assert "Traceback" not in out + err


def test_unwritable_run_folder_fails_at_start_up(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoint folder should be")
    code, out, err = run("train.py", *FAST, f"hydra.run.dir={run_dir}")
    assert code == 2 and "not writable" in out + err and "hydra.run.dir" in out + err
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    out = export_cifar(tmp_path_factory.mktemp("folder"), "folder", 1)
    os.rename(out / "test", out / "val")
    bad = sorted((out / "train" / "apple").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG
    return out, bad


def test_corrupt_image_is_named_or_skipped_and_counted(image_folder, tmp_path):
    root, bad = image_folder
    common = ["data=folder", f"data.root={root}", "data.img_size=32", "data.batch_size=20", "epochs=1", "device=cpu",
              "model=pvtv2_b0"]
    code, out, err = run("train.py", *common, "data.num_workers=1", f"hydra.run.dir={tmp_path}/a", env=USER_ENV)
    assert code == 2 and str(bad) in out + err and "data.skip_bad_images=true" in out + err  # raised in a worker
    assert "Traceback" not in out + err
    code, out, err = run("train.py", *common, "data.num_workers=0", "data.skip_bad_images=true",
                         f"hydra.run.dir={tmp_path}/b")
    assert code == 0, err[-2000:]
    assert '"bad_images": 1' in open(tmp_path / "b" / "metrics.jsonl").read()
    saved = ckpt_io.load(tmp_path / "b" / "checkpoints" / "last.ckpt")["classes"]  # eval.py's class index
    assert saved == sorted(os.listdir(root / "train"))


def test_a_checkpoint_of_another_attention_names_the_mismatching_keys():
    import timm

    from models import adapt_state_dict

    bitformer = timm.create_model("pvtv2_b0", attn="bitformer", num_classes=10).state_dict()
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.0\.attn: the checkpoint has .*'k\.weight'.* where "
                                         r"this model's ecoformer attention has .*'qk\.weight'"):
        adapt_state_dict(bitformer, timm.create_model("pvtv2_b0", attn="ecoformer", num_classes=10))


@pytest.mark.parametrize("override, message", [
    ("data.batch_size='16'", "data.batch_size='16': must be an integer (a quoted number is text: drop the quotes)"),
    ("data.img_size=-32", "data.img_size=-32: PVTv2 needs at least 32 px"),
    ("data.img_size=32.5", "data.img_size=32.5: must be an integer"),
    ("optim.lr=fast", "optim.lr='fast': must be a number"),
    ("ema.enabled=yes", "ema.enabled='yes': must be true or false"),
    ("data.mean=[0.5,'x',0.5]", "data.mean=[0.5, 'x', 0.5]: must be a list of numbers"),
    ("attn.bits='16'", "attn.bits='16': a quoted number is text; drop the quotes"),
    ("max_steps_per_epoch=0", "max_steps_per_epoch=0: must be >= 1, or null for whole epochs"),
    ("sched.name=cosin", "sched.name=cosin: unknown scheduler; valid (timm's): cosine, tanh, step"),
])
def test_config_values_are_type_checked_naming_the_key(override, message):
    """A quoted number used to pass (int('16')) and then misbehave (eval batch 2 * '16' = 1616 images)."""
    from engine.config import ConfigError, validate_train_config

    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose("train", ["data=fake", "attn=ecoformer", override])
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    assert message in str(info.value)


# honest epochs ---------------------------------------------------------------------------------------------------
def test_an_epoch_whose_every_update_was_skipped_is_recorded_as_skipped_and_never_best(tmp_path):
    """lr 1e3 with skip_nonfinite: the first update blows the weights up, every later loss is non-finite. Such
    epochs used to record train_loss 0.0, write best.ckpt and exit 0."""
    run_dir = tmp_path / "run"
    code, out, err = run("train.py", *FAST, "epochs=2", "max_steps_per_epoch=2", "data.train_size=32",
                         "data.val_size=16", "skip_nonfinite=true", "optim.lr=1e3", f"hydra.run.dir={run_dir}")
    assert code == 3, err[-3000:]
    assert "no epoch of this run had finite results" in out
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]  # strict JSON: no NaN
    assert [r["epoch"] for r in records] == [0, 1] and all(r["skipped"] for r in records)
    assert records[1]["train_loss"] is None and records[1]["skipped_steps"] == 2
    assert records[0]["val_loss"] is None and "validation loss is not finite" in records[0]["skipped"]
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()


# messages, not tracebacks ----------------------------------------------------------------------------------------
def test_a_text_file_named_ckpt_gives_one_message_without_a_traceback(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        ckpt_io.load(text)  # was KeyError: 101
    code, out, err = run("eval.py", f"ckpt={text}", f"hydra.run.dir={tmp_path}/e", env=USER_ENV)
    assert code == 2 and "notes.ckpt' is not a readable PyTorch checkpoint" in out
    assert "Traceback" not in out + err


def test_eval_checks_the_checkpoints_classes_against_the_data(tmp_path):
    import timm
    from PIL import Image

    weights = tmp_path / "ten.pth"
    torch.save(timm.create_model("pvtv2_b0", num_classes=10).state_dict(), weights)
    for name in ("a", "b", "c"):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / "val" / name / "0.png")
    code, out, err = run("eval.py", f"ckpt={weights}", "model=pvtv2_b0", "data=folder", f"data.root={tmp_path}/data",
                         f"hydra.run.dir={tmp_path}/e", env=USER_ENV)
    assert code == 2 and "predicts 10 classes but data=folder" in out and "has 3" in out
    assert "Traceback" not in out + err


def test_summarize_names_and_skips_a_half_written_metrics_file(tmp_path, caplog):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from summarize import summarize

    for job, text in (("0_seed=0", '{"epoch": 0, "val_top1": 1.0, "val_top5": 5.0, "seconds": 2.0}\n'),
                      ("1_seed=1", '{"epoch": 0, "val_top1": 2.0, "val_top5": 6.0, "seconds": 2.0}\n{"epoch": 1, "va')):
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.jsonl").write_text(text)
    table = summarize(str(tmp_path), energy=False)
    assert "| 0_seed=0 |" in table and "1_seed=1" not in table
    assert f"skipping job 1_seed=1: {tmp_path}/1_seed=1/metrics.jsonl line 2 is not JSON" in caplog.text


@pytest.mark.parametrize("loader, fallback", [(bit_kernels, "packed Bitformer scores use slower PyTorch ops"),
                                              (hash_kernels, "EcoFormer's hash uses slower PyTorch ops"),
                                              (attention_kernels, "EcoFormer's attention uses slower PyTorch ops")])
def test_failed_kernel_build_falls_back_with_a_warning(loader, fallback, monkeypatch, caplog):
    """Without a compiler or ninja, every C++ kernel loader returns None (its caller then uses PyTorch ops) after one
    warning that names the cause and the fix."""
    import torch.utils.cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level("WARNING"):
        assert loader.__wrapped__() is None
    assert fallback in caplog.text and "Ninja is required" in caplog.text and "pip install ninja" in caplog.text


@pytest.mark.skipif(sys.platform != "linux", reason="OpenMP builds are Linux-only (native_flags)")
@pytest.mark.parametrize("loader", [bit_kernels, hash_kernels, attention_kernels])
def test_kernels_are_built_with_openmp(loader):
    """at::parallel_for is a header template: without -fopenmp an extension runs it on one thread whatever
    torch.set_num_threads says. A library built with OpenMP calls libgomp's GOMP_parallel."""
    from torch.utils.cpp_extension import _get_build_directory

    built_kernels(loader, "this C++ kernel")
    source = {bit_kernels: "attention/csrc/xor_popcount.cpp", hash_kernels: "hashing/csrc/kernel_hash.cpp",
              attention_kernels: "attention/csrc/linear_attention.cpp"}[loader]
    name = library_name(Path(ROOT) / source)
    library = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    assert b"GOMP_parallel" in library.read_bytes(), library
