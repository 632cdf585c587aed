"""Run folders: crash-consistent epochs (killed between any two writes), nothing written before the checks, one
writer per folder."""
import hashlib
import os
import signal
import time

import pytest
import torch

from engine.run_folder import FAULT_ENV, LOCK_NAME, RunFolder, RunFolderError
from helpers import metrics, run, start

TINY = ["experiment=smoke", "max_steps_per_epoch=1", "data.train_size=16", "data.val_size=16"]


def _snapshot(folder):
    """{relative path: (mtime_ns, sha1)} of every file under ``folder``."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns,
                                                    hashlib.sha1(open(path, "rb").read()).hexdigest())
    return files


def _temporaries(folder):
    return [f for f in _snapshot(folder) if os.path.basename(f).startswith(".tmp-")]


def _epoch(path):
    return torch.load(path, weights_only=True, mmap=True)["epoch"]


def test_killed_between_any_two_writes_the_folder_stays_consistent_and_resume_completes_it(tmp_path):
    """SIGKILL (ECOPVT_TEST_FAULT) with a temporary last.ckpt written, right after last.ckpt appears, while the
    next start re-writes best.ckpt, and with a temporary metrics.jsonl of the final epoch; each re-run completes the
    folder, and the last one, of a finished run, only completes it."""
    run_dir = tmp_path / "run"
    args = [*TINY, "epochs=2", f"hydra.run.dir={run_dir}"]
    ckpt = run_dir / "checkpoints"

    def killed_at(point):
        code, out, err = run("train.py", *args, env={FAULT_ENV: point})
        assert code == -signal.SIGKILL, (point, err[-2000:])
        return out

    killed_at("last.tmp@0")  # epoch 0 trained, its last.ckpt half-way: nothing of it exists
    assert not (ckpt / "last.ckpt").exists() and not (run_dir / "metrics.jsonl").exists()
    assert len(_temporaries(run_dir)) == 1
    holder = (run_dir / LOCK_NAME).read_text().strip()  # the killed run's lock file stays behind

    out = killed_at("last@0")  # right after last.ckpt appears: no metrics line, no best.ckpt yet
    assert f"taking over the lock of {holder}" in out and "removing" in out
    assert _epoch(ckpt / "last.ckpt") == 1 and not (ckpt / "best.ckpt").exists()
    assert not (run_dir / "metrics.jsonl").exists() and not _temporaries(run_dir)

    killed_at("best.tmp@0")  # the next start completes epoch 0 and is killed writing best.ckpt
    assert not (ckpt / "best.ckpt").exists() and len(_temporaries(run_dir)) == 1

    killed_at("metrics.tmp@1")  # completes epoch 0, trains and commits epoch 1, killed writing its metrics line
    assert _epoch(ckpt / "last.ckpt") == 2 and [r["epoch"] for r in metrics(run_dir)] == [0]
    assert len(_temporaries(run_dir)) == 1

    code, out, err = run("train.py", *args)  # a finished run: only completed
    assert code == 0, err[-3000:]
    assert "completing epoch 1" in out and "the run is finished" in out
    records = metrics(run_dir)
    last, best = (torch.load(ckpt / name, weights_only=True) for name in ("last.ckpt", "best.ckpt"))
    assert [r["epoch"] for r in records] == [0, 1] and records[1] == last["metrics"]
    best_epoch = max(range(2), key=lambda e: (records[e]["val_top1"], -e))  # the first of equals
    assert best["epoch"] == best_epoch + 1 and best["metrics"] == records[best_epoch]
    assert not _temporaries(run_dir) and not (run_dir / LOCK_NAME).exists()


def test_a_refused_relaunch_changes_nothing_and_a_finished_run_says_so(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run_dir}"]
    assert run("train.py", *args, "epochs=2")[0] == 0
    before = _snapshot(run_dir)
    assert {"config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml", "train.log"} <= before.keys()

    code, out, err = run("train.py", *args, "epochs=2", "attn=ecoformer", env={"HYDRA_FULL_ERROR": "0"})
    assert code == 2 and "Traceback" not in out + err
    assert "attn=softmax" in out and "attn=ecoformer" in out and "attn.name: softmax -> ecoformer" in out
    assert "blocks" not in out  # the config keys that differ, not the state-dict keys
    assert _snapshot(run_dir) == before

    code, out, err = run("train.py", *args, "epochs=1")  # fewer epochs than done
    assert code == 0 and "the run is finished (2 epochs, epochs=1)" in out
    assert _snapshot(run_dir) == before

    code, out, err = run("train.py", *args, "epochs=3")  # raised: goes on
    assert code == 0, err[-3000:]
    assert "resuming with changed settings: epochs: 2 -> 3" in out
    assert [r["epoch"] for r in metrics(run_dir)] == [0, 1, 2]
    assert "epochs: 3" in (run_dir / "config.yaml").read_text()


def test_a_second_run_into_a_busy_folder_fails_at_once_naming_the_first(tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    first = start("train.py", *TINY, "epochs=1", f"hydra.run.dir={run_dir}",
                  env={FAULT_ENV: f"commit@0:wait={release}"})  # holds the folder until released
    try:
        seen = ""
        while "test hook: waiting" not in seen and first.poll() is None:
            seen += first.stdout.readline()
        assert first.poll() is None, seen[-2000:]
        while "test hook: waiting" not in (run_dir / "train.log").read_text():  # the console line comes first
            time.sleep(0.05)
        before = _snapshot(run_dir)
        code, out, err = run("train.py", *TINY, "epochs=1", f"hydra.run.dir={run_dir}", env={"HYDRA_FULL_ERROR": "0"})
        assert code == 2 and f"in use by PID {first.pid} " in out and "Traceback" not in out + err
        assert _snapshot(run_dir) == before
    finally:
        release.touch()
        output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output[-3000:]
    assert [r["epoch"] for r in metrics(run_dir)] == [0]
    assert not (run_dir / LOCK_NAME).exists()


def test_the_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    holder, other = RunFolder(str(tmp_path)), RunFolder(str(tmp_path))
    holder.lock()
    with pytest.raises(RunFolderError, match=f"in use by PID {os.getpid()} on .*hydra.run.dir=DIR"):
        other.lock()  # flock: a second open file in the same process conflicts as another process would
    holder.unlock()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text("PID 999999 on elsewhere (since 2020-01-01 00:00:00)\n")  # left by a kill
    other.lock()
    assert "taking over the lock of PID 999999 on elsewhere" in caplog.text
    assert f"PID {os.getpid()} " in (tmp_path / LOCK_NAME).read_text()
    other.unlock()


def test_a_folder_holding_a_run_only_continues_it(tmp_path):
    folder = RunFolder(str(tmp_path))
    os.makedirs(folder.ckpt_dir)
    open(folder.metrics, "w").write('{"epoch": 0}\n')
    with pytest.raises(RunFolderError, match="records but .*last.ckpt is missing"):
        folder.resume_path("auto")
    open(folder.last, "wb").write(b"")
    with pytest.raises(RunFolderError, match="already holds a run .*resume=auto"):
        folder.resume_path(None)
    assert folder.resume_path("auto") == folder.last
