"""Every attention learns on real images: a 5-class CIFAR-100 subset, trained from scratch in seconds on the CPU."""
import json
import os
import shutil

import pytest

from helpers import export_cifar, metrics, run

CLASSES = ["apple", "bicycle", "cloud", "lion", "rose"]  # visually distinct fine classes


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory):
    out = export_cifar(tmp_path_factory.mktemp("five"), "folder", 100)
    for split in ("train", "test"):
        for name in os.listdir(out / split):
            if name not in CLASSES:
                shutil.rmtree(out / split / name)
    os.rename(out / "test", out / "val")
    return str(out)


@pytest.mark.parametrize("attn", ["softmax", "bitformer", "ecoformer"])
def test_each_attention_learns_well_above_chance(attn, five_classes, tmp_path):
    run_dir = str(tmp_path / attn)
    code, _, err = run("train.py", "data=folder", f"data.root={five_classes}", "data.img_size=32", "data.aug.crop=pad",
                       "data.aug.auto_augment=null", "data.aug.mixup=0", "data.aug.cutmix=0", "data.aug.reprob=0",
                       "data.aug.color_jitter=null", "data.crop_pct=1.0", "data.batch_size=25", "data.num_workers=0", "device=cpu",
                       f"attn={attn}", "epochs=4", "optim.lr=2e-3", "sched.warmup_epochs=1", "model.drop_path_rate=0",
                       "hash.num_images=8", "hash.max_tokens=64", "hash.steps=30", "seed=0",
                       f"hydra.run.dir={run_dir}")
    assert code == 0, err[-3000:]
    records = metrics(run_dir)
    best = max(r["val_top1"] for r in records)
    assert best >= 40.0, f"{attn}: best top-1 {best:.1f}% on 5 classes (chance 20%)"
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    if attn == "ecoformer":
        fit = records[0]["hash_fit"]
        assert fit, "the hash-learning callback did not run at epoch 0"
    code, out, err = run("eval.py", f"ckpt={run_dir}/checkpoints/best.ckpt", f"hydra.run.dir={tmp_path}/eval")
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["top1"] == best
    if attn == "bitformer":  # the deployment path: XOR + popcount scores, the same predictions
        code, out, err = run("eval.py", f"ckpt={run_dir}/checkpoints/best.ckpt", "attn=bitformer",
                             "attn.score_path=packed", f"hydra.run.dir={tmp_path}/eval_packed")
        assert code == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["top1"] == best


@pytest.mark.slow
def test_cifar100_cpu_protocol_softmax(tmp_path):
    """The full CIFAR-100 at 32 px, experiment=cifar100_cpu (8 epochs, ~10 minutes on 2 cores). The README's run
    reached 42.91% (the issue's bar: 42.8%; the bar loop, scripts/cifar100_bar.py, 41.88% on the same machine).
    This export lists images in another order than the README's (another shuffle), hence the margin."""
    export_cifar(tmp_path / "data", "pickle", 500)
    run_dir = str(tmp_path / "run")
    code, _, err = run("train.py", "experiment=cifar100_cpu", f"data.root={tmp_path}/data", f"hydra.run.dir={run_dir}",
                       timeout=3600)
    assert code == 0, err[-3000:]
    records = metrics(run_dir)
    assert len(records) == 8 and records[-1]["val_top1"] >= 42.0, records[-1]
