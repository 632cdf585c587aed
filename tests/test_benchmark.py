"""scripts/benchmark.py: the timing helper, the tables, the part registry, and one smoke run of the model, ecoformer
and bitformer parts at 32 px (no timing is asserted)."""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")
COLUMNS = ["label", "size", "tokens", "batch", "threads", "device", "dtype", "mul_g", "infer_img_s", "train_img_s",
           "infer_mem_mb", "train_mem_mb", "limit_speed_vs_timm", "infer_speed_vs_timm", "train_speed_vs_timm",
           "infer_mem_vs_timm", "train_mem_vs_timm", "status"]
HASH_COLUMNS = ["dataset", "img_size", "images_per_epoch", "threads", "fit_s", "train_img_s", "epoch_train_s",
                "fit_share", "num_images", "steps_per_bit", "pairs"]
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


def test_time_interleaved_alternates_the_order_and_takes_medians(bench):
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = bench.time_interleaved(steps, 3, torch.device("cpu"))
    assert "".join(calls) == "abc" + "abc" + "cba" + "abc"  # warm-up, then rounds in alternating order
    assert set(seconds) == set("abc") and all(s >= 0 for s in seconds.values())
    durations = iter([0.03, 0.01, 0.02])  # one call per round, so the median is the middle round
    clock = [0.0]

    def step():
        clock[0] += next(durations)

    seconds = bench.time_interleaved({"x": step}, 3, torch.device("cpu"), warmup=False, clock=lambda: clock[0])
    assert seconds == {"x": pytest.approx(0.02)}
    assert bench.CLOCKS["cpu"] is time.process_time and bench.parse_args(["--clock", "cpu"]).clock == "cpu"


def test_time_interleaved_calibrates_calls_per_round(bench):
    clock, count = [0.0], [0]

    def step():  # 1 ms per call on the fake clock
        count[0] += 1
        clock[0] += 0.001

    seconds = bench.time_interleaved({"op": step}, 2, torch.device("cpu"), min_round_s=0.02, clock=lambda: clock[0])
    assert count[0] == 1 + 2 * 20  # the warm-up call set 20 calls per round
    assert seconds == {"op": pytest.approx(0.001)}


def test_speed_table_from_rows(bench):
    def row(label, size, threads, mul, infer, train):
        return dict(label=label, size=size, threads=threads, mul_g=mul, limit_speed_vs_timm=18.44 / mul,
                    infer_speed_vs_timm=infer, train_speed_vs_timm=train)

    rows = [row("timm", 896, 1, 18.44, 1.0, 1.0), row("EcoFormer", 896, 1, 9.16, 1.8, 1.5),
            row("Bitformer float", 896, 1, 13.40, 1.0, 0.9), row("softmax SRA", 896, 1, 18.44, 1.1, 1.0),
            row("timm", 896, 2, 18.44, 1.0, 1.0),
            row("EcoFormer", 896, 2, 9.16, 1.6, math.nan)]
    lines = bench.speed_table(rows).splitlines()
    assert lines[0] == ("| px | timm SRA mul (G) | EcoFormer mul (G) | Bitformer float mul (G) | op-count limit, "
                        "EcoFormer vs timm | EcoFormer infer x timm, 1 thr (% of limit) | EcoFormer train x timm, "
                        "1 thr (% of limit) | EcoFormer infer x timm, 2 thr (% of limit) | EcoFormer train x timm, "
                        "2 thr (% of limit) |")
    assert lines[2] == "| 896 | 18.44 | 9.16 | 13.40 | 2.01x | 1.80x (89%) | 1.50x (75%) | 1.60x (79%) | - |"
    with pytest.raises(ValueError, match="needs rows of 'EcoFormer' and 'timm'"):
        bench.speed_table([r for r in rows if r["label"] != "timm"])


def test_bad_arguments_name_the_valid_choices(bench, capsys):
    for argv, expected in ((["--part", "speed"], "valid parts: models, ecoformer, bitformer, scaling, deploy"),
                           (["--setups", "EcoFormer,MSA"], "unknown setup 'MSA'; valid setups: softmax SRA"),
                           (["--threads", "0"], "expected positive integers"),
                           (["--sizes", "224,x"], "expected a comma list of integers"),
                           (["--processes", "0"], "expected a positive number of processes"),
                           (["--part", "models,bitformer", "--processes", "2"], "run bitformer without it"),
                           (["--markdown", "a.csv", "--processes", "2"], "--markdown and --replot read CSVs")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert expected in capsys.readouterr().err
    assert bench.parse_args(["--part", "models,bitformer", "--threads", "1,2"]).parts == ["models", "bitformer"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            bench.resolve_device("cuda")


def test_deploy_part_calls_bench_deploy_or_says_what_is_missing(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DEPLOY_SCRIPT", str(tmp_path / "missing.py"))
    with pytest.raises(SystemExit, match=r"needs scripts/bench_deploy.py.*export extra"):
        bench.main(["--part", "deploy", "--out", str(tmp_path)])
    script = tmp_path / "bench_deploy.py"
    script.write_text("def run(args):\n    return [dict(model='pvtv2_b0', threads=t, ms=1.5) for t in args.threads]\n")
    monkeypatch.setattr(bench, "DEPLOY_SCRIPT", str(script))
    bench.main(["--part", "deploy", "--threads", "1,2", "--device", "cpu", "--out", str(tmp_path)])
    _, rows = read(tmp_path / "deploy.csv")
    assert rows == [dict(model="pvtv2_b0", threads="1", ms="1.5"), dict(model="pvtv2_b0", threads="2", ms="1.5")]
    assert "| pvtv2_b0 | 2 | 1.50 |" in (tmp_path / "deploy.md").read_text()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = subprocess.run([sys.executable, SCRIPT, "--part", "models,ecoformer,bitformer", "--quick", "--sizes", "32",
                          "--device", "cpu", "--threads", "1", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


def read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_quick_run_models_part(quick_run):
    """Every setup runs (ours vs timm speed ratios present and positive); the packed path refuses training."""
    out, stdout = quick_run
    columns, rows = read(out / "models.csv")
    assert columns == COLUMNS
    assert [r["label"] for r in rows] == LABELS
    by_label = {r["label"]: r for r in rows}
    for label in LABELS:
        if label != "Bitformer packed":
            assert by_label[label]["status"] == "ok", by_label[label]
    assert by_label["Bitformer packed"]["status"].startswith("train:")  # the inference path refuses training
    for row in rows:
        assert (row["size"], row["tokens"], row["batch"], row["threads"], row["device"]) == ("32", "64", "2", "1",
                                                                                               "cpu")
        assert math.isfinite(float(row["infer_img_s"])) and float(row["infer_img_s"]) > 0, row
        assert math.isfinite(float(row["infer_mem_mb"])) and float(row["infer_mem_mb"]) >= 0, row
        assert float(row["infer_speed_vs_timm"]) > 0, row
        if row["label"] != "Bitformer packed":
            assert float(row["train_img_s"]) > 0 and float(row["train_speed_vs_timm"]) > 0, row
            assert math.isfinite(float(row["train_mem_mb"])) and float(row["train_mem_mb"]) >= 0, row
        # the op-count limit is timm's multiplications over the setup's (timm's = our softmax SRA's)
        assert float(row["limit_speed_vs_timm"]) == pytest.approx(float(by_label["timm"]["mul_g"])
                                                                  / float(row["mul_g"]))
    assert float(by_label["timm"]["infer_speed_vs_timm"]) == 1.0
    assert by_label["timm"]["mul_g"] == by_label["softmax SRA"]["mul_g"]
    assert float(by_label["softmax MSA"]["limit_speed_vs_timm"]) < 1 < float(by_label["Bitformer float"]
                                                                             ["limit_speed_vs_timm"])
    assert "| softmax SRA | 32 |" in stdout
    assert (out / "models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_matches_the_energy_model(quick_run):
    """mul_g is the `mul` of scripts/energy.py (models.count_model_ops) at that size."""
    import timm

    import models

    out, _ = quick_run
    _, rows = read(out / "ecoformer.csv")
    mul = models.count_model_ops(timm.create_model("pvtv2_b0", attn="ecoformer"), 32)["mul"]
    assert float(next(r for r in rows if r["label"] == "EcoFormer")["mul_g"]) == pytest.approx(mul / 1e9)


def test_quick_run_ecoformer_part_and_hash_cost(quick_run):
    out, stdout = quick_run
    _, rows = read(out / "ecoformer.csv")
    assert [r["label"] for r in rows] == ["softmax SRA", "EcoFormer", "Bitformer float", "timm"]
    columns, hashes = read(out / "ecoformer_hash.csv")
    assert columns == HASH_COLUMNS
    assert [(r["dataset"], r["img_size"], r["images_per_epoch"]) for r in hashes] == [
        ("CIFAR-100", "32", "50000"), ("ImageNet", "224", "1281167")]
    for row in hashes:
        assert float(row["fit_s"]) > 0 and float(row["train_img_s"]) > 0
        assert 0 < float(row["fit_share"]) < 1
        assert int(row["pairs"]) == 10  # configs/train.yaml hash.pairs; smaller layers use fewer
    assert "### op-count limit and measured speed (EcoFormer vs timm)" in stdout
    png = (out / "ecoformer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert stdout.strip() == "\n\n".join((out / f"{p}.md").read_text().strip()
                                         for p in ("models", "ecoformer", "bitformer"))


def test_quick_run_bitformer_part(quick_run):
    out, _ = quick_run
    _, rows = read(out / "bitformer.csv")
    assert [(r["stage"], r["N"], r["M"], r["heads"]) for r in rows] == [("0", "64", "1", "1"), ("1", "16", "1", "2"),
                                                                        ("2", "4", "1", "5"), ("3", "1", "1", "8")]
    for row in rows:
        for op in ("packed", "swar", "float", "softmax", "attn_float", "attn_packed", "attn_softmax"):
            assert float(row[f"{op}_us"]) > 0, (op, row)
        assert float(row["mem_packed_kib"]) < float(row["mem_float_kib"])


def test_markdown_and_replot_read_the_csv_back(bench, quick_run, tmp_path, capsys):
    out, stdout = quick_run
    bench.main(["--markdown", str(out / "ecoformer.csv")])
    table = capsys.readouterr().out
    assert table.startswith("| px | timm SRA mul (G) | EcoFormer mul (G) | Bitformer float mul (G) |")
    assert table.strip() in stdout  # the same table the run printed
    rows = bench.read_rows([str(out / "models.csv")] * 2)
    assert len(rows) == 12 and rows[0]["label"] == "softmax SRA" and rows[0]["size"] == 32
    bench.main(["--replot", str(out / "models.csv"), str(out / "ecoformer.csv"), "--out", str(tmp_path)])
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="not a model-part CSV"):
        bench.read_rows([str(out / "bitformer.csv")])


def test_combine_processes_takes_medians_and_ratio_ranges(bench):
    """Rows of three processes -> one row per (label, size, threads): medians of the numbers (a ratio's median is the
    median of the per-process ratios), the statuses joined, the speed ratios' min-max; --markdown shows the range."""
    def run(eco_infer, eco_train, timm_img_s, status="ok"):
        eco = dict(label="EcoFormer", size=448, threads=1, mul_g=2.17, limit_speed_vs_timm=1.27, infer_img_s=6.0,
                   train_img_s=2.0, infer_speed_vs_timm=eco_infer, train_speed_vs_timm=eco_train, status=status)
        timm = dict(label="timm", size=448, threads=1, mul_g=2.75, limit_speed_vs_timm=1.0, infer_img_s=timm_img_s,
                    train_img_s=math.nan, infer_speed_vs_timm=1.0, train_speed_vs_timm=math.nan, status="ok")
        return [eco, timm]

    rows = bench.combine_processes([run(1.06, 1.10, 5.0), run(1.16, math.nan, 7.0, "train: OOM"), run(1.09, 1.20, 6.0)])
    assert [(r["label"], r["processes"]) for r in rows] == [("EcoFormer", 3), ("timm", 3)]
    eco, timm = rows
    assert (eco["infer_speed_vs_timm"], eco["infer_speed_vs_timm_min"], eco["infer_speed_vs_timm_max"]) == (1.09, 1.06,
                                                                                                           1.16)
    assert eco["train_speed_vs_timm"] == pytest.approx(1.15)  # NaN (a failed step) left out, median of two
    assert (eco["train_speed_vs_timm_min"], eco["train_speed_vs_timm_max"]) == (1.10, 1.20)
    assert eco["status"] == "ok x2; train: OOM x1" and timm["status"] == "ok"
    assert timm["infer_img_s"] == 6.0 and math.isnan(timm["train_img_s"])
    line = bench.speed_table(rows).splitlines()[2]
    assert line == "| 448 | 2.75 | 2.17 | 1.27x | 1.09x (86%; 1.06-1.16x) | 1.15x (91%; 1.10-1.20x) |"


def test_processes_run_the_measurement_in_fresh_processes_and_combine_them(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, SCRIPT, "--part", "models", "--setups", "EcoFormer,EcoFormer PyTorch ops,timm",
                          "--quick", "--sizes", "32", "--device", "cpu", "--threads", "1", "--processes", "2",
                          "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    per_process = [read(out / f"process_{k}" / "models.csv")[1] for k in range(2)]
    columns, combined = read(out / "models.csv")
    assert columns == COLUMNS + ["processes", "infer_speed_vs_timm_min", "infer_speed_vs_timm_max",
                                 "train_speed_vs_timm_min", "train_speed_vs_timm_max"]
    assert [r["label"] for r in combined] == ["EcoFormer", "EcoFormer PyTorch ops", "timm"]  # the optional setup too
    assert {r["processes"] for r in combined} == {"2"} and {r["status"] for r in combined} == {"ok"}
    for i, row in enumerate(combined):
        mine = [float(p[i]["infer_speed_vs_timm"]) for p in per_process]
        assert float(row["infer_speed_vs_timm"]) == pytest.approx(sum(mine) / 2)  # the median of two
        assert (float(row["infer_speed_vs_timm_min"]), float(row["infer_speed_vs_timm_max"])) == (min(mine), max(mine))
        assert float(row["train_img_s"]) == pytest.approx(sum(float(p[i]["train_img_s"]) for p in per_process) / 2)
    assert "Combined over 2 processes" in run.stdout and (out / "models.png").exists()
    bench.main(["--markdown", str(out / "models.csv")])
    assert "%; " in capsys.readouterr().out  # the range beside the ratio


def test_processes_pass_their_folder_to_each_child_and_gather_the_extra_tables(bench, tmp_path, monkeypatch):
    """Each child gets the same arguments plus ``--processes 1 --out <out>/process_<k>`` (and the child marker); the
    ecoformer part's extra table is gathered from every process with a ``process`` column, numbers typed."""
    calls = []

    def child(cmd, env):
        calls.append(cmd)
        out = cmd[cmd.index("--out", len(cmd) - 2) + 1]
        os.makedirs(out)
        k = len(calls) - 1
        rows = [dict(label=label, size=32, tokens=64, batch=2, threads=1, device="cpu", dtype="float32", mul_g=0.01,
                     infer_img_s=10.0 + k, train_img_s=5.0, infer_mem_mb=1.0, train_mem_mb=2.0,
                     limit_speed_vs_timm=1.0, infer_speed_vs_timm=1.0 if label == "timm" else 1.1 + k / 10,
                     train_speed_vs_timm=1.0, infer_mem_vs_timm=1.0, train_mem_vs_timm=1.0, status="ok")
                for label in ("timm", "EcoFormer")[::1 if k == 0 else -1]]  # the second child lists them reversed
        bench.write_csv(os.path.join(out, "ecoformer.csv"), rows)
        bench.write_csv(os.path.join(out, "ecoformer_hash.csv"), [dict(dataset="CIFAR-100", fit_s=0.123456 + k)])
        assert env[bench.CHILD_ENV] == "1"
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench.subprocess, "run", child)
    monkeypatch.delenv(bench.CHILD_ENV, raising=False)
    argv = ["--part", "ecoformer", "--quick", "--device", "cpu", "--processes", "2", "--out", str(tmp_path)]
    bench.main(argv)
    assert [c[2:] for c in calls] == [argv + ["--processes", "1", "--out", str(tmp_path / f"process_{k}")]
                                      for k in range(2)]
    _, rows = read(tmp_path / "ecoformer.csv")
    assert [r["label"] for r in rows] == ["timm", "EcoFormer"]  # the first process's order
    assert [float(r[c]) for r in rows for c in ("infer_speed_vs_timm", "infer_speed_vs_timm_max")] == pytest.approx(
        [1.0, 1.0, 1.15, 1.2])
    _, extra = read(tmp_path / "ecoformer_hash.csv")
    assert [(r["process"], r["fit_s"]) for r in extra] == [("0", "0.123456"), ("1", "1.123456")]
    assert "| 0 | CIFAR-100 | 0.12 |" in (tmp_path / "ecoformer.md").read_text()
    monkeypatch.setenv(bench.CHILD_ENV, "1")
    with pytest.raises(SystemExit, match="inside a --processes child"):
        bench.main(argv)
