"""S1…S5 rank bands: contiguous, sampled as configured, unscored samples counted, subsets written as data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sqsd_ray.config import ConfigError
from sqsd_ray.data.records import DataConfig, load_samples
from sqsd_ray.experiments.partition import PartitionConfig, PartitionSettings, band_paths, rank_bands, run_partition


def _scores(n=20, nan_at=(3,)):
    values = np.arange(n, dtype=float)  # sample i has score i: riskiest is the last one
    status = ["ok"] * n
    for i in nan_at:
        values[i], status[i] = np.nan, "nonfinite"
    return pd.DataFrame({"sample_id": [f"s{i:02d}" for i in range(n)], "sqsd": values, "status": status,
                         "danger_norm": -values})


def test_bands_are_contiguous_rank_ranges_riskiest_first():
    chosen, excluded = rank_bands(_scores(), PartitionSettings(n_bands=5))
    assert excluded == 1 and len(chosen) == 19
    s1 = chosen[chosen["band"] == "S1"]
    assert list(s1["sample_id"])[:3] == ["s19", "s18", "s17"] and list(s1["rank"])[:3] == [1, 2, 3]
    maxima = chosen.groupby("band", sort=False)["score"].max().to_list()
    assert maxima == sorted(maxima, reverse=True)
    minima = chosen.groupby("band", sort=False)["score"].min().to_list()
    assert all(lo > hi for lo, hi in zip(minima, maxima[1:]))  # no overlap between bands


def test_uniform_random_and_top_sampling():
    scores = _scores(n=100, nan_at=())
    uniform, _ = rank_bands(scores, PartitionSettings(n_bands=5, subset_size=4))
    assert list(uniform[uniform["band"] == "S1"]["rank"]) == [1, 6, 11, 16]  # spread over the band's 20 ranks
    top, _ = rank_bands(scores, PartitionSettings(n_bands=5, subset_size=4, sampling="top"))
    assert list(top[top["band"] == "S2"]["rank"]) == [21, 22, 23, 24]
    a, _ = rank_bands(scores, PartitionSettings(n_bands=5, subset_size=4, sampling="random", seed=3))
    b, _ = rank_bands(scores, PartitionSettings(n_bands=5, subset_size=4, sampling="random", seed=3))
    assert a.equals(b) and set(a[a["band"] == "S5"]["rank"]) <= set(range(81, 101))
    ascending, _ = rank_bands(scores, PartitionSettings(column="danger_norm", higher_is_riskier=True, n_bands=5))
    assert ascending.iloc[0]["sample_id"] == "s00"  # danger_norm = −i: s00 ranks riskiest
    with pytest.raises(ValueError, match="fewer than subset_size"):
        rank_bands(scores, PartitionSettings(n_bands=5, subset_size=21))
    with pytest.raises(ConfigError, match="'nope'"):
        rank_bands(scores, PartitionSettings(column="nope"))


def test_run_partition_writes_fine_tuning_sets(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"s{i:02d}", "instruction": f"q{i}", "output": f"a{i}"}) + "\n"
                              for i in range(20)))
    pd.DataFrame(_scores()).to_parquet(tmp_path / "scores.parquet")
    out = run_partition(PartitionConfig(scores=str(tmp_path / "scores.parquet"), data=DataConfig(path=str(corpus)),
                                        partition=PartitionSettings(n_bands=4), output_dir=str(tmp_path / "p")))
    paths = band_paths(out)
    assert list(paths) == ["S1", "S2", "S3", "S4"]
    s1, _ = load_samples(DataConfig(path=str(paths["S1"])))
    assert [s.sample_id for s in s1] == ["s19", "s18", "s17", "s16", "s15"]
    assert s1[0].response == "a19" and s1[0].messages[-1]["content"] == "q19"
    summary = json.loads((out / "partition.json").read_text())
    assert summary["excluded_without_score"] == 1 and sum(b["n"] for b in summary["bands"].values()) == 19
    pd.DataFrame({"sample_id": ["zz", "s01"], "sqsd": [1.0, 2.0]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not in the corpus"):
        run_partition(PartitionConfig(scores=str(tmp_path / "other.parquet"), data=DataConfig(path=str(corpus)),
                                      partition=PartitionSettings(n_bands=2, subset_size=None),
                                      output_dir=str(tmp_path / "q")))
