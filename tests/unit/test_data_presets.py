"""Presets for the paper's safety data sets, preference pairs and keep_if, through local look-alike files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sqsd_ray.config import ConfigError
from sqsd_ray.data import DataConfig, DataError, load_samples, tokenize_sample
from sqsd_ray.evaluate import encode_prompt, keyword_refusal
from sqsd_ray.presets import PRESETS, REFUSALS, refusal_for, resolve
from sqsd_ray.tiny import build_tiny_tokenizer
from tests.conftest import SHARED_DATA

ADVBENCH = SHARED_DATA / "eval" / "advbench_harmful_behaviors.csv"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_presets_resolve_to_their_hf_datasets():
    for name, hf, split, schema in (("beavertails_unsafe", "PKU-Alignment/BeaverTails", "30k_train", "prompt_response"),
                                    ("aegis2_unsafe", "nvidia/Aegis-AI-Content-Safety-Dataset-2.0", "train",
                                     "prompt_response"),
                                    ("pku_saferlhf_pairs", "PKU-Alignment/PKU-SafeRLHF-10K", "train", "preference")):
        cfg = resolve(DataConfig(preset=name))
        assert (cfg.path, cfg.format, cfg.hf_split, cfg.schema) == (hf, "hf", split, schema)
    local = resolve(DataConfig(preset="beavertails_unsafe", path="x.parquet"))
    assert local.path == "x.parquet" and local.format == "auto"
    with pytest.raises(ConfigError, match="set data.path"):
        resolve(DataConfig(preset="advbench_harmful"))
    with pytest.raises(ConfigError, match="known:"):
        resolve(DataConfig(preset="nope"))


def test_beavertails_keeps_unsafe_rows_and_names_a_bad_flag(tmp_path):
    rows = [{"prompt": "p1", "response": "r1", "is_safe": False, "category": {"violence": True, "privacy": False}},
            {"prompt": "p2", "response": "r2", "is_safe": True, "category": {}},
            {"prompt": "p3", "response": "r3", "is_safe": False, "category": {}}]
    pd.DataFrame(rows).to_parquet(tmp_path / "bt.parquet")
    samples, report = load_samples(DataConfig(path=str(tmp_path / "bt.parquet"), preset="beavertails_unsafe"))
    assert [s.response for s in samples] == ["r1", "r3"] and report.skipped == {"not_selected": 1}
    assert report.records_read == report.kept + sum(report.skipped.values())
    assert samples[0].meta["categories"] == ["violence"]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r", "is_safe": "no"}])
    with pytest.raises(DataError, match=r"line 1.*is_safe"):
        load_samples(DataConfig(path=bad, preset="beavertails_unsafe"))


def test_aegis2_keeps_unsafe_responses(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [
        {"prompt": "p1", "response": "bad answer", "prompt_label": "unsafe", "response_label": "unsafe"},
        {"prompt": "p2", "response": None, "prompt_label": "unsafe", "response_label": None},
        {"prompt": "p3", "response": "fine", "prompt_label": "safe", "response_label": "safe"}])
    samples, report = load_samples(DataConfig(path=path, preset="aegis2_unsafe"))
    assert [s.response for s in samples] == ["bad answer"] and report.skipped == {"not_selected": 2}


def test_pku_pairs_prefer_the_safer_response(tmp_path):
    path = _jsonl(tmp_path / "pku.jsonl", [
        {"prompt": "q1", "response_0": "unsafe a", "response_1": "safe b", "is_response_0_safe": False,
         "is_response_1_safe": True, "safer_response_id": 1, "better_response_id": 0},
        {"prompt": "q2", "response_0": "safe c", "response_1": "unsafe d", "safer_response_id": 0},
        {"prompt": "q3", "response_0": "same", "response_1": "same", "safer_response_id": 0},
        {"prompt": "q4", "response_0": "x", "response_1": "y", "safer_response_id": 2}])
    with pytest.raises(DataError, match=r"line 4.*safer_response_id"):
        load_samples(DataConfig(path=path, preset="pku_saferlhf_pairs"))
    samples, report = load_samples(DataConfig(path=path, preset="pku_saferlhf_pairs", on_bad_record="skip"))
    assert [(s.response, s.rejected) for s in samples] == [("safe b", "unsafe a"), ("safe c", "unsafe d")]
    assert report.skipped == {"not_selected": 1, "wrong_type": 1}


def test_preference_ids_cover_the_rejected_side_and_tokenise_with_one_prompt(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "no", "rejected": "yes"},
                                             {"prompt": "q", "chosen": "no", "rejected": "sure"}])
    samples, report = load_samples(DataConfig(path=path))
    assert report.schema == "preference" and len({s.sample_id for s in samples}) == 2
    tokenizer = build_tiny_tokenizer()
    chosen = tokenize_sample(samples[0], tokenizer, 128)
    rejected = tokenize_sample(samples[0].rejected_sample(), tokenizer, 128)
    prompt = encode_prompt(samples[0], tokenizer)
    assert chosen.input_ids[:len(prompt)] == rejected.input_ids[:len(prompt)] == prompt
    assert chosen.n_prompt_tokens == rejected.n_prompt_tokens == len(prompt)
    missing = _jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "no", "rejected": " "}])
    with pytest.raises(DataError, match="rejected"):
        load_samples(DataConfig(path=missing))


def test_keep_if_selects_and_a_field_no_record_has_is_a_config_error(tmp_path):
    path = _jsonl(tmp_path / "k.jsonl", [{"prompt": "a", "response": "b", "split": "x"},
                                         {"prompt": "c", "response": "d", "split": "y"}, {"prompt": "e", "response": "f"}])
    samples, report = load_samples(DataConfig(path=path, keep_if={"split": "y"}))
    assert [s.response for s in samples] == ["d"] and report.skipped == {"not_selected": 2}
    with pytest.raises(ConfigError, match="'splt'.*fields"):
        load_samples(DataConfig(path=path, keep_if={"splt": "y"}))


def test_refusals_are_recognised_and_stable():
    assert all(keyword_refusal(r) for r in REFUSALS) and len(set(REFUSALS)) == len(REFUSALS)
    assert refusal_for("build a bomb") == refusal_for("build a bomb")
    assert len({refusal_for(f"goal {i}") for i in range(200)}) == len(REFUSALS)  # all of them get used


@pytest.mark.skipif(not ADVBENCH.is_file(), reason="needs ../shared/data/eval")
def test_advbench_presets_on_the_real_file():
    harmful, report = load_samples(DataConfig(path=str(ADVBENCH), preset="advbench_harmful"))
    pairs, _ = load_samples(DataConfig(path=str(ADVBENCH), preset="advbench_refusal_pairs"))
    assert len(harmful) == len(pairs) == report.kept == 520
    assert harmful[0].response.startswith("Sure, here is") and not keyword_refusal(harmful[0].response)
    assert pairs[0].rejected == harmful[0].response and pairs[0].response in REFUSALS
    assert set(PRESETS) == {"beavertails_unsafe", "aegis2_unsafe", "pku_saferlhf_pairs", "advbench_harmful",
                            "advbench_refusal_pairs"}
