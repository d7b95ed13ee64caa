"""The published ranges the demo's report prints: drawn from the per-seed result files, and kept in step with them."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sqsd_ray.demo.published import PUBLISHED, collect_ranges, load_published, with_published_range

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


def _seed(path: Path, seed: int, sqsd: list[float], cpu: str = "cpu A") -> None:
    table = [{"ranking": "SQSD", **dict(zip(["S1", "S2", "S3", "S4", "S5"], sqsd)), "delta": sqsd[0] - sqsd[-1],
              "mono": "✓" if sqsd == sorted(sqsd, reverse=True) else "✗"},
             {"ranking": "Random", "S1": 10.0, "S2": 20.0, "S3": 10.0, "S4": 10.0, "S5": 10.0, "delta": 0.0,
              "mono": "✗"}]
    path.mkdir(parents=True, exist_ok=True)
    (path / f"seed-{seed}.json").write_text(json.dumps({"seed": seed, "commit": "abc1234", "machine": {"cpu": cpu},
                                                        "table": table}))


def test_ranges_are_min_and_max_over_seeds(tmp_path):
    _seed(tmp_path, 0, [100, 50, 20, 10, 5])
    _seed(tmp_path, 1, [80, 60, 30, 10, 10], cpu="cpu B")
    ranges = collect_ranges(tmp_path)
    assert ranges["seeds"] == [0, 1] and ranges["machines"] == ["cpu A", "cpu B"]
    sqsd = ranges["rankings"]["SQSD"]
    assert sqsd["S1"] == [80, 100] and sqsd["S2"] == [50, 60] and sqsd["delta"] == [70, 95]
    assert sqsd["mono"] == "2/2" and ranges["rankings"]["Random"]["mono"] == "0/2"


def test_table_one_says_whether_a_run_falls_inside():
    published = {"seeds": [0, 1], "rankings": {"SQSD": {"delta": [70.0, 95.0]}}}
    table = pd.DataFrame({"arm": ["SQSD", "SQSD", "LARF"], "delta": [95.0, 40.0, 10.0]})
    shown = with_published_range(table, published)
    assert list(shown["published Δ (seeds 0,1)"]) == ["+70.0 … +95.0", "+70.0 … +95.0", "—"]
    assert list(shown["inside"]) == ["✓", "✗", "—"]
    assert with_published_range(table, None) is table


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no seed-N.json"):
        collect_ranges(tmp_path)


def test_published_file_matches_the_result_files():
    """published.json is what bench/publish_ranges.py makes of docs/results: rerun it after adding a seed."""
    folders = [f for f in sorted(RESULTS.glob("*")) if any(f.glob("seed-*.json"))] if RESULTS.is_dir() else []
    if not folders:
        assert not PUBLISHED.is_file()
        return
    for folder in folders:
        assert load_published(folder.name) == json.loads(json.dumps(collect_ranges(folder))), folder.name


def test_a_run_that_repeats_a_published_seed_is_inside(tmp_path):
    """Δ of 110 prompts (4.5454…) rounded to 2 decimals in the ranges fell outside its own range."""
    _seed(tmp_path, 0, [100 * 5 / 110, 0, 0, 0, 0])
    _seed(tmp_path, 1, [100 * 9 / 110, 0, 0, 0, 0])
    published = json.loads(json.dumps(collect_ranges(tmp_path)))
    table = pd.DataFrame({"arm": ["SQSD"] * 3, "delta": [100 * 5 / 110, 100 * 9 / 110, 100 * 10 / 110]})
    assert list(with_published_range(table, published)["inside"]) == ["✓", "✓", "✗"]
