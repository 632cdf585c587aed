"""train.py / eval.py / summarize.py end to end: configs, a real CIFAR-100 run, resume, sweeps, DDP."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir

from engine.build import build_model
from engine.config import validate_train_config
from helpers import ROOT, export_cifar, metrics, run

MODELS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs", "model")))
ATTNS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs", "attn")))
DATA = ["cifar100", "imagenet", "folder", "fake"]


def _optim_cfgs(*override_lists):
    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base="1.3"):
        return [compose("train", overrides).optim for overrides in override_lists]


@pytest.mark.parametrize("optim, lr", [("adamw", 1e-3), ("sgd", 1e-2)])
def test_fused_optimizer_step_is_the_default_and_matches_the_loop(optim, lr):
    """optim.fused=null takes torch's fused AdamW / SGD (nesterov) step; a few updates agree with the loop."""
    from timm.optim import create_optimizer_v2

    from engine.build import optimizer_args

    fused, loop, lamb = _optim_cfgs([f"optim={optim}"], [f"optim={optim}", "optim.fused=false"], ["optim.name=lamb"])
    assert optimizer_args(fused)["fused"] and "fused" not in optimizer_args(loop)
    assert "fused" not in optimizer_args(lamb)  # no fused step: timm's Lamb is built as usual
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    weights = []
    for optim_cfg in (fused, loop):
        torch.manual_seed(0)
        net = build_model({"name": "pvtv2_b0"}, {"name": "softmax"}, num_classes=10)
        initial = torch.cat([p.detach().flatten() for p in net.parameters()])
        optimizer = create_optimizer_v2(net, lr=lr, **optimizer_args(optim_cfg))
        assert optimizer.defaults.get("fused") == optimizer_args(optim_cfg).get("fused")
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(images), labels).backward()
            optimizer.step()
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        assert (weights[-1] - initial).abs().max() > 1e-3  # the updates moved the weights
    # rounding differs (Adam divides by sqrt(v) + eps; near-zero gradients amplify it): well under one lr step
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=0.1 * lr)


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, None), (None, False)])
def test_resume_keeps_the_configured_fused_choice_and_the_fp16_scaler_works(saved_fused, resumed_fused):
    """A checkpoint written with the other fused / loop choice must not switch it back on load (torch restores
    param-group options), which would also break GradScaler's fp16 step."""
    from timm.optim import create_optimizer_v2

    from engine.build import load_optimizer_state, optimizer_args

    saved_cfg, resumed_cfg = _optim_cfgs([f"optim.fused={str(saved_fused).lower()}"],
                                         [f"optim.fused={str(resumed_fused).lower()}"])
    net = torch.nn.Linear(4, 3)
    first = create_optimizer_v2(net, lr=1e-3, **optimizer_args(saved_cfg))
    net(torch.randn(2, 4)).sum().backward()
    first.step()
    resumed = create_optimizer_v2(net, lr=1e-3, **optimizer_args(resumed_cfg))
    load_optimizer_state(resumed, first.state_dict())
    expected = optimizer_args(resumed_cfg).get("fused")
    assert all(group["fused"] == expected for group in resumed.param_groups)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # the default 2^16 overflows fp16 at once
    with torch.autocast("cpu", dtype=torch.float16):
        loss = net(torch.randn(2, 4)).float().sum()
    scaler.scale(loss).backward()
    before = net.weight.detach().clone()
    scaler.step(resumed)
    scaler.update()
    assert not torch.equal(before, net.weight)


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    """The real CIFAR-100, first 10 images per class of each split, in the official pickle layout."""
    return str(export_cifar(tmp_path_factory.mktemp("cifar"), "pickle", 10))


def test_every_model_attention_and_data_config_composes_and_builds():
    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base="1.3"):
        for data in DATA:
            cfg = compose("train", [f"data={data}", "data.root=somewhere"])
            validate_train_config(cfg)
        for model in MODELS:
            for attn in ATTNS:
                cfg = compose("train", [f"model={model}", f"attn={attn}", "data=fake"])
                net = build_model(cfg.model, cfg.attn, cfg.data.num_classes)
                assert net.attn_name == attn and net.num_classes == 10
                if model == "pvtv2_b0":
                    with torch.no_grad():
                        assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_real_cifar_run_writes_run_folder_and_eval_reproduces_best(cifar_subset, tmp_path):
    run_dir = str(tmp_path / "run")
    code, _, err = run("train.py", "data=cifar100", f"data.root={cifar_subset}", "epochs=2", "data.batch_size=50",
                       "data.num_workers=0", "sched.warmup_epochs=0", "optim.lr=2e-3", "device=cpu",
                       f"hydra.run.dir={run_dir}")
    assert code == 0, err[-3000:]
    for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "config.yaml", "metrics.jsonl"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "seconds", "images_per_s"):
        assert all(key in r for r in records), key
    assert records[1]["train_loss"] < records[0]["train_loss"]

    code, out, err = run("eval.py", f"ckpt={run_dir}/checkpoints/best.ckpt", f"hydra.run.dir={tmp_path}/eval")
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    best = max(records, key=lambda r: r["val_top1"])
    assert result["top1"] == best["val_top1"]
    assert result["images"] == 1000 and result["model"] == "pvtv2_b0" and result["attn"] == "softmax"
    assert {"top5", "loss", "params"} <= result.keys()


def test_warmup_prefix_decays_from_the_peak_after_the_warm_up(tmp_path):
    """sched.warmup_prefix=true: peak lr right after the warm-up, min_lr at the end; false: timm's default, where
    the cosine runs from epoch 0 and the warm-up overrides its start (0.75 x peak after 1 of 3 epochs)."""
    for prefix, after_warmup in (("true", 1e-3), ("false", 1e-6 + 0.75 * (1e-3 - 1e-6))):
        run_dir = str(tmp_path / prefix)
        code, _, err = run("train.py", "experiment=smoke", "sched=cosine", "sched.warmup_epochs=1", "epochs=3",
                           f"sched.warmup_prefix={prefix}", "sched.min_lr=1e-6", "optim.lr=1e-3",
                           "data.train_size=32", "data.val_size=16", f"hydra.run.dir={run_dir}")
        assert code == 0, err[-3000:]
        lrs = [r["lr"] for r in metrics(run_dir)]  # after each epoch's last update
        assert lrs[0] == pytest.approx(after_warmup, rel=1e-6) and lrs[-1] == pytest.approx(1e-6, rel=1e-6)


def test_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    """SIGKILL as soon as last.ckpt appears (epoch 0 committed, its best.ckpt / metrics line maybe not yet), of a
    3-epoch run, resume=auto: the same weights and records as an uninterrupted run."""
    common = ["experiment=smoke", "sched=cosine", "sched.warmup_epochs=1", "epochs=3", "data.train_size=160",
              "data.val_size=16"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert run("train.py", *common, f"hydra.run.dir={straight}")[0] == 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *common, f"hydra.run.dir={killed}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(killed, "checkpoints", "last.ckpt")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(last):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    done = torch.load(last, weights_only=True)["epoch"]
    assert proc.returncode == -signal.SIGKILL and 1 <= done < 3, "the run was not killed mid-way"
    code, out, err = run("train.py", *common, "resume=auto", f"hydra.run.dir={killed}")
    assert code == 0, err[-3000:]
    assert f"at epoch {done}" in out
    drop_timing = lambda records: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}  # noqa: E731
                                   for r in records]
    assert drop_timing(metrics(killed)) == drop_timing(metrics(straight))
    a = torch.load(os.path.join(straight, "checkpoints", "last.ckpt"), weights_only=True)
    b = torch.load(os.path.join(killed, "checkpoints", "last.ckpt"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert (torch.load(os.path.join(straight, "checkpoints", "best.ckpt"), weights_only=True)["epoch"] ==
            torch.load(os.path.join(killed, "checkpoints", "best.ckpt"), weights_only=True)["epoch"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])


def test_two_job_multirun_and_summary(tmp_path):
    sweep = str(tmp_path / "sweep")
    code, _, err = run("train.py", "-m", "experiment=smoke", "epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert code == 0, err[-3000:]
    jobs = sorted(os.listdir(sweep))
    assert len([j for j in jobs if os.path.isfile(os.path.join(sweep, j, "metrics.jsonl"))]) == 2
    code, out, err = run("scripts/summarize.py", sweep)
    assert code == 0, err[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("| ") and "seed=" in line]
    assert len(rows) == 2 and "seed=0" in rows[0] and "seed=1" in rows[1]
    assert os.path.getsize(os.path.join(sweep, "val_top1.png")) > 1000


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_keeps_hashes_identical(tmp_path):
    run_dir = str(tmp_path / "ddp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    code, out, err = run("train.py", "experiment=smoke", "attn=ecoformer", "epochs=1", f"hydra.run.dir={run_dir}",
                         cmd=torchrun)
    assert code == 0, err[-3000:]
    assert "hash buffers identical on 2 ranks" in out
    assert "(2 processes" in out
    assert open(os.path.join(run_dir, "train.log")).read().count("hash buffers identical") == 1  # rank 0 writes
    assert not os.path.exists(os.path.join(run_dir, "train.lock"))
    records = metrics(run_dir)
    assert len(records) == 1 and "hash_fit" in records[0]
    # metrics reduced across ranks count every validation image once: one process over all of them agrees
    code, out, err = run("eval.py", f"ckpt={run_dir}/checkpoints/last.ckpt", f"hydra.run.dir={tmp_path}/eval")
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["images"] == 32 and result["top1"] == records[0]["val_top1"]


def test_wandb_logger_runs_offline_without_network(tmp_path):
    run_dir = tmp_path / "w"
    code, _, err = run("train.py", "experiment=smoke", "epochs=1", "logger=wandb", f"hydra.run.dir={run_dir}")
    assert code == 0, err[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_bf16_ema_accumulation_clipping_and_init_from_timm_weights(tmp_path):
    """One run with the less common options on; then eval.py on its EMA weights and on a bare timm weight file."""
    import timm

    timm_file = str(tmp_path / "pvt_v2_b0.pth")
    torch.save(timm.create_model("pvt_v2_b0", num_classes=10).state_dict(), timm_file)
    run_dir = str(tmp_path / "run")
    code, out, err = run("train.py", "experiment=smoke", "epochs=1", "amp=bf16", "ema.enabled=true", "ema.decay=0.9",
                         "grad_accum=2", "grad_clip=1.0", f"init={timm_file}", "attn=ecoformer",
                         f"hydra.run.dir={run_dir}")
    assert code == 0, err[-3000:]
    assert "init from" in out and "'converted'" in out
    record = metrics(run_dir)[0]
    assert {"val_top1", "val_ema_top1"} <= record.keys() and record["train_loss"] == record["train_loss"]
    code, out, err = run("eval.py", f"ckpt={run_dir}/checkpoints/last.ckpt", "use_ema=true", "amp=bf16",
                         f"results={tmp_path}/res.json", f"hydra.run.dir={tmp_path}/e1")  # as validated in training
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["use_ema"] and result["top1"] == record["val_ema_top1"]
    assert json.load(open(tmp_path / "res.json")) == result
    code, out, err = run("eval.py", f"ckpt={timm_file}", "model=pvtv2_b0", "data=fake", f"hydra.run.dir={tmp_path}/e2")
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["params"] == 3412330
