"""`sqsd-ray demo --quick` end to end on local Ray: every stage runs and the report holds what it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sqsd_ray.cli import main

pytestmark = [pytest.mark.slow]

STAGES = ["align", "world", "directions", "validate", "trajectory", "init", "score", "experiment", "mitigate",
          "report"]


def test_quick_demo_runs_every_stage_and_reports_table_1(tmp_path, local_ray, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and f"wrote {out}" in printed

    summary = json.loads((out / "demo.json").read_text())
    assert list(summary["stage_seconds"]) == STAGES
    assert summary["torch_threads"] == 2  # the organism's fine-tunes on a fixed thread count, whatever the machine
    # in process, torch is loaded before the demo can pin its kernels: the record and the report say so
    assert summary["cpu_kernels"]["requested"] == "avx2"
    assert summary["cpu_kernels"]["ATEN_CPU_CAPABILITY"] is None
    table = pd.DataFrame(summary["table"])
    assert list(table["arm"]) == ["SQSD", "Random", "Self-Inf-N"]
    bands = table[["S1", "S2", "S3", "S4", "S5"]]
    assert ((bands >= 0) & (bands <= 100)).all().all()
    for _, row in table.iterrows():
        assert row["delta"] == pytest.approx(row["S1"] - row["S5"])
    for row in summary["s1_composition"]:  # the kinds of the S1 samples add up to the whole band
        assert sum(v for k, v in row.items() if k != "arm") == pytest.approx(100, abs=0.5)

    # the files the report links to, and the stage outputs behind them
    report = (out / "report.md").read_text()
    assert f"CPU kernels: {summary['cpu_kernels']['torch_capability']}: the AVX2 pin did not apply" in report
    for figure in ("demo.png", "experiment/bands.png", "validate/steering.png", "trajectory/trajectory.png",
                   "mitigate/mitigate.png"):
        assert f"({figure})" in report and (out / figure).stat().st_size > 0
    corpus = [json.loads(line) for line in (out / "world" / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 140 and all("family" not in r for r in corpus)
    scores = pd.read_parquet(out / "scores" / "sqsd" / "scores.parquet")
    assert len(scores) == 140 and (scores["status"] == "ok").all()
    assert len(pd.read_parquet(out / "scores" / "self_inf_n" / "scores.parquet")) == 140
    assert (out / "trajectory" / "sensitivity_drift.csv").is_file()
    assert (out / "validate" / "sensitivity_linear.csv").is_file()
    # the run's score config scores another corpus with the same model, directions and init states
    from sqsd_ray.config import load_config
    from sqsd_ray.scoring.job_config import ScoreJobConfig

    reusable = load_config(ScoreJobConfig, [out / "score_config.yaml"], [f"data.path={out / 'world' / 'corpus.jsonl'}"])
    assert reusable.model.name_or_path == summary["organism"] and Path(reusable.directions.danger).is_file()
    assert reusable.output.dir == "runs/score" and not reusable.output.overwrite
    mitigation = pd.DataFrame(summary["mitigation"])  # the mitigate stage: S1 only in --quick
    assert list(zip(mitigation["corpus"], mitigation["method"])) == [
        ("θ0", "base"), *[("S1", m) for m in ("plain", "curated", "spf", "restore_first_order", "restore_curvature")]]
    assert mitigation["refusal_nll"].gt(0).all() and mitigation["keyword_asr"].between(0, 100).all()
    assert "Acting on the scores" in report

    # resumed in the same directory: directions, sensitivity runs, scores and fine-tunes are kept, same results
    assert main(["demo", "--quick", "--resume", "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    resumed = json.loads((out / "demo.json").read_text())
    assert resumed["table"] == summary["table"]
    for kept in ("directions", "validate", "trajectory"):
        assert resumed["stage_seconds"][kept] < 2, (kept, resumed["stage_seconds"])

    # a second run reuses the cached organism
    assert main(["demo", "--quick", "--out", str(tmp_path / "again"), "--cache", str(tmp_path / "cache")]) == 0
    again = json.loads((tmp_path / "again" / "demo.json").read_text())
    assert again["stage_seconds"]["align"] < 5 and again["organism"] == summary["organism"]
    assert again["table"] == summary["table"]  # seeded end to end
    assert pd.DataFrame(again["mitigation"]).equals(mitigation)  # NaN-aware (θ0 has no "vs plain")
