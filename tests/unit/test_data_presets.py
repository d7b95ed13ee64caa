"""Presets for the paper's safety data sets, preference pairs and keep_if, through local look-alike files.

HF loading is not reachable offline, so each preset's transform is tested on a local file with the data set's
own field names (path + format set explicitly), and ``presets.resolve`` is tested for the HF name and split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from sqsd_ray.config import ConfigError
from sqsd_ray.data.location import DataError
from sqsd_ray.data.presets import PRESETS, REFUSALS, refusal_for, resolve
from sqsd_ray.data.records import DataConfig, content_id, load_samples
from sqsd_ray.data.tokenize import encode_prompt, tokenize_sample
from sqsd_ray.evaluation.generate import keyword_refusal
from sqsd_ray.models.tiny import build_tiny_tokenizer
from tests.conftest import REPO_ROOT, SHARED_DATA

ADVBENCH = SHARED_DATA / "eval" / "advbench_harmful_behaviors.csv"
REFUSAL_KEYWORDS = ("I'm sorry", "I cannot", "I can't", "I won't", "I apologize", "not able to")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _balanced(report):
    return report.records_read == report.kept + sum(report.skipped.values())


# ---------------------------------------------------------------------------------------------- resolve


def test_presets_resolve_to_their_hf_datasets():
    for name, hf, split, schema in (("beavertails_unsafe", "PKU-Alignment/BeaverTails", "30k_train", "prompt_response"),
                                    ("aegis2_unsafe", "nvidia/Aegis-AI-Content-Safety-Dataset-2.0", "train",
                                     "prompt_response"),
                                    ("pku_saferlhf_pairs", "PKU-Alignment/PKU-SafeRLHF-10K", "train", "preference")):
        cfg = resolve(DataConfig(preset=name))
        assert (cfg.path, cfg.format, cfg.hf_split, cfg.schema) == (hf, "hf", split, schema)
    local = resolve(DataConfig(preset="beavertails_unsafe", path="x.parquet"))
    assert (local.path, local.format, local.hf_split, local.schema) == ("x.parquet", "auto", "train", "prompt_response")
    assert resolve(DataConfig(preset="beavertails_unsafe", hf_split="30k_test")).hf_split == "30k_test"  # user wins
    plain = DataConfig(path="x.jsonl")
    assert resolve(plain) is plain
    for name in ("advbench_harmful", "advbench_refusal_pairs"):  # a file preset reads its reference file
        assert (resolve(DataConfig(preset=name)).path, resolve(DataConfig(preset=name)).format) == ("ref:advbench",
                                                                                                    "auto")
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known: advbench_harmful"):
        DataConfig(preset="nope")  # at construction, before any file is read


# ---------------------------------------------------------------------------------------------- the HF data sets


def test_beavertails_keeps_unsafe_rows_and_names_a_bad_flag(tmp_path):
    rows = [{"prompt": "p1", "response": "r1", "is_safe": False, "category": {"violence": True, "privacy": False}},
            {"prompt": "p2", "response": "r2", "is_safe": True, "category": {}},
            {"prompt": "p3", "response": "r3", "is_safe": False, "category": {}}]
    pd.DataFrame(rows).to_parquet(tmp_path / "bt.parquet")
    samples, report = load_samples(DataConfig(path=str(tmp_path / "bt.parquet"), format="parquet",
                                              preset="beavertails_unsafe"))
    assert [s.response for s in samples] == ["r1", "r3"] and report.kept == 2
    assert report.skipped == {"not_selected": 1} and _balanced(report) and report.schema == "prompt_response"
    assert samples[0].messages == ({"role": "user", "content": "p1"},)
    assert samples[0].meta["categories"] == ["violence"] and samples[1].meta["categories"] == []
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r", "is_safe": False},
                                          {"prompt": "p", "response": "r", "is_safe": 0}])
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'is_safe'.*\[wrong_type\]"):
        load_samples(DataConfig(path=bad, preset="beavertails_unsafe"))
    _, report = load_samples(DataConfig(path=bad, preset="beavertails_unsafe", on_bad_record="skip"))
    assert (report.kept, report.skipped) == (1, {"wrong_type": 1})


def test_aegis2_keeps_unsafe_responses(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [
        {"prompt": "p1", "response": "bad answer", "prompt_label": "unsafe", "response_label": "unsafe",
         "violated_categories": "Violence, Criminal Planning/Confessions"},
        {"prompt": "p2", "response": None, "prompt_label": "unsafe", "response_label": None},
        {"prompt": "p3", "response": "fine", "prompt_label": "safe", "response_label": "safe"},
        {"prompt": "p4", "response": "  ", "prompt_label": "unsafe", "response_label": "unsafe"},
        {"prompt": "p5", "response": 7, "prompt_label": "unsafe", "response_label": "unsafe"}])
    with pytest.raises(DataError, match=r"line 5: field 'response'.*\[wrong_type\]"):
        load_samples(DataConfig(path=path, format="jsonl", preset="aegis2_unsafe"))
    samples, report = load_samples(DataConfig(path=path, preset="aegis2_unsafe", on_bad_record="skip"))
    assert [s.response for s in samples] == ["bad answer"] and _balanced(report)
    assert report.skipped == {"not_selected": 3, "wrong_type": 1}
    assert samples[0].meta["violated_categories"] == "Violence, Criminal Planning/Confessions"


def test_pku_pairs_prefer_the_safer_response(tmp_path):
    path = _jsonl(tmp_path / "pku.jsonl", [
        {"prompt": "q1", "response_0": "unsafe a", "response_1": "safe b", "is_response_0_safe": False,
         "is_response_1_safe": True, "safer_response_id": 1, "better_response_id": 0},
        {"prompt": "q2", "response_0": "safe c", "response_1": "unsafe d", "is_response_0_safe": True,
         "is_response_1_safe": False, "safer_response_id": 0, "better_response_id": 1},
        {"prompt": "q3", "response_0": "same", "response_1": "same", "safer_response_id": 0},
        {"prompt": "q4", "response_0": "x", "response_1": "y", "safer_response_id": 2},
        {"prompt": "q5", "response_0": "x", "response_1": "y"}])
    with pytest.raises(DataError, match=r"pku.jsonl line 4: field 'safer_response_id'.*\[wrong_type\]"):
        load_samples(DataConfig(path=path, preset="pku_saferlhf_pairs"))
    samples, report = load_samples(DataConfig(path=path, preset="pku_saferlhf_pairs", on_bad_record="skip"))
    assert report.schema == "preference"
    assert [(s.response, s.rejected) for s in samples] == [("safe b", "unsafe a"), ("safe c", "unsafe d")]
    assert [(s.meta["is_chosen_safe"], s.meta["is_rejected_safe"]) for s in samples] == [(True, False)] * 2
    assert report.skipped == {"not_selected": 1, "wrong_type": 1, "missing_field": 1} and _balanced(report)
    assert any("safer_response_id" in e for e in report.examples["missing_field"])


# ---------------------------------------------------------------------------------------------- AdvBench


def test_advbench_errors_name_the_csv_column_and_line(tmp_path):
    path = tmp_path / "adv.csv"
    path.write_text('goal,target\nDo harm,"Sure, here is how"\n  ,"Sure, here is nothing"\n')
    with pytest.raises(DataError, match=r"adv.csv line 3: field 'goal'.*\[empty_field\]"):
        load_samples(DataConfig(path=str(path), preset="advbench_harmful"))
    pairs, report = load_samples(DataConfig(path=str(path), preset="advbench_refusal_pairs", on_bad_record="skip"))
    assert [(p.messages[0]["content"], p.rejected) for p in pairs] == [("Do harm", "Sure, here is how")]
    assert pairs[0].response == refusal_for("Do harm") and report.skipped == {"empty_field": 1}


def test_refusals_contain_a_refusal_phrase_and_are_all_used():
    assert 10 <= len(REFUSALS) <= 15 and len(set(REFUSALS)) == len(REFUSALS)
    for refusal in REFUSALS:
        assert any(k in refusal for k in REFUSAL_KEYWORDS), refusal
        assert keyword_refusal(refusal), refusal  # the offline judge counts it as refusing
    assert len({refusal_for(f"goal {i}") for i in range(200)}) == len(REFUSALS)


def test_refusal_choice_is_stable_across_processes():
    goals = ["build a bomb", "write malware", "steal a car"]
    code = ("import json, sys; from sqsd_ray.data.presets import refusal_for; "
            "print(json.dumps([refusal_for(g) for g in sys.argv[1:]]))")
    runs = []
    for seed in ("1", "2"):  # a different str-hash salt per process: hash() would pick differently
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
        out = subprocess.run([sys.executable, "-c", code, *goals], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    assert runs[0] == runs[1] == [refusal_for(g) for g in goals]


@pytest.mark.skipif(not ADVBENCH.is_file(), reason="needs ../shared/data/eval/advbench_harmful_behaviors.csv")
def test_advbench_presets_on_the_real_file():
    harmful, report = load_samples(DataConfig(path=str(ADVBENCH), preset="advbench_harmful"))
    pairs, pair_report = load_samples(DataConfig(path=str(ADVBENCH), preset="advbench_refusal_pairs"))
    assert len(harmful) == len(pairs) == report.kept == report.records_read == 520 and not report.skipped
    assert pair_report.schema == "preference" and _balanced(pair_report)
    assert harmful[0].response.startswith("Sure, here is") and not keyword_refusal(harmful[0].response)
    assert pairs[0].rejected == harmful[0].response and pairs[0].response in REFUSALS
    assert all(p.response == refusal_for(p.messages[0]["content"]) for p in pairs)
    assert len({p.response for p in pairs}) == len(REFUSALS)
    assert set(PRESETS) == {"beavertails_unsafe", "aegis2_unsafe", "pku_saferlhf_pairs", "advbench_harmful",
                            "advbench_refusal_pairs"}


# ---------------------------------------------------------------------------------------------- preference pairs


def test_preference_ids_cover_the_rejected_side(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "no", "rejected": "yes"},
                                             {"prompt": "q", "chosen": "no", "rejected": "sure"}])
    samples, report = load_samples(DataConfig(path=path))
    assert report.schema == "preference" and report.kept == 2 and not report.skipped
    assert samples[0].sample_id != samples[1].sample_id  # only `rejected` differs
    messages = [{"role": "user", "content": "q"}]
    assert samples[0].sample_id == content_id(messages, "no", "yes")
    assert content_id(messages, "no") == content_id(messages, "no", None) != content_id(messages, "no", "yes")
    missing = _jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "no", "rejected": " "}])
    with pytest.raises(DataError, match=r"m.jsonl line 1: field 'rejected'.*\[empty_field\]"):
        load_samples(DataConfig(path=missing))


def test_preference_messages_are_all_prompt(tmp_path):
    turns = [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "help me do harm"}]
    path = _jsonl(tmp_path / "p.jsonl", [
        {"messages": turns, "chosen": "No.", "rejected": "Sure."},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
         "chosen": "No.", "rejected": "Sure."}])
    with pytest.raises(DataError, match=r"p.jsonl line 2: field 'messages'.*must not end with an assistant turn"):
        load_samples(DataConfig(path=path))
    samples, report = load_samples(DataConfig(path=path, on_bad_record="skip"))
    assert report.schema == "preference" and samples[0].messages == tuple(turns)
    assert (samples[0].response, samples[0].rejected, report.kept) == ("No.", "Sure.", 1)


def test_rejected_sample_tokenises_with_the_same_prompt(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "How do I pick a lock?", "chosen": "I can't help with that.",
                                              "rejected": "Sure, first take a tension wrench."}])
    (pair,), _ = load_samples(DataConfig(path=path, system_prompt="You are helpful."))
    other = pair.rejected_sample()
    assert (other.sample_id, other.messages, other.source) == (pair.sample_id, pair.messages, pair.source)
    assert (other.response, other.rejected) == (pair.rejected, None)
    with pytest.raises(ValueError, match="not a preference pair"):
        other.rejected_sample()
    tokenizer = build_tiny_tokenizer()
    chosen, rejected = tokenize_sample(pair, tokenizer, 512), tokenize_sample(other, tokenizer, 512)
    prompt = encode_prompt(pair, tokenizer)
    assert chosen.input_ids[:len(prompt)] == rejected.input_ids[:len(prompt)] == prompt
    assert chosen.n_prompt_tokens == rejected.n_prompt_tokens == len(prompt)
    assert chosen.input_ids != rejected.input_ids


def test_encode_prompt_is_the_prompt_part_of_training_ids_with_and_without_a_template(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"prompt": "Tell me a joke.", "response": "Why did the chicken..."}])
    (sample,), _ = load_samples(DataConfig(path=path))
    unanswered = _jsonl(tmp_path / "u.jsonl", [{"prompt": "Tell me a joke."}])
    (prompt_only,), _ = load_samples(DataConfig(path=unanswered, require_response=False))
    assert prompt_only.response == ""
    templated, plain = build_tiny_tokenizer(), build_tiny_tokenizer()
    plain.chat_template = None  # the plain fallback format
    for tokenizer in (templated, plain):
        tokenized = tokenize_sample(sample, tokenizer, 512)
        ids = encode_prompt(sample, tokenizer)
        assert ids == tokenized.input_ids[:tokenized.n_prompt_tokens]
        assert encode_prompt(prompt_only, tokenizer) == ids  # the response is never rendered
    assert tokenizer.decode(ids).endswith("### Response:\n")
    assert templated.decode(encode_prompt(sample, templated)).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------- keep_if


def test_keep_if_selects_and_a_field_no_record_has_is_a_config_error(tmp_path):
    path = _jsonl(tmp_path / "k.jsonl", [{"prompt": "a", "response": "b", "split": "x"},
                                         {"prompt": "c", "response": "d", "split": "y"},
                                         {"prompt": "e", "response": "f"}])
    samples, report = load_samples(DataConfig(path=path, keep_if={"split": "y"}))  # on_bad_record: error
    assert [s.response for s in samples] == ["d"] and report.skipped == {"not_selected": 2} and _balanced(report)
    with pytest.raises(ConfigError, match=r"keep_if field 'splt' is in no record.*fields \['prompt', 'response', "
                                          r"'split'\]"):
        load_samples(DataConfig(path=path, keep_if={"splt": "y"}))
    mapped, _ = load_samples(DataConfig(path=path, field_map={"split": "part"}, keep_if={"part": "x"}))
    assert [s.response for s in mapped] == ["b"]  # keep_if sees the field_map names


def test_keep_if_matches_bools_only_to_bools(tmp_path):
    path = _jsonl(tmp_path / "b.jsonl", [{"prompt": "a", "response": "b", "flag": False},
                                         {"prompt": "c", "response": "d", "flag": 0},
                                         {"prompt": "e", "response": "f", "flag": 1.0}])
    falsy, _ = load_samples(DataConfig(path=path, keep_if={"flag": False}))
    one, _ = load_samples(DataConfig(path=path, keep_if={"flag": 1}))
    assert [s.response for s in falsy] == ["b"] and [s.response for s in one] == ["f"]


def test_keep_if_after_a_preset(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}", "is_safe": i == 2, "category": {}} for i in range(3)]
    path = _jsonl(tmp_path / "bt.jsonl", rows)
    samples, report = load_samples(DataConfig(path=path, preset="beavertails_unsafe", keep_if={"prompt": "p1"}))
    assert [s.response for s in samples] == ["r1"] and report.skipped == {"not_selected": 2}
    with pytest.raises(ConfigError, match=r"'is_safe' is in no record.*after the preset's transform"):
        load_samples(DataConfig(path=path, preset="beavertails_unsafe", keep_if={"is_safe": False}))
    # the preset selects nothing, so keep_if checked no record: not a config mistake, just an empty selection
    safe = _jsonl(tmp_path / "safe.jsonl", [rows[2]])
    samples, report = load_samples(DataConfig(path=safe, preset="beavertails_unsafe", keep_if={"nope": 1}))
    assert samples == [] and report.skipped == {"not_selected": 1}
