"""Sweeps beyond one process: Hydra's joblib / submitit launchers, the Optuna sweeper, multi-node torchrun, and the
errors before any job (engine/sweep.py)."""
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime

import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from engine import sweep
from helpers import ROOT, metrics, run

CONFIGS = os.path.join(ROOT, "configs")
SMOKE = ["experiment=smoke", "epochs=1"]


def _job_folders(sweep_dir):
    return sorted(os.path.join(sweep_dir, name) for name in os.listdir(sweep_dir)
                  if os.path.isfile(os.path.join(sweep_dir, name, "metrics.jsonl")))


def _log_span(job_dir):
    """(first, last) timestamp of a job's Hydra log."""
    stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for line in open(os.path.join(job_dir, "train.log"))
              if (m := re.match(r"\[([\d\- :,]+)\]", line))]
    return stamps[0], stamps[-1]


def test_scheduler_variables_become_torchrun_variables(monkeypatch):
    """srun's per-task SLURM variables (and submitit's local ones) give torch.distributed's env:// variables."""
    slurm = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_STEP_NODELIST": "gpu[007-010],cpu3", "SLURM_NTASKS": "8"}
    env = sweep.torch_env_from_scheduler(slurm)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
                   "MASTER_PORT": str(20000 + 123456 % 40000)}
    assert sweep.torch_env_from_scheduler({**slurm, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
    assert sweep.torch_env_from_scheduler({**slurm, "RANK": "0"}) == {}  # torchrun inside the allocation: its own
    assert sweep.torch_env_from_scheduler({**slurm, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # one task: no DDP
    assert sweep.torch_env_from_scheduler({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}) == {}  # batch script, no srun
    local = {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
             "SUBMITIT_LOCAL_JOB_ID": "4242"}
    assert sweep.torch_env_from_scheduler(local)["MASTER_ADDR"] == "127.0.0.1"
    for nodes, host in [("node7", "node7"), ("a,b", "a"), ("rack[1-2]-n[01-04]", "rack1-n01"), ("g[3,5]", "g3")]:
        assert sweep.first_host(nodes) == host
    monkeypatch.setattr(os, "environ", dict(slurm))  # a task's environment, restored after the test
    sweep.export_torch_env()  # what train.py's task runs before setup_distributed reads RANK / WORLD_SIZE / ...
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")


def test_missing_plugin_fails_with_its_pip_command(monkeypatch):
    """A launcher / sweeper plugin that cannot be imported stops train.py before Hydra, naming the pip command, also
    when a config (hparams_search) chose it; the optuna 2 / SQLAlchemy 2 trap is named too."""
    sweep.check_plugins(["-m", "hydra/launcher=joblib", "hparams_search=recipe", "seed=0,1"], CONFIGS)  # installed
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_joblib_launcher._core", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"hydra/launcher=joblib .*pip install hydra-joblib-launcher"):
        sweep.check_plugins(["-m", "hydra/launcher=joblib"], CONFIGS)
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(SystemExit, match=r"pip install hydra-submitit-launcher"):
        sweep.check_plugins(["hydra/launcher=submitit_slurm"], CONFIGS)
    import sqlalchemy

    monkeypatch.setattr(sqlalchemy, "__version__", "2.0.30")
    with pytest.raises(SystemExit, match=r"pip install 'sqlalchemy<2'"):
        sweep.check_plugins(["hparams_search=ecoformer_hash"], CONFIGS)
    # end to end: train.py's own check, with the Optuna sweeper hidden, stops before Hydra starts
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_optuna_sweeper._impl", None)
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "hparams_search=recipe"])
    with pytest.raises(SystemExit, match=r"hydra/sweeper=optuna \(from `hparams_search=recipe`\) needs the Hydra "
                                         r"plugin hydra-optuna-sweeper.*pip install hydra-optuna-sweeper"):
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")


def _preflight(*overrides):
    """Run the pre-flight callback on the multirun config of ``train.py -m OVERRIDES``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        config = loader.load_configuration("train", list(overrides), run_mode=RunMode.MULTIRUN)
        sweep.SweepPreflight(validate="engine.config.validate_train_config").on_multirun_start(config)


def test_sweep_over_a_missing_key_or_value_fails_before_the_first_job(tmp_path):
    """Every swept value is composed and validated before the sweeper starts anything: a misspelt key (with the
    key it probably meant), an unknown group option, an invalid value, a misspelt Optuna search key."""
    probes = sweep.probe_overrides(["seed=0,1,2", "optim.lr=tag(log, interval(1e-4, 1e-2))", "attn=softmax", "+x=y"])
    assert [p[1] for p in probes] == [["seed=0", "optim.lr=0.0001", "attn=softmax", "+x=y"],
                                      ["seed=1", "optim.lr=0.0001", "attn=softmax", "+x=y"],
                                      ["seed=2", "optim.lr=0.0001", "attn=softmax", "+x=y"],
                                      ["seed=0", "optim.lr=0.01", "attn=softmax", "+x=y"]]
    sweep_dir = str(tmp_path / "ok")
    _preflight(*SMOKE, "seed=0,1", "hparams_search=ecoformer_hash", f"hydra.sweep.dir={sweep_dir}")
    assert os.path.isdir(sweep_dir)  # created for Optuna's sqlite storage
    cases = [(["data.bach_size=8,16"], r"data.bach_size=8.*did you mean data.batch_size"),
             (["attn=softmax,bitformr"], r"`attn=bitformr`[\s\S]*Available options in 'attn'"),
             (["data.batch_size=16,0"], r"`data.batch_size=0`[\s\S]*data.batch_size=0: must be >= 1"),
             (["hparams_search=recipe", "optim.weight_decai=interval(0, 0.1)"], r"did you mean optim.weight_decay")]
    for overrides, message in cases:
        with pytest.raises(sweep.SweepConfigError, match=message):
            _preflight(*SMOKE, *overrides, f"hydra.sweep.dir={tmp_path / 'bad'}")
    assert not os.path.exists(tmp_path / "bad")
    # end to end: the joblib launcher never starts a job
    code, _, err = run("train.py", "-m", "hydra/launcher=joblib", *SMOKE, "attn=softmax,bitformr",
                       f"hydra.sweep.dir={tmp_path / 'bad'}")
    assert code == 1 and "no job was started" in err and not os.path.exists(tmp_path / "bad"), err[-2000:]


def test_joblib_runs_two_jobs_at_once_and_summarize_reads_them(tmp_path):
    sweep_dir = str(tmp_path / "joblib")
    code, _, err = run("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMOKE, "seed=0,1",
                       f"hydra.sweep.dir={sweep_dir}")
    assert code == 0, err[-3000:]
    jobs = _job_folders(sweep_dir)
    assert len(jobs) == 2
    slots = [re.search(r"joblib slot (\d) of 2 \(pid (\d+)\)", open(os.path.join(j, "train.log")).read()).groups()
             for j in jobs]
    assert {s for s, _ in slots} == {"0", "1"} and slots[0][1] != slots[1][1]  # two worker processes
    (start0, end0), (start1, end1) = _log_span(jobs[0]), _log_span(jobs[1])
    assert start0 < end1 and start1 < end0  # side by side, not one after the other
    code, out, err = run("scripts/summarize.py", sweep_dir, "--no-energy")
    assert code == 0, err[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("| ") and "seed=" in line]
    assert len(rows) == 2 and "seed=0" in rows[0] and "seed=1" in rows[1]


def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    """The submitit code path (SLURM's, on this machine): 2 jobs, each job's run folder complete."""
    sweep_dir = str(tmp_path / "submitit")
    code, _, err = run("train.py", "-m", "hydra/launcher=submitit_local", *SMOKE, "seed=0,1",
                       f"hydra.sweep.dir={sweep_dir}")
    assert code == 0, err[-3000:]
    jobs = _job_folders(sweep_dir)
    assert len(jobs) == 2
    for job in jobs:
        assert sorted(os.listdir(os.path.join(job, "checkpoints"))) == ["best.ckpt", "last.ckpt"]
        assert os.path.isfile(os.path.join(job, "config.yaml")) and os.path.isdir(os.path.join(job, ".hydra"))
        assert os.path.isfile(os.path.join(job, "train.log"))
        records = metrics(job)
        assert len(records) == 1 and "val_top1" in records[0]
    assert len(os.listdir(os.path.join(sweep_dir, ".submitit"))) >= 2  # submitit's own job folders
    code, out, err = run("scripts/summarize.py", sweep_dir, "--no-energy")
    assert code == 0, err[-3000:]
    assert len([line for line in out.splitlines() if line.startswith("| ") and "seed=" in line]) == 2


@pytest.mark.slow
def test_submitit_local_job_of_two_tasks_trains_as_two_ddp_ranks(tmp_path):
    """tasks_per_node=2: the scheduler's task variables become torch.distributed's (as srun's do on SLURM), so one
    sweep job trains as 2 DDP ranks with identical EcoFormer hashes."""
    sweep_dir = str(tmp_path / "submitit")
    code, _, err = run("train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *SMOKE,
                       "attn=ecoformer", "data.train_size=32", "seed=0", f"hydra.sweep.dir={sweep_dir}")
    assert code == 0, err[-3000:]
    (job,) = _job_folders(sweep_dir)
    records = metrics(job)
    assert len(records) == 1 and "hash_fit" in records[0]
    log = open(os.path.join(job, "train.log")).read()
    assert "(2 processes" in log and "hash buffers identical on 2 ranks" in log
    assert "scheduler task -> rank 1 of 2" in log


def test_optuna_search_records_trials_resumes_and_counts_a_failed_trial_as_failed(tmp_path):
    import optuna

    sweep_dir = str(tmp_path / "search")
    search = ["hparams_search=ecoformer_hash", *SMOKE, "hash.num_images=16", f"hydra.sweep.dir={sweep_dir}"]
    code, _, err = run("train.py", "-m", *search, "hydra.sweeper.n_trials=3")
    assert code == 0, err[-3000:]
    results = yaml.safe_load(open(os.path.join(sweep_dir, "optimization_results.yaml")))
    assert results["best_value"] == max(r["val_top1"] for r in metrics(_job_of(sweep_dir, results["best_params"])))
    # resume the study from its sqlite file with one more trial, which diverges (SystemExit in train.py); a new
    # sampler seed, or the random start-up trials would repeat the first run's
    code, _, err = run("train.py", "-m", *search, "hydra.sweeper.n_trials=1", "hydra.sweeper.sampler.seed=1",
                       "optim.lr=1e30")
    assert code == 0, err[-3000:]
    trials = optuna.load_study(study_name="ecoformer_hash", storage=f"sqlite:///{sweep_dir}/optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL"] and trials[3].value is None
    failed = _job_of(sweep_dir, {**trials[3].params, "optim.lr": "1e+30"})
    assert "non-finite" in open(os.path.join(failed, "train.log")).read()
    for trial in trials[:3]:
        assert trial.value == max(r["val_top1"] for r in metrics(_job_of(sweep_dir, trial.params)))
    code, out, err = run("scripts/summarize.py", sweep_dir, "--no-energy")
    assert code == 0, err[-3000:]
    assert "4 trials, 3 complete, 1 failed" in out
    assert re.search(rf"\| 3 \| FAIL \| - \| .* \| {re.escape(os.path.basename(failed))} \|", out)
    best = max(trials[:3], key=lambda t: t.value)
    assert f"best: trial {best.number}, value {best.value:.2f}" in out


def _job_of(sweep_dir, params):
    """The one job folder (finished or not) whose overrides hold ``params`` (name -> value)."""
    wanted = {f"{name}={value}" for name, value in params.items()}
    jobs = [os.path.join(sweep_dir, name) for name in os.listdir(sweep_dir)
            if os.path.isfile(os.path.join(sweep_dir, name, ".hydra", "overrides.yaml"))
            and wanted <= set(yaml.safe_load(open(os.path.join(sweep_dir, name, ".hydra", "overrides.yaml"))))]
    assert len(jobs) == 1, (params, jobs)
    return jobs[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(port, run_dir, log_path, *overrides):
    """One torchrun "node" of one process (c10d rendezvous on loopback), training on gloo."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    return subprocess.Popen([*torchrun, os.path.join(ROOT, "train.py"), "experiment=smoke", "attn=ecoformer",
                             *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _two_nodes(tmp_path, run_dir, name, *overrides):
    port = _free_port()
    first = _start_node(port, run_dir, tmp_path / f"{name}_a.log", *overrides)
    deadline = time.time() + 120
    while time.time() < deadline:  # the first node hosts the rendezvous store
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return first, _start_node(port, run_dir, tmp_path / f"{name}_b.log", *overrides)


def _wait(procs, timeout=300):
    try:
        return [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_two_node_torchrun_trains_with_identical_hashes_and_one_checkpoint_set(tmp_path):
    """Two torchrun "nodes" of one process each on loopback (c10d rendezvous, gloo), EcoFormer, 1 epoch."""
    run_dir = tmp_path / "run"
    codes = _wait(_two_nodes(tmp_path, run_dir, "run", "epochs=1"))
    logs = [open(tmp_path / f"run_{node}.log").read() for node in "ab"]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for log in logs:  # every rank compared its hash buffers with rank 0's after the fit
        assert "hash buffers identical on 2 ranks" in log
    assert "(2 processes" in logs[0] + logs[1]
    records = metrics(run_dir)
    assert len(records) == 1 and "hash_fit" in records[0]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["best.ckpt", "last.ckpt"]  # one set, from rank 0
    assert len(list(tmp_path.glob("**/*.ckpt"))) == 2


@pytest.mark.slow
def test_two_node_torchrun_resumes_after_a_node_dies(tmp_path):
    """Node 2 killed (its agent and its worker) during epoch 1: node 1 fails on the lost peer; both nodes started
    again with resume=auto (the default) continue from epoch 1 with identical hashes."""
    run_dir = tmp_path / "run"
    nodes = _two_nodes(tmp_path, run_dir, "first", "epochs=2", "data.train_size=128")
    metrics_path = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics_path.is_file() and metrics_path.read_text().count("\n") >= 1):
        time.sleep(0.02)
    workers = [int(pid) for pid in open(f"/proc/{nodes[1].pid}/task/{nodes[1].pid}/children").read().split()]
    for pid in workers:  # a dead node: its worker (torchrun starts it in its own session) and its agent
        os.kill(pid, signal.SIGKILL)
    nodes[1].kill()
    codes = _wait(nodes)
    assert codes[0] != 0 and len(metrics(run_dir)) == 1, "the surviving node should fail with its peer gone"
    codes = _wait(_two_nodes(tmp_path, run_dir, "resumed", "epochs=2", "data.train_size=128"))
    logs = [open(tmp_path / f"resumed_{node}.log").read() for node in "ab"]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for log in logs:
        assert "resumed from" in log and "at epoch 1" in log and "hash buffers identical on 2 ranks" in log
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1] and all("hash_fit" in r for r in records)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["best.ckpt", "last.ckpt"]
