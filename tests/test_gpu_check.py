"""scripts/gpu_check.sh without a GPU: argument handling, the no-CUDA exit, missing packages and --wheels (with a
stand-in interpreter), the plan's commands against the real configs, and the JSON summary."""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEPS = ["train_softmax_bf16", "train_softmax_fp16", "train_ecoformer_bf16", "train_ecoformer_fp16",
         "train_bitformer_bf16", "train_bitformer_fp16", "train_softmax_wandb", "compile_ecoformer",
         "compile_bitformer", "ddp_ecoformer", "hash_fit_gpu", "eval_ecoformer", "eval_bitformer_packed", "benchmark"]


def run(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    out = tmp_path / "check"
    proc = run("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and "nothing run" in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'; valid: --out DIR, --wheels DIR, --plan, --help"),
    (["--wheels"], "--wheels needs a folder"),
    (["--out"], "--out needs a folder"),
    (["--wheels", "/no/such/folder"], "--wheels /no/such/folder is not a folder"),
])
def test_bad_arguments_exit_2_naming_the_problem(args, message):
    proc = run(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_help():
    proc = run("--help")
    assert proc.returncode == 0 and "gpu_check.sh [--out DIR] [--wheels DIR] [--plan]" in proc.stdout


@pytest.fixture
def fake_python(tmp_path):
    """An interpreter that reports CUDA, lacks hydra/omegaconf/wandb, and logs pip calls (pip fails)."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n"
                    'case "$2" in *torch.cuda.is_available*) echo "1 2.11.0"; exit 0;;\n'
                    '  "import hydra"|"import omegaconf"|"import wandb") exit 1;;\n'
                    '  "import "*) exit 0;; esac\n'
                    'if [ "$1" = -m ] && [ "$2" = pip ]; then echo "$@" >> "$PIP_LOG"; exit 1; fi\n'
                    "exit 3\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_missing_packages_are_named_without_wheels(tmp_path, fake_python):
    proc = run("--out", str(tmp_path / "check"), env={"PYTHON": str(fake_python)})
    assert proc.returncode == 1
    assert "missing Python packages:" in proc.stderr and "--wheels DIR" in proc.stderr
    for dist in ("hydra-core", "omegaconf", "wandb"):
        assert dist in proc.stderr
    assert "tqdm" not in proc.stderr and not (tmp_path / "check").exists()


def test_wheels_are_installed_offline(tmp_path, fake_python):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    log = tmp_path / "pip.log"
    proc = run("--wheels", str(wheels), "--out", str(tmp_path / "check"),
               env={"PYTHON": str(fake_python), "PIP_LOG": str(log)})
    words = log.read_text().split()
    assert words[:6] == ["-m", "pip", "install", "--no-index", "--find-links", str(wheels)]
    assert sorted(words[6:]) == ["hydra-core", "omegaconf", "wandb"]
    assert proc.returncode == 1 and "pip could not install" in proc.stderr  # the stand-in pip fails
    assert not (tmp_path / "check" / "logs").exists()


def test_plan_commands_are_valid_for_the_configs(tmp_path):
    """Every train.py / eval.py step composes with the real configs; the benchmark's arguments parse."""
    import importlib.util

    from hydra import compose, initialize_config_dir

    proc = run("--plan", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    plan = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert list(plan) == STEPS
    spec = importlib.util.spec_from_file_location("benchmark_for_plan", os.path.join(ROOT, "scripts", "benchmark.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        for name, command in plan.items():
            words = shlex.split(command)
            for entry in ("train.py", "eval.py"):
                if entry in words:
                    overrides = [w for w in words[words.index(entry) + 1:] if not w.startswith("hydra.")]
                    cfg = compose(entry[:-3], overrides=overrides)
                    assert cfg.device == "cuda", name
                    if entry == "train.py":
                        assert cfg.amp in ("bf16", "fp16") and cfg.epochs == 1 and cfg.data.name == "fake", name
            if name == "benchmark":
                args = bench.parse_args(words[words.index("scripts/benchmark.py") + 1:])
                assert args.parts == ["models"] and args.sizes == [224, 448] and args.device == "cuda"
    assert "amp=fp16" in plan["train_bitformer_fp16"] and "compile=true" in plan["compile_ecoformer"]
    assert "torch.distributed.run --standalone --nproc_per_node=1 train.py" in plan["ddp_ecoformer"]
    assert f"ckpt={tmp_path}/runs/train_ecoformer_bf16/checkpoints/best.ckpt" in plan["eval_ecoformer"]


def test_summary_json(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train_softmax_bf16.log").write_text("ok\n")
    (tmp_path / "logs" / "compile_bitformer.log").write_text("step 1\nRuntimeError: no kernel\n")
    (tmp_path / "steps.tsv").write_text("train_softmax_bf16\t0\t1500\tpython train.py\n"
                                        "compile_bitformer\t1\t250\tpython train.py compile=true\n")
    (tmp_path / "eval_ecoformer.json").write_text(json.dumps({"top1": 12.5}, indent=1))
    (tmp_path / "bench").mkdir()
    columns = ["label", "size", "batch", "infer_img_s", "train_img_s", "limit_speed_vs_timm", "infer_speed_vs_timm",
               "train_speed_vs_timm", "infer_mem_mb", "train_mem_mb", "infer_mem_vs_timm", "train_mem_vs_timm",
               "status", "extra"]
    (tmp_path / "bench" / "models.csv").write_text(",".join(columns) + "\n" + ",".join(["timm"] + ["1"] * 13) + "\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "summary", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] is False and result["failed"] == ["compile_bitformer"]
    assert result["steps"][0]["seconds"] == 1.5 and "log_tail" not in result["steps"][0]
    assert result["steps"][1]["log_tail"] == ["step 1", "RuntimeError: no kernel"]
    assert result["eval"] == {"ecoformer": {"top1": 12.5}, "bitformer_packed": None}
    assert result["benchmark"] == [dict(zip(columns[:-1], ["timm"] + ["1"] * 12))]
    assert result["hash_fit"] is None
