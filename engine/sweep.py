"""Sweeps beyond one process: Hydra's launcher / sweeper plugins around train.py's task function.

    python train.py -m hydra/launcher=joblib seed=0,1,2,3                 # jobs side by side on this machine
    python train.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=4
    python train.py -m hparams_search=ecoformer_hash experiment=cifar100_cpu data.root=DIR   # Optuna search

* :func:`check_plugins` (before ``hydra.main``): a launcher / sweeper whose plugin is missing names its pip command.
* :class:`SweepPreflight` (a Hydra callback, before the sweeper starts a job): every swept value composes into a
  valid config, so a misspelt key fails now, not in job 7 on a cluster; creates the sweep folder (Optuna's sqlite).
* :func:`job` (wraps the task function): scheduler rank variables -> torchrun's, one joblib slot (CPU threads, GPU)
  per job, and a failed job raises :class:`JobFailed` (an Optuna trial state FAIL), never a sentinel top-1.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import functools
import importlib
import json
import logging
import math
import os
import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# config choice -> (pip package, the modules it must make importable)
PLUGINS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "hydra/launcher=joblib": ("hydra-joblib-launcher", ("hydra_plugins.hydra_joblib_launcher._core",)),
    "hydra/launcher=submitit_local": ("hydra-submitit-launcher",
                                      ("hydra_plugins.hydra_submitit_launcher.submitit_launcher", "submitit")),
    "hydra/launcher=submitit_slurm": ("hydra-submitit-launcher",
                                      ("hydra_plugins.hydra_submitit_launcher.submitit_launcher", "submitit")),
    "hydra/sweeper=optuna": ("hydra-optuna-sweeper", ("hydra_plugins.hydra_optuna_sweeper._impl",)),
}
PLUGIN_GROUPS = ("hydra/launcher", "hydra/sweeper")


# configs/hydra/launcher/*.yaml are complete launcher configs (every field, commented) named like the plugins' own
# structured configs, which Hydra 1.3 then uses as their schema (type checks) with a deprecation warning.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


class JobFailed(RuntimeError):
    """A sweep job that did not produce its objective; Hydra records it as the job's (trial's) failure."""


class SweepConfigError(SystemExit):
    """A swept value that cannot compose into a valid config, before any job starts. A ``SystemExit`` (message,
    status 1): Hydra turns a callback's ordinary exceptions into warnings, and the sweep must not go on."""


# plugins ------------------------------------------------------------------------------------------------------------
def requested_plugins(overrides: Sequence[str], config_dir: str) -> Iterator[Tuple[str, str]]:
    """(``group=choice``, the override asking for it) for every launcher / sweeper choice of the command line, also
    those set by a chosen config's defaults list (``hparams_search=X`` -> ``override /hydra/sweeper: optuna``)."""
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep or key.startswith("-"):
            continue
        for choice in value.split(","):
            if key in PLUGIN_GROUPS:
                yield f"{key}={choice}", item
                continue
            path = os.path.join(config_dir, key, f"{choice}.yaml")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                defaults = (yaml.safe_load(f) or {}).get("defaults") or []
            for entry in defaults:
                for group, name in (entry.items() if isinstance(entry, dict) else ()):
                    group = group.replace("override", "").strip().lstrip("/")
                    if group in PLUGIN_GROUPS:
                        yield f"{group}={name}", item


def check_plugins(overrides: Sequence[str], config_dir: str) -> None:
    """``SystemExit`` with the pip command when a requested launcher / sweeper plugin cannot be imported."""
    for choice, origin in requested_plugins(overrides, config_dir):
        if choice not in PLUGINS:
            continue  # Hydra's own launcher / sweeper, or an unknown name Hydra will refuse listing the valid ones
        package, modules = PLUGINS[choice]
        try:
            for module in modules:
                importlib.import_module(module)
        except ImportError as err:
            raise SystemExit(f"{choice} (from `{origin}`) needs the Hydra plugin {package}, which is not installed "
                             f"({err}). Install it: pip install {package}   (all sweep plugins: pip install -e "
                             "'.[sweep]')") from None
        if choice == "hydra/sweeper=optuna":
            check_optuna_storage()


def check_optuna_storage() -> None:
    """hydra-optuna-sweeper supports optuna 2.x only, whose sqlite storage fails on SQLAlchemy >= 2."""
    import optuna
    import sqlalchemy

    if int(optuna.__version__.split(".")[0]) < 3 and int(sqlalchemy.__version__.split(".")[0]) >= 2:
        raise SystemExit(f"optuna {optuna.__version__} (the 2.x that hydra-optuna-sweeper supports) cannot open its "
                         f"sqlite storage with SQLAlchemy {sqlalchemy.__version__}: pip install 'sqlalchemy<2'")


# pre-flight check of a sweep --------------------------------------------------------------------------------------
def _swept_values(override: Override) -> List[str]:
    """``key=value`` for each value a job may get: every choice / range / glob value, both ends of an interval."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [override.input_line]
    if override.is_interval_sweep():
        interval = override.value()
        return [f"{key}={interval.start}", f"{key}={interval.end}"]
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


def probe_overrides(overrides: Sequence[str], config_loader: Any = None) -> List[Tuple[str, List[str]]]:
    """(value under test, a job's override list): the first job, then each further swept value with every other
    override at its first value. A sweep of n values over k keys gives 1 + sum(n - 1) probes, not prod(n).
    A key given twice keeps its last override (as Optuna's sweeper does with ``params`` + command line)."""
    parsed = OverridesParser.create(config_loader).parse_overrides(list(overrides))
    last = {override.get_key_element(): override for override in parsed}
    values = [_swept_values(override) for override in last.values()]
    first = [options[0] for options in values]
    probes = [(" ".join(first), first)]
    for i, options in enumerate(values):
        probes += [(value, first[:i] + [value] + first[i + 1:]) for value in options[1:]]
    return probes


def _config_keys(cfg: DictConfig) -> List[str]:
    """Dotted keys of every value of ``cfg`` (for "did you mean" hints)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    keys: List[str] = []

    def walk(node: Any, prefix: str) -> None:
        for name, value in node.items():
            keys.append(prefix + str(name))
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")

    walk({k: v for k, v in container.items() if k != "hydra"}, "")
    return keys


class SweepPreflight(Callback):
    """Hydra callback (``hydra.callbacks`` in train.yaml): before the sweeper launches anything, compose the first
    job and every further swept value (:func:`probe_overrides`, Optuna's ``hydra.sweeper.params`` included) and run
    ``validate`` (a dotted function path, e.g. ``engine.config.validate_train_config``) on each."""

    def __init__(self, validate: Optional[str] = None) -> None:
        self.validate: Optional[Callable[[DictConfig], None]] = get_method(validate) if validate else None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        loader = GlobalHydra.instance().config_loader()
        params = config.hydra.sweeper.get("params") or {}  # Optuna's search space; the command line overrides it
        overrides = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
        probes = probe_overrides(overrides, loader)
        for value, probe in probes:
            try:
                job_cfg = loader.load_sweep_config(config, probe)
                with open_dict(job_cfg):  # as a job sees it: without the hydra node, whose interpolations
                    job_cfg.pop("hydra", None)  # need a running job
                if self.validate is not None:
                    self.validate(job_cfg)
            except Exception as err:  # composition or validation: report which swept value broke it
                key = re.search(r"(?:full_key: |Could not override ')([\w.]+)", str(err))
                close = difflib.get_close_matches(key.group(1), _config_keys(config), n=3) if key else []
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise SweepConfigError(f"sweep value `{value}` does not make a valid job config{hint}; no job was "
                                       f"started:\n{err}") from None
        os.makedirs(str(config.hydra.sweep.dir), exist_ok=True)  # Optuna's sqlite storage is opened in it
        log.info("sweep pre-flight: %d job configs composed and validated", len(probes))


# the job wrapper ----------------------------------------------------------------------------------------------------
# torch.distributed variable <- the variable a scheduler sets in every task it starts (srun / submitit's local pool)
SCHEDULER_ENV: Dict[str, Dict[str, Optional[str]]] = {
    "slurm": {"WORLD_SIZE": "SLURM_STEP_NUM_TASKS", "RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID",
              "job": "SLURM_JOB_ID", "nodes": "SLURM_STEP_NODELIST"},
    "submitit_local": {"WORLD_SIZE": "SUBMITIT_LOCAL_NTASKS", "RANK": "SUBMITIT_LOCAL_GLOBALID",
                       "LOCAL_RANK": "SUBMITIT_LOCAL_LOCALID", "job": "SUBMITIT_LOCAL_JOB_ID", "nodes": None},
}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    head = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist).group(0)
    return re.sub(r"\[([^\]\-,]+)[^\]]*\]", r"\1", head)


def torch_env_from_scheduler(environ: Mapping[str, str]) -> Dict[str, str]:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for a task a scheduler started (one task
    per GPU); empty when torchrun already set them or the job is a single task. MASTER_ADDR: the first host of the
    job step; MASTER_PORT: 20000 + job id mod 40000, the same in every task (either kept where already set)."""
    if "RANK" in environ:
        return {}
    for names in SCHEDULER_ENV.values():
        if all(environ.get(names[key]) for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK")):
            break
    else:
        return {}
    world_size = int(environ[names["WORLD_SIZE"]].split("(")[0])
    if world_size <= 1:
        return {}
    nodes = environ.get(names["nodes"] or "", "")
    job_id = re.sub(r"\D", "", environ.get(names["job"], "")) or "0"
    return {"RANK": environ[names["RANK"]], "WORLD_SIZE": str(world_size), "LOCAL_RANK": environ[names["LOCAL_RANK"]],
            "MASTER_ADDR": environ.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1"),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(job_id) % 40000)}


def export_torch_env() -> None:
    """Put :func:`torch_env_from_scheduler` into ``os.environ`` (train.py's ``setup_distributed`` reads it)."""
    env = torch_env_from_scheduler(os.environ)
    if env:
        os.environ.update(env)
        log.info("scheduler task -> rank %s of %s (local rank %s), master %s:%s", env["RANK"], env["WORLD_SIZE"],
                 env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"])


def job_slots() -> int:
    """Default ``hydra.launcher.n_jobs`` of the joblib launcher: one job per GPU, else one per CPU core."""
    import torch

    return torch.cuda.device_count() or os.cpu_count() or 1


if not OmegaConf.has_resolver("job_slots"):
    OmegaConf.register_new_resolver("job_slots", job_slots)


@contextlib.contextmanager
def joblib_slot(cfg: DictConfig, hydra_cfg: DictConfig) -> Iterator[None]:
    """A joblib job holds one of ``n_jobs`` slots (a lock file in the sweep folder) while it runs. Slot i trains on
    GPU i mod #GPUs (``device=auto|cuda``) with #cores // n_jobs CPU threads, so parallel jobs share the machine."""
    import torch
    from joblib import effective_n_jobs

    slots = effective_n_jobs(int(hydra_cfg.launcher.n_jobs))
    folder = os.path.join(str(hydra_cfg.sweep.dir), ".slots")
    os.makedirs(folder, exist_ok=True)
    handle, slot = None, -1
    for slot in range(slots):  # at most n_jobs jobs run at once: one slot is free
        handle = open(os.path.join(folder, f"{slot}.lock"), "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            handle.close()
    else:  # another sweep shares the folder: wait for this job's own slot
        slot = int(hydra_cfg.job.num) % slots
        handle = open(os.path.join(folder, f"{slot}.lock"), "w")
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
            cfg.device = f"cuda:{slot % torch.cuda.device_count()}"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // slots))
        log.info("joblib slot %d of %d (pid %d): device %s, %d CPU threads", slot, slots, os.getpid(), cfg.device,
                 torch.get_num_threads())
        yield
    finally:
        handle.close()


def best_metric(run_dir: str, metric: str, maximize: bool) -> float:
    """Best value of ``metric`` over the epochs of ``<run_dir>/metrics.jsonl`` (a torn last line is skipped)."""
    records = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
    values = [float(r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        known = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))})
        raise JobFailed(f"no epoch of {path} has a finite {metric} (optimized_metric; keys there: "
                        f"{', '.join(known) or 'none'})")
    return max(values) if maximize else min(values)


def job(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Decorate train.py's task function (under ``@hydra.main``). Every run: scheduler rank variables
    (:func:`export_torch_env`). In a multirun: the joblib slot, a job's ``SystemExit`` (train.py's clean failure
    exit) raised as :class:`JobFailed` so the sweep goes on and Optuna records the trial as failed, and the return
    value is the best ``optimized_metric`` (default ``val_top1``) of the job's metrics.jsonl on rank 0."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> Any:
        export_torch_env()
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return task(cfg)
        under_joblib = "Joblib" in str(hydra_cfg.launcher.get("_target_", ""))
        with joblib_slot(cfg, hydra_cfg) if under_joblib else contextlib.nullcontext():
            try:
                value = task(cfg)
            except SystemExit as err:
                reason = err.code if isinstance(err.code, str) else f"exit status {err.code}"
                raise JobFailed(f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}) failed: {reason}; "
                                f"log: {hydra_cfg.runtime.output_dir}") from None
        if int(os.environ.get("RANK", "0")) != 0:
            return value
        maximize = "minimize" not in str(hydra_cfg.sweeper.get("direction", "maximize"))
        return best_metric(hydra_cfg.runtime.output_dir, str(cfg.get("optimized_metric") or "val_top1"), maximize)

    return run
