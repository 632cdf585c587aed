#!/usr/bin/env python
"""Summarise a sweep: one markdown row per job of a Hydra multirun folder, and a PNG of the validation curves.

    python train.py -m attn=softmax,bitformer,ecoformer seed=0,1       # any launcher: basic, joblib, submitit
    python train.py -m hparams_search=ecoformer_hash ...               # an Optuna search
    python scripts/summarize.py multirun/2026-11-25/12-00-00 [--png curves.png] [--no-energy]

Columns: job, overrides, best / final top-1, final top-5, epochs, median training seconds per epoch, total training
seconds, energy per image (mJ, DESIGN §6; computed from the job's model config at its image size). An Optuna search
adds its trials (number, state, value, parameters, job folder) and the best trial, read from <sweep>/optuna.db.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
log = logging.getLogger("summarize")


def read_job(folder: str) -> Optional[Dict[str, Any]]:
    """A job folder's metrics, overrides and config, or None when it holds no metrics.jsonl or an unreadable one
    (a warning names the file and line; the other jobs are still summarised)."""
    import yaml

    metrics_path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        return None
    records = []
    with open(metrics_path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping job %s: %s line %d is not JSON (half-written by a crash?)",
                            os.path.basename(folder), metrics_path, number)
                return None
    overrides_path = os.path.join(folder, ".hydra", "overrides.yaml")
    overrides = yaml.safe_load(open(overrides_path)) if os.path.isfile(overrides_path) else []
    config_path = os.path.join(folder, "config.yaml")
    config = yaml.safe_load(open(config_path)) if os.path.isfile(config_path) else None
    return {"name": os.path.basename(folder), "records": records, "overrides": overrides, "config": config}


def energy_mj(config: Optional[Dict[str, Any]]) -> Optional[float]:
    """Energy per image in mJ of the job's model at its image size (None when it cannot be built)."""
    if not config:
        return None
    from engine.build import build_model
    from models.ops import count_model_ops

    model = build_model(config["model"], config["attn"], num_classes=config["data"].get("num_classes") or 1000,
                        load_pretrained=False)
    return count_model_ops(model, int(config["data"]["img_size"]))["energy_pj"] / 1e9


def job_overrides(sweep_dir: str) -> Dict[str, List[str]]:
    """Job folder name -> its command-line overrides, for every job Hydra started (finished or not)."""
    import yaml

    jobs = {}
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name, ".hydra", "overrides.yaml")
        if os.path.isfile(path):
            with open(path) as f:
                jobs[name] = yaml.safe_load(f) or []
    return jobs


def optuna_section(sweep_dir: str) -> List[str]:
    """Markdown lines for the Optuna studies of ``<sweep_dir>/optuna.db`` (none for a grid sweep): one row per
    trial with its job folder (the one whose overrides are the trial's parameters and fixed overrides), then the
    best trial."""
    db = os.path.join(sweep_dir, "optuna.db")
    if not os.path.isfile(db):
        return []
    try:
        import optuna
    except ImportError:
        raise SystemExit(f"{db}: reading an Optuna search needs optuna: pip install -e '.[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{os.path.abspath(db)}"
    jobs = job_overrides(sweep_dir)
    lines: List[str] = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        folder_of = {}
        for trial in study.trials:
            wanted = {f"{name}={value}" for name, value in {**trial.user_attrs, **trial.params}.items()}
            folder_of[trial.number] = next((name for name, overrides in jobs.items() if set(overrides) == wanted
                                            and name not in folder_of.values()), "-")
        states = [trial.state.name for trial in study.trials]
        lines += ["", f"Optuna study `{study.study_name}` ({study.direction.name.lower()}): {len(states)} trials, "
                  f"{states.count('COMPLETE')} complete, {states.count('FAIL')} failed", "",
                  "| trial | state | value | parameters | job |", "| ---: | --- | ---: | --- | --- |"]
        for trial in study.trials:
            value = "-" if trial.value is None else f"{trial.value:.2f}"
            params = " ".join(f"{name}={value}" for name, value in trial.params.items())
            lines.append(f"| {trial.number} | {trial.state.name} | {value} | {params} | {folder_of[trial.number]} |")
        if "COMPLETE" in states:
            best = study.best_trial
            lines += ["", f"best: trial {best.number}, value {best.value:.2f} ({folder_of[best.number]})"]
    return lines


def summarize(sweep_dir: str, png: Optional[str] = None, energy: bool = True) -> str:
    """Markdown table of the jobs under ``sweep_dir``; writes the validation-curve PNG to ``png`` when given."""
    if not os.path.isdir(sweep_dir):
        raise SystemExit(f"{sweep_dir}: no such folder (pass the multirun folder of a sweep)")
    jobs = [job for name in sorted(os.listdir(sweep_dir))
            if os.path.isdir(os.path.join(sweep_dir, name)) and (job := read_job(os.path.join(sweep_dir, name)))]
    if not jobs:
        raise SystemExit(f"{sweep_dir}: no job folder with a metrics.jsonl")
    rows: List[str] = ["| job | overrides | best top-1 | final top-1 | final top-5 | epochs | s/epoch (median) | "
                       "seconds | energy (mJ) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for job in jobs:
        validated = [r for r in job["records"] if "val_top1" in r and not r.get("skipped")]  # skipped: non-finite
        top1, top5 = [r["val_top1"] for r in validated], [r["val_top5"] for r in validated]
        epoch_seconds = [r.get("seconds", 0.0) for r in job["records"]]
        seconds = sum(epoch_seconds)
        mj = energy_mj(job["config"]) if energy else None
        best, final, final5 = (f"{max(top1):.2f}", f"{top1[-1]:.2f}", f"{top5[-1]:.2f}") if top1 else ("-",) * 3
        rows.append(f"| {job['name']} | {' '.join(job['overrides']) or '-'} | {best} | {final} | {final5} | "
                    f"{len(job['records'])} | {statistics.median(epoch_seconds):.0f} | {seconds:.0f} | "
                    f"{'-' if mj is None else f'{mj:.3f}'} |")
    rows += optuna_section(sweep_dir)
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for job in jobs:
            points = [(r["epoch"], r["val_top1"]) for r in job["records"] if "val_top1" in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=job["name"])  # the table maps job names to overrides
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="the multirun folder (holds one folder per job)")
    parser.add_argument("--png", default=None, help="where to save the validation curves (default: "
                                                   "<sweep_dir>/val_top1.png)")
    parser.add_argument("--no-energy", action="store_true", help="skip the energy column")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    png = args.png or os.path.join(args.sweep_dir, "val_top1.png")
    print(summarize(args.sweep_dir, png, energy=not args.no_energy))
    print(f"\ncurves: {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
