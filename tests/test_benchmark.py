"""scripts/benchmark.py: helpers, and one end-to-end smoke run at 32 px (no timing is asserted)."""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
COLUMNS = ["label", "size", "tokens", "batch", "device", "dtype", "infer_img_s", "train_img_s", "infer_mem_mb",
           "train_mem_mb", "infer_speed_vs_timm", "train_speed_vs_timm", "infer_mem_vs_timm", "train_mem_vs_timm",
           "status"]
HASH_COLUMNS = ["dataset", "img_size", "images_per_epoch", "fit_s", "train_img_s", "epoch_train_s", "fit_share",
                "num_images", "steps_per_bit", "pairs", "status"]
LABELS = ["softmax SRA", "softmax MSA", "EcoFormer", "Bitformer float", "Bitformer packed", "timm"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tokens_and_batches(bench):
    assert bench.stage_tokens(224) == [3136, 784, 196, 49]
    assert bench.stage_tokens(32) == [64, 16, 4, 1]
    assert [bench.batch_for(s, 64) for s in (32, 224, 448, 896)] == [64, 64, 16, 4]
    assert bench.batch_for(896, 8) == 1
    assert bench.ratio(3.0, 2.0) == 1.5 and math.isnan(bench.ratio(1.0, 0.0))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = subprocess.run([sys.executable, SCRIPT, "--quick", "--sizes", "32", "--device", "cpu", "--threads", "1",
                          "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


def read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_quick_run_rows(quick_run):
    out, stdout = quick_run
    columns, rows = read(out / "benchmark.csv")
    assert columns == COLUMNS
    assert [r["label"] for r in rows] == LABELS
    by_label = {r["label"]: r for r in rows}
    for label in LABELS:
        if label != "Bitformer packed":
            assert by_label[label]["status"] == "ok", by_label[label]
    assert by_label["Bitformer packed"]["status"].startswith("train:")  # the inference path refuses training
    for row in rows:
        assert (row["size"], row["tokens"], row["batch"], row["device"]) == ("32", "64", "2", "cpu")
        assert math.isfinite(float(row["infer_img_s"])) and float(row["infer_img_s"]) > 0, row
        assert math.isfinite(float(row["infer_mem_mb"])) and float(row["infer_mem_mb"]) >= 0, row
        if row["label"] != "Bitformer packed":
            assert math.isfinite(float(row["train_img_s"])) and float(row["train_img_s"]) > 0, row
            assert math.isfinite(float(row["train_mem_mb"])) and float(row["train_mem_mb"]) >= 0, row
    assert float(by_label["timm"]["infer_speed_vs_timm"]) == 1.0
    assert "| softmax SRA | 32 |" in stdout and "Hash learning" in stdout
    assert (out / "benchmark.md").read_text().strip() == stdout.strip()


def test_quick_run_hash_cost_and_plot(quick_run):
    out, _ = quick_run
    columns, rows = read(out / "hash_cost.csv")
    assert columns == HASH_COLUMNS
    assert [(r["dataset"], r["img_size"], r["images_per_epoch"]) for r in rows] == [
        ("CIFAR-100", "32", "50000"), ("ImageNet", "224", "1281167")]
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["fit_s"]) > 0 and float(row["train_img_s"]) > 0
        assert 0 < float(row["fit_share"]) < 1
        assert int(row["pairs"]) == 10  # configs/train.yaml hash.pairs; smaller layers use fewer
    png = (out / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_replot_reads_the_csv_back(bench, quick_run, tmp_path):
    out, _ = quick_run
    rows = bench.read_rows([str(out / "benchmark.csv")] * 2)
    assert len(rows) == 12 and rows[0].label == "softmax SRA" and rows[0].size == 32
    bench.main(["--replot", str(out / "benchmark.csv"), "--out", str(tmp_path)])
    assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
