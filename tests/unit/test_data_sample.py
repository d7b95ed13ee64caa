"""data.sample: a seeded random subset of the samples that survive validation (the paper's random 5k subsets)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sqsd_ray.cli import main
from sqsd_ray.config import ConfigError, from_dict
from sqsd_ray.data.records import DataConfig, DataSample, load_samples
from sqsd_ray.scoring.job_config import ScoreJobConfig
from tests.conftest import interrupt_scoring_after_parts, save_random_directions


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i:03d}", "prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(n)]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _draw(path: Path, n: int, seed: int, **extra) -> tuple[list[str], dict]:
    samples, report = load_samples(DataConfig(path=str(path), **extra, sample=DataSample(n, seed)))
    return [s.sample_id for s in samples], report.to_dict()


def test_a_draw_is_deterministic_in_file_order_and_differs_across_seeds(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", _records(200))
    ids, report = _draw(corpus, 50, seed=0)
    again, _ = _draw(corpus, 50, seed=0)
    other, _ = _draw(corpus, 50, seed=1)
    assert ids == again and len(ids) == 50 and len(set(ids)) == 50
    assert ids == sorted(ids)  # the input order (ids are numbered in file order)
    assert set(other) != set(ids) and len(set(other) & set(ids)) < 40  # another seed, another subset
    assert report["kept"] == 50 and report["skipped"] == {"not_drawn": 150}
    assert report["records_read"] == report["kept"] + report["n_skipped"]
    fingerprint = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    assert report["sampled"] == {"n": 50, "seed": 0, "pool": 200, "drawn": 50, "ids_fingerprint": fingerprint}


def test_the_draw_depends_on_the_ids_not_on_the_record_order(tmp_path):
    records = _records(120)
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    ids, report = _draw(_write(tmp_path / "a.jsonl", records), 30, seed=7)
    ids_shuffled, report_shuffled = _draw(_write(tmp_path / "b.jsonl", shuffled), 30, seed=7)
    assert set(ids) == set(ids_shuffled)
    assert report["sampled"]["ids_fingerprint"] == report_shuffled["sampled"]["ids_fingerprint"]


def test_bad_records_and_duplicates_are_left_out_before_the_draw(tmp_path):
    records = _records(40)
    records[3]["response"] = ""  # a bad record
    records.append(dict(records[10]))  # an identical repeat
    ids, report = _draw(_write(tmp_path / "c.jsonl", records), 39, seed=0, on_bad_record="skip")
    assert report["sampled"]["pool"] == 39 and len(ids) == 39  # 40 − 1 bad; the repeat is not drawn twice
    assert "r003" not in ids and ids.count("r010") == 1
    assert report["records_read"] == report["kept"] + report["n_skipped"]


def test_more_than_the_pool_keeps_every_sample_and_says_so(tmp_path, caplog):
    corpus = _write(tmp_path / "c.jsonl", _records(10))
    with caplog.at_level(logging.WARNING, logger="sqsd_ray"):
        ids, report = _draw(corpus, 25, seed=0)
    assert len(ids) == 10 and report["sampled"]["drawn"] == 10 and "only 10 samples" in caplog.text


@pytest.mark.parametrize("data, message", [
    ({"limit": 5, "sample": {"n": 5}}, "data.limit (5: the first N records) and data.sample (5 drawn at random)"),
    ({"sample": {"n": 0}}, "data.sample.n must be an integer >= 1, got 0"),
    ({"sample": {"n": 5, "sed": 1}}, "unknown config key data.sample.sed"),
])
def test_bad_sample_settings_are_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(ScoreJobConfig, {"data": {"path": "x.jsonl", **data}})


def test_a_sampled_score_run_scores_the_draw_records_it_and_resumes(tmp_path, monkeypatch, capsys):
    corpus = _write(tmp_path / "corpus.jsonl", _records(30))
    save_random_directions(tmp_path, "tiny-llama")
    config = {
        "model": {"name_or_path": "tiny-llama", "attn_implementation": "eager"},
        "data": {"path": str(corpus), "max_length": 64, "sample": {"n": 10, "seed": 4}},
        "directions": {"danger": str(tmp_path / "danger.safetensors"), "safety": str(tmp_path / "safety.safetensors")},
        "output": {"dir": str(tmp_path / "run"), "part_rows": 4},
        "ray": {"enabled": False},
    }
    (tmp_path / "score.yaml").write_text(yaml.safe_dump(config))
    drawn, _ = _draw(corpus, 10, seed=4)

    undo = interrupt_scoring_after_parts(monkeypatch, 1)
    assert main(["score", "--config", str(tmp_path / "score.yaml")]) == 130
    assert "4 of 10 samples kept" in capsys.readouterr().err
    undo()
    assert main(["score", "--config", str(tmp_path / "score.yaml")]) == 0  # the same draw: its 4 are kept
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["resume"]["kept"] == 4 and run["samples_scored_this_run"] == 6
    assert run["data_report"]["sampled"]["ids_fingerprint"] == _draw(corpus, 10, seed=4)[1]["sampled"]["ids_fingerprint"]
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    assert sorted(scores["sample_id"]) == drawn
    # another seed is another job: the run directory refuses it rather than mixing two subsets
    assert main(["score", "--config", str(tmp_path / "score.yaml"), "--set", "data.sample.seed=5"]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_a_smaller_draw_with_the_same_seed_is_inside_the_larger_one(tmp_path):
    """So a retain set of 256 (restore) lies inside the 5k fine-tuning draw of the same seed."""
    corpus = _write(tmp_path / "c.jsonl", _records(300))
    small, _ = _draw(corpus, 20, seed=2)
    large, _ = _draw(corpus, 150, seed=2)
    assert set(small) < set(large)


def test_every_paper_job_draws_its_subset_instead_of_taking_the_first_records():
    jobs = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))
    # the V_safety jobs train on all of PKU-SafeRLHF-10K, as the paper does; the SmolLM2 job scores a local file
    whole = ("_safety.yaml", "smollm2")
    paper = [j for j in jobs if "tiny" not in j.name and not any(w in j.name for w in whole)
             and yaml.safe_load(j.read_text()).get("data")]
    assert len(paper) >= 40
    for job in paper:
        data = yaml.safe_load(job.read_text())["data"]
        assert "limit" not in data and data["sample"]["seed"] == 0, job.name
        assert data["sample"]["n"] == (3000 if job.name.startswith("directions_") else 5000), job.name


def test_settings_added_later_leave_earlier_identities_unchanged():
    """data.sample, data.revision and model.chat_template_kwargs join a run's identity only when set: a run made
    before they existed still resumes."""
    from sqsd_ray.config import identity_dict, to_dict
    from sqsd_ray.models.loading import ModelConfig
    from sqsd_ray.training.config import TrainJobConfig, training_identity

    plain = from_dict(TrainJobConfig, {"model": {"name_or_path": "tiny-llama"}, "data": {"path": "x.jsonl"}})
    later = {"model": ("chat_template_kwargs",), "data": ("sample", "revision")}
    before = {name: {k: v for k, v in to_dict(getattr(plain, name)).items() if k not in later[name]}
              for name in ("model", "data")}
    assert {name: identity_dict(getattr(plain, name)) for name in ("model", "data")} == before
    sampled = from_dict(TrainJobConfig, {"model": {"name_or_path": "tiny-llama"},
                                         "data": {"path": "x.jsonl", "sample": {"n": 3}}})
    assert training_identity(sampled) != training_identity(plain)
    assert identity_dict(ModelConfig("tiny-llama", chat_template_kwargs={"enable_thinking": False})) != before["model"]


def test_a_repeat_of_a_sample_left_out_of_the_draw_is_left_out_too(tmp_path):
    """curate gives an identical repeat its first occurrence's fate: one not drawn must not come back through it."""
    records = _records(60)
    records += [dict(r) for r in records]  # every record twice
    samples, report = load_samples(DataConfig(path=str(_write(tmp_path / "c.jsonl", records)), sample=DataSample(10, 1)))
    drawn = {s.sample_id for s in samples}
    assert len(drawn) == 10 and set(report.duplicates.values()) == drawn
