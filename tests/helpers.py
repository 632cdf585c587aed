"""Shared by the end-to-end tests: run the project's scripts as a user would, find the real data."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("ECOPVT_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def _env(extra):
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "offline", **(extra or {})}


def run(script, *overrides, timeout=600, cmd=None, env=None):
    """Run a project script from the repository root; return (returncode, stdout, stderr). ``env``: extra
    environment variables (e.g. ``{"HYDRA_FULL_ERROR": "0"}`` to see what a user sees)."""
    proc = subprocess.run((cmd or [sys.executable]) + [os.path.join(ROOT, script), *overrides], cwd=ROOT,
                          env=_env(env), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def start(script, *overrides, env=None):
    """Start a project script in the background (stdout and stderr together, as text); returns the Popen."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *overrides], cwd=ROOT, env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics(run_dir):
    """The records of a run folder's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def export_cifar(out, layout, per_class):
    """Export the real CIFAR-100 of ../shared/data to ``out`` (skips the test when it is not there); returns out."""
    import pytest

    exporter = os.path.join(SHARED_DATA, "cifar100_export.py")
    if not os.path.isfile(exporter):
        pytest.skip(f"real CIFAR-100 not found at {SHARED_DATA} (set ECOPVT_SHARED_DATA)")
    subprocess.run([sys.executable, exporter, "--out", str(out), "--layout", layout, "--per-class", str(per_class)],
                   check=True, capture_output=True)
    return out


def built_kernels(loader, what):
    """``loader()``'s ``torch.ops.ecopvt``, or a pytest skip naming ``what`` where no C++ compiler built it (the
    model then runs on PyTorch ops; one test per loader asserts the build where a compiler is expected)."""
    import pytest

    ops = loader()
    if ops is None:
        pytest.skip(f"{what} is not built here (no C++ compiler or ninja): PyTorch ops run instead")
    return ops
