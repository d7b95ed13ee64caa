"""App. H: mean response length per rank band and the score-length correlation, on a constructed score file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sqsd_ray.cli import main
from sqsd_ray.scoring.length_bias import band_lengths


def _scores(n=50):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 300, size=n)
    return pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(n)], "n_response_tokens": lengths, "status": ["ok"] * n,
        "sqsd_raw": 1.0 / lengths,  # an unnormalised score that favours short answers
        "sqsd": rng.normal(size=n),  # one that ignores length
    })


def test_short_answers_top_an_unnormalised_ranking():
    table = band_lengths(_scores(), "sqsd_raw")
    assert list(table["band"]) == ["S1", "S2", "S3", "S4", "S5"]
    assert table["mean_tokens"].is_monotonic_increasing  # S1 = shortest
    assert table["n"].sum() == 50


def test_cli_writes_table_report_and_plot(tmp_path, capsys):
    _scores().to_parquet(tmp_path / "scores.parquet")
    pd.DataFrame([{"arm": "SQSD", "S1": 50, "S2": 40, "S3": 30, "S4": 20, "S5": 10}]).to_csv(tmp_path / "t.csv",
                                                                                          index=False)
    code = main(["length-bias", "--scores", str(tmp_path / "scores.parquet"), "--columns", "sqsd", "sqsd_raw",
                 "--experiment-table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out")])
    assert code == 0
    report = capsys.readouterr().out
    assert "| sqsd_raw | -1.000 |" in report  # 1/length: a perfect negative rank correlation
    assert (tmp_path / "out" / "length_bias.png").stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "out" / "length_bias.csv")) == 10


def test_needs_the_length_column(tmp_path):
    with pytest.raises(ValueError, match="n_response_tokens"):
        band_lengths(_scores().drop(columns=["n_response_tokens"]), "sqsd")
