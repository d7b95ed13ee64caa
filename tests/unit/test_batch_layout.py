"""batching.layout: auto times the candidate layouts on the first block and keeps the fastest; sizes fix it."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from sqsd_ray.cli import main
from sqsd_ray.scoring import blocks
from sqsd_ray.scoring.blocks import LayoutCandidate
from sqsd_ray.scoring.scorer import SqsdScorer
from tests.conftest import save_random_directions

N = 20
COLUMNS = ("sqsd", "danger_proj", "safety_proj", "sqsd_raw")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    words = "alpha beta gamma delta river mountain quiet bright swift orange window garden".split()
    records = [{"id": f"r{i:02d}", "prompt": f"Tell me about {words[i % 12]}?",
                "response": " ".join(words[(i + k) % 12] for k in range(2 + i % 9))} for i in range(N)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_random_directions(root, "tiny-llama")
    config = {"model": {"name_or_path": "tiny-llama", "attn_implementation": "eager"},
              "data": {"path": str(root / "corpus.jsonl"), "max_length": 64},
              "directions": {"danger": str(root / "danger.safetensors"), "safety": str(root / "safety.safetensors")},
              "scoring": {"compile": "off"}, "ray": {"enabled": False}}
    (root / "score.yaml").write_text(yaml.safe_dump(config))
    assert _score(root, root / "fixed", "batching.layout=fixed") == 0
    return root


def _score(root, out, *overrides) -> int:
    return main(["score", "--config", str(root / "score.yaml"), "--set", f"output.dir={out}",
                 *[a for o in overrides for a in ("--set", o)]])


def _scores(run) -> pd.DataFrame:
    return pd.read_parquet(run / "scores.parquet").set_index("sample_id")


def test_auto_calibrates_on_the_first_block_and_records_it(job, tmp_path):
    assert _score(job, tmp_path / "run") == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    (calibration,) = run["layout_calibration"]
    assert calibration["samples"] == blocks.CALIBRATION_SAMPLES and len(calibration["seconds"]) >= 3
    assert calibration["chosen"] == min(calibration["seconds"], key=calibration["seconds"].get)
    assert run["batch_layout"] == {calibration["chosen"]: N}
    fixed = json.loads((job / "fixed" / "run.json").read_text())
    assert fixed["batch_layout"] == {"bs ≤ 1": N} and "layout_calibration" not in fixed
    got, want = _scores(tmp_path / "run"), _scores(job / "fixed")
    assert sorted(got.index) == sorted(want.index)
    for column in COLUMNS:  # the layout changes the speed, not the scores
        np.testing.assert_allclose(got.loc[want.index, column], want[column], rtol=0, atol=1e-6, err_msg=column)


def test_auto_keeps_the_fastest_candidate(job, tmp_path, monkeypatch):
    """Each batch costs a fixed 30 ms here, so the layout with the fewest batches must win."""
    monkeypatch.setattr(blocks, "candidate_layouts", lambda device, max_length: [
        LayoutCandidate(1, 1 << 30), LayoutCandidate(8, 1 << 30), LayoutCandidate(4, 1 << 30)])
    score_batch = SqsdScorer.score_batch

    def slow(self, batch):
        time.sleep(0.03)
        return score_batch(self, batch)

    monkeypatch.setattr(SqsdScorer, "score_batch", slow)
    assert _score(job, tmp_path / "run") == 0
    (calibration,) = json.loads((tmp_path / "run" / "run.json").read_text())["layout_calibration"]
    assert calibration["chosen"] == "bs ≤ 8", calibration
    assert calibration["seconds"]["bs ≤ 1"] > 2 * calibration["seconds"]["bs ≤ 8"]


def test_a_batch_size_fixes_the_layout(job, tmp_path):
    assert _score(job, tmp_path / "run", "batching.max_batch_size=3") == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["batch_layout"] == {"bs ≤ 3": N} and "layout_calibration" not in run


def test_a_block_too_small_to_tell_the_layouts_apart_is_scored_with_the_fixed_layout(job, tmp_path):
    assert _score(job, tmp_path / "run", f"data.limit={blocks.CALIBRATION_SAMPLES - 1}") == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["batch_layout"] == {"bs ≤ 1": blocks.CALIBRATION_SAMPLES - 1} and "layout_calibration" not in run
