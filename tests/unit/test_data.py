"""Tests for sqsd_ray.data (records, tokenize): reading, normalising, bad records, tokenisation, collation, batching."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import pytest
import torch

from sqsd_ray.config import ConfigError, from_dict
from sqsd_ray.data import tokenize as tokenize_module
from sqsd_ray.data.location import DataError
from sqsd_ray.data.records import DataConfig, DataReport, Sample, content_id, load_samples
from sqsd_ray.data.tokenize import (
    ChatTemplateError,
    TokenizedSample,
    collate,
    length_sorted_batches,
    render_prompt_and_response,
    tokenize_sample,
    tokenize_samples,
)
from sqsd_ray.models.tiny import build_tiny_tokenizer

REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benign"
needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"{REAL_DATA} not present")

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
DOLLY = {
    "instruction": "Who wrote it?", "context": "It was written by Ann.", "response": "Ann.", "category": "closed_qa",
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write_lines(path: Path, lines: list) -> Path:
    """One line per item: dicts/lists as JSON, strings verbatim (so malformed lines can be written)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def load(path: Path, **kwargs) -> tuple[list[Sample], DataReport]:
    return load_samples(DataConfig(path=str(path), **kwargs))


def assert_consistent(report: DataReport) -> None:
    assert report.records_read == report.kept + report.n_skipped


# ---------------------------------------------------------------------------------------------- config


def test_config_from_dict_and_validation():
    cfg = from_dict(DataConfig, {"path": "x.jsonl", "field_map": {"question": "prompt"}, "on_duplicate": "error"})
    assert cfg.field_map == {"question": "prompt"} and cfg.on_duplicate == "error"
    with pytest.raises(ConfigError, match="on_overlong"):
        from_dict(DataConfig, {"on_overlong": "drop"})
    with pytest.raises(ConfigError, match="schema"):
        DataConfig(schema="sharegpt")  # direct construction is checked too
    with pytest.raises(ConfigError, match="max_length"):
        DataConfig(max_length=1)
    with pytest.raises(ConfigError, match="limit"):
        DataConfig(limit=0)
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))
    assert DataConfig().on_duplicate == "skip" and DataConfig().on_bad_record == "error"


# ---------------------------------------------------------------------------------------------- schemas


def test_alpaca_normalisation(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [ALPACA, {"instruction": "Say hi.", "input": "", "output": "hi"}])
    samples, report = load(path)
    assert report.schema == "alpaca"
    assert samples[0].messages == ({"role": "user", "content": "Add the numbers.\n\n2 and 3"},)
    assert samples[0].response == "5"
    assert samples[1].messages == ({"role": "user", "content": "Say hi."},)  # empty input adds nothing
    assert samples[1].source == "a.jsonl:2"
    assert samples[1].meta == {"record_index": 1}


def test_dolly_normalisation(tmp_path):
    blank_context = {"instruction": "Name a fruit.", "context": "  ", "response": "Apple"}
    path = write_lines(tmp_path / "d.jsonl", [DOLLY, blank_context])
    samples, report = load(path)
    assert report.schema == "dolly"
    assert samples[0].messages == ({"role": "user", "content": "Who wrote it?\n\nIt was written by Ann."},)
    assert samples[0].response == "Ann."
    assert samples[0].meta == {"category": "closed_qa", "record_index": 0}
    assert samples[1].messages[0]["content"] == "Name a fruit."  # blank context adds nothing


def test_messages_normalisation(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "weight": 1},
    ]
    samples, report = load(write_lines(tmp_path / "m.jsonl", [{"messages": turns}]))
    assert report.schema == "messages"
    assert samples[0].messages == tuple({"role": t["role"], "content": t["content"]} for t in turns[:4])
    assert samples[0].response == "4"
    assert samples[0].conversation()[-1] == {"role": "assistant", "content": "4"}


def test_prompt_response_normalisation(tmp_path):
    samples, report = load(write_lines(tmp_path / "p.jsonl", [{"prompt": "Q?", "response": "A.", "tag": 3}]))
    assert report.schema == "prompt_response"
    assert samples[0].messages == ({"role": "user", "content": "Q?"},) and samples[0].response == "A."
    assert samples[0].meta == {"tag": 3, "record_index": 0}


def test_text_is_kept_verbatim(tmp_path):
    samples, _ = load(write_lines(tmp_path / "p.jsonl", [{"prompt": "  Q?\n", "response": " A. \n"}]))
    assert samples[0].messages[0]["content"] == "  Q?\n" and samples[0].response == " A. \n"


def test_explicit_schema_overrides_detection(tmp_path):
    # instruction + response + output: auto picks alpaca (output), schema: dolly reads the response field
    both = {"instruction": "I", "output": "from output", "response": "from response"}
    path = write_lines(tmp_path / "x.jsonl", [both])
    assert load(path)[0][0].response == "from output"
    samples, report = load(path, schema="dolly")
    assert samples[0].response == "from response" and report.schema == "dolly"


def test_detection_failure_names_file_and_keys(tmp_path):
    path = write_lines(tmp_path / "weird.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(DataError, match=r"weird\.jsonl.*\['answer', 'question'\]") as err:
        load(path, on_bad_record="skip")  # file-level: not skippable
    assert err.value.reason == "schema_detection"


def test_field_map_renames_before_detection(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A.", "uid": 7}])
    samples, report = load(path, field_map={"question": "prompt", "answer": "response", "uid": "id"})
    assert report.schema == "prompt_response"
    assert samples[0].messages[0]["content"] == "Q?" and samples[0].response == "A."
    assert samples[0].sample_id == "7"


def test_system_prompt_prepended_unless_record_has_one(tmp_path):
    samples, _ = load(write_lines(tmp_path / "p.jsonl", [{"prompt": "Q?", "response": "A."}]), system_prompt="Be safe.")
    assert samples[0].messages == ({"role": "system", "content": "Be safe."}, {"role": "user", "content": "Q?"})
    own = [
        {"role": "system", "content": "Own."},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    samples, _ = load(write_lines(tmp_path / "m.jsonl", [{"messages": own}]), system_prompt="Be safe.")
    assert samples[0].messages == tuple(own[:2])  # the record's own system turn is kept, not doubled


def test_prompt_only_records_when_response_not_required(tmp_path):
    records = [{"instruction": "Do X.", "category": None}, {"instruction": "Y", "output": " "}]
    path = write_lines(tmp_path / "i.jsonl", records)
    samples, report = load(path, require_response=False)
    assert report.schema == "alpaca" and [s.response for s in samples] == ["", ""]
    assert samples[0].messages == ({"role": "user", "content": "Do X."},) and samples[0].meta["category"] is None
    with pytest.raises(DataError, match=r"i\.jsonl line 1: field 'output': required field is missing"):
        load(path)
    chat = write_lines(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    samples, _ = load(chat, require_response=False)
    assert samples[0].messages == ({"role": "user", "content": "Hi"},) and samples[0].response == ""


# ---------------------------------------------------------------------------------------------- sample ids


def test_content_id_is_pinned_and_schema_independent(tmp_path):
    # a literal value: ids must not change between runs or versions, or scores stop joining to rows
    assert content_id([{"role": "user", "content": "What is 2+2?"}], "4") == "h-bd651630e4784c35"
    a, _ = load(write_lines(tmp_path / "a.jsonl", [{"instruction": "What is 2+2?", "input": "", "output": "4"}]))
    p, _ = load(write_lines(tmp_path / "p.jsonl", [{"prompt": "What is 2+2?", "response": "4"}]))
    assert a[0].sample_id == p[0].sample_id == "h-bd651630e4784c35"


def test_sample_ids_independent_of_order_and_format(tmp_path):
    records = [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(5)]
    forward, _ = load(write_lines(tmp_path / "f.jsonl", records))
    backward, _ = load(write_lines(tmp_path / "b.jsonl", records[::-1]))
    (tmp_path / "f.json").write_text(json.dumps(records))
    as_json, _ = load(tmp_path / "f.json")
    by_content = {(s.messages[0]["content"], s.response): s.sample_id for s in forward}
    assert by_content == {(s.messages[0]["content"], s.response): s.sample_id for s in backward}
    assert [s.sample_id for s in forward] == [s.sample_id for s in as_json]
    assert len(set(by_content.values())) == 5


def test_content_id_ignores_config_system_prompt(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "Q", "response": "A"}])
    plain, _ = load(path)
    with_system, _ = load(path, system_prompt="Be safe.")
    assert plain[0].sample_id == with_system[0].sample_id
    assert with_system[0].messages[0]["role"] == "system"


def test_given_ids_are_respected(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        {"id": 12, "prompt": "Q", "response": "A"},
        {"id": "row-b", "prompt": "Q2", "response": "A2"},
        {"prompt": "Q3", "response": "A3"},
    ])
    samples, _ = load(path)
    assert [s.sample_id for s in samples[:2]] == ["12", "row-b"]
    assert samples[2].sample_id.startswith("h-") and len(samples[2].sample_id) == 18
    assert "id" not in samples[0].meta
    custom, _ = load(path, id_field="nope")
    assert all(s.sample_id.startswith("h-") for s in custom)


def test_samples_are_hashable_and_frozen(tmp_path):
    samples, _ = load(write_lines(tmp_path / "p.jsonl", [{"prompt": "Q", "response": "A"}]))
    assert len({samples[0], samples[0]}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        samples[0].response = "B"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- bad records

GOOD = {"prompt": "Q", "response": "A"}
MSG_OK = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

# (case id, bad record as a JSONL line, reason, field named in the error or None)
BAD_JSONL_LINES = [
    ("malformed_json", '{"prompt": "Q", "response": ', "malformed_json", None),
    ("not_an_object", "[1, 2, 3]", "not_an_object", None),
    ("missing_field", {"prompt": "Q"}, "missing_field", "response"),
    ("null_field", {"prompt": None, "response": "A"}, "missing_field", "prompt"),
    ("empty_field", {"prompt": "Q", "response": "  \n\t"}, "empty_field", "response"),
    ("number_not_string", {"prompt": "Q", "response": 42}, "wrong_type", "response"),
    ("list_not_string", {"prompt": ["Q"], "response": "A"}, "wrong_type", "prompt"),
    ("id_wrong_type", {"id": [1], "prompt": "Q", "response": "A"}, "wrong_type", "id"),
    ("id_empty", {"id": " ", "prompt": "Q", "response": "A"}, "empty_field", "id"),
]


def _bad_file(tmp_path: Path, bad) -> Path:
    # the bad record is on line 3, after a blank line: blank lines are not records but do count as lines
    return write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad, {"prompt": "Q2", "response": "A2"}])


@pytest.mark.parametrize("case,bad,reason,field", BAD_JSONL_LINES, ids=[c[0] for c in BAD_JSONL_LINES])
def test_bad_jsonl_record_errors_name_file_line_field(tmp_path, case, bad, reason, field):
    with pytest.raises(DataError) as err:
        load(_bad_file(tmp_path, bad))
    message = str(err.value)
    assert "bad.jsonl line 3" in message
    assert err.value.reason == reason and f"[{reason}]" in message
    assert err.value.field == field
    if field is not None:
        assert f"field {field!r}" in message


@pytest.mark.parametrize("case,bad,reason,field", BAD_JSONL_LINES, ids=[c[0] for c in BAD_JSONL_LINES])
def test_bad_jsonl_record_skips_are_counted(tmp_path, case, bad, reason, field):
    samples, report = load(_bad_file(tmp_path, bad), on_bad_record="skip")
    assert [s.response for s in samples] == ["A", "A2"]
    assert report.records_read == 3 and report.kept == 2 and report.skipped == {reason: 1}
    assert len(report.examples[reason]) == 1 and "bad.jsonl line 3" in report.examples[reason][0]
    assert reason in report.summary() and "bad.jsonl line 3" in report.summary()
    assert_consistent(report)


def test_invalid_utf8_line_is_one_bad_record(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe", "response": "A"}\n')
    with pytest.raises(DataError, match=r"bytes\.jsonl line 2: not valid UTF-8"):
        load(path)
    samples, report = load(path, on_bad_record="skip")
    assert len(samples) == 1 and report.skipped == {"malformed_json": 1}


# (case id, bad messages value, reason, field)
BAD_MESSAGES = [
    ("content_not_string", [{"role": "user", "content": 3}, MSG_OK[1]], "wrong_type", "messages[0].content"),
    ("unknown_role", [{"role": "human", "content": "Hi"}, MSG_OK[1]], "unknown_role", "messages[0].role"),
    ("missing_role", [{"content": "Hi"}, MSG_OK[1]], "missing_field", "messages[0].role"),
    ("missing_content", [MSG_OK[0], {"role": "assistant"}], "missing_field", "messages[1].content"),
    ("empty_response", [MSG_OK[0], {"role": "assistant", "content": ""}], "empty_field", "messages[1].content"),
    ("turn_not_object", ["Hi", MSG_OK[1]], "wrong_type", "messages[0]"),
    ("messages_not_list", "Hi", "wrong_type", "messages"),
    ("no_assistant_turn", [MSG_OK[0]], "no_final_assistant_turn", "messages"),
    ("trailing_user_turn", [*MSG_OK, {"role": "user", "content": "More?"}], "no_final_assistant_turn", "messages"),
    ("no_prompt_turns", [MSG_OK[1]], "no_prompt_turns", "messages"),
]


@pytest.mark.parametrize("case,messages,reason,field", BAD_MESSAGES, ids=[c[0] for c in BAD_MESSAGES])
def test_bad_messages_records(tmp_path, case, messages, reason, field):
    path = write_lines(tmp_path / "chat.jsonl", [{"messages": MSG_OK}, {"messages": messages}])
    with pytest.raises(DataError) as err:
        load(path)
    assert "chat.jsonl line 2" in str(err.value) and f"field {field!r}" in str(err.value)
    assert err.value.reason == reason
    samples, report = load(path, on_bad_record="skip")
    assert len(samples) == 1 and report.skipped == {reason: 1}
    assert_consistent(report)


def test_field_map_conflict_is_a_bad_record(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [
        {"question": "Q", "response": "A"},
        {"question": "Q2", "prompt": "P2", "response": "A2"},
    ])
    with pytest.raises(DataError, match=r"qa\.jsonl line 2: field 'prompt': field_map renames 'question'"):
        load(path, field_map={"question": "prompt"})
    samples, report = load(path, field_map={"question": "prompt"}, on_bad_record="skip")
    assert len(samples) == 1 and report.skipped == {"field_map_conflict": 1}


def test_json_file_errors_name_record_index(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([ALPACA, {"instruction": "I", "input": "", "output": 7}, "not a record"]))
    with pytest.raises(DataError, match=r"list\.json record index 1 \(0-based\): field 'output': expected a string"):
        load(path)
    samples, report = load(path, on_bad_record="skip")
    assert len(samples) == 1 and report.skipped == {"wrong_type": 1, "not_an_object": 1}
    assert any("list.json record index 2" in e for e in report.examples["not_an_object"])


def test_json_data_wrapper_and_bad_top_level(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [ALPACA]}))
    samples, _ = load(wrapped)
    assert samples[0].source == "wrapped.json[0]"
    scalar = tmp_path / "scalar.json"
    scalar.write_text(json.dumps({"rows": [ALPACA]}))
    with pytest.raises(DataError, match=r"scalar\.json: expected a JSON list.*\['rows'\]"):
        load(scalar)


def test_json_file_holding_jsonl_suggests_format(tmp_path):
    path = write_lines(tmp_path / "actually_lines.json", [ALPACA, ALPACA])
    with pytest.raises(DataError, match=r"actually_lines\.json: not valid JSON.*set data\.format: jsonl"):
        load(path)
    samples, report = load(path, format="jsonl")  # identical lines: the second is a duplicate
    assert len(samples) == 1 and report.skipped == {"duplicate": 1}


def test_csv_reading_and_line_numbers(tmp_path):
    path = tmp_path / "rows.csv"
    # row 1 spans lines 2-3 (quoted newline); row 2 (line 4) has an extra cell; row 3 (line 5) an empty response
    path.write_text('prompt,response\n"Q1\nmore",A1\nQ2,A2,extra\nQ3,\nQ4,A4\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.csv line 4: row has 3 cells but the header has 2"):
        load(path)
    samples, report = load(path, on_bad_record="skip")
    assert [s.source for s in samples] == ["rows.csv:2", "rows.csv:6"]
    assert samples[0].messages[0]["content"] == "Q1\nmore"
    assert report.skipped == {"malformed_csv": 1, "empty_field": 1}
    assert any("rows.csv line 5: field 'response'" in e for e in report.examples["empty_field"])


def test_parquet_reading_and_record_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([DOLLY, {**DOLLY, "instruction": "Q2", "response": None}]), path)
    expected = r"rows\.parquet record index 1 \(0-based\): field 'response': required field is null"
    with pytest.raises(DataError, match=expected):
        load(path)
    samples, report = load(path, on_bad_record="skip")
    assert samples[0].source == "rows.parquet[0]" and samples[0].meta["category"] == "closed_qa"
    assert report.format == "parquet" and report.skipped == {"missing_field": 1}


def test_hf_format_reads_local_dataset_dir(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    dataset_dir = tmp_path / "my_dataset"
    dataset_dir.mkdir()
    write_lines(dataset_dir / "train.jsonl", [{"prompt": "Q", "response": "A"}, {"prompt": "Q2", "response": 5}])
    with pytest.raises(DataError, match=r"record index 1 \(0-based\): field 'response'"):
        load(dataset_dir, format="hf")
    samples, report = load(dataset_dir, format="hf", on_bad_record="skip")
    assert [s.response for s in samples] == ["A"] and report.skipped == {"wrong_type": 1}
    assert samples[0].source == f"{dataset_dir}/train[0]"
    with pytest.raises(DataError, match="could not load HF dataset.*validation"):
        load(dataset_dir, format="hf", hf_split="validation")


def test_format_resolution_errors(tmp_path):
    with pytest.raises(ConfigError, match="format: hf"):
        load(tmp_path / "org_name_dataset")  # neither a file nor a known suffix
    odd = tmp_path / "rows.txt"
    odd.write_text("x")
    with pytest.raises(ConfigError, match=r"rows\.txt.*'\.txt'"):
        load(odd)
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist"):
        load(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="data.path is empty"):
        load_samples(DataConfig())


# ---------------------------------------------------------------------------------------------- duplicates


def test_identical_duplicates_skipped_by_default(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [GOOD, {"prompt": "Q2", "response": "A2"}, GOOD, GOOD])
    samples, report = load(path)
    assert len(samples) == 2 and report.skipped == {"duplicate": 2} and report.records_read == 4
    assert "dup.jsonl line 3: duplicate of dup.jsonl:1" in report.examples["duplicate"][0]
    assert_consistent(report)


def test_duplicate_error_names_both_places(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [GOOD, GOOD])
    with pytest.raises(DataError, match=r"dup\.jsonl line 2: duplicate of dup\.jsonl:1") as err:
        load(path, on_duplicate="error", on_bad_record="skip")  # on_duplicate governs, not on_bad_record
    assert err.value.reason == "duplicate"


def test_reused_id_with_different_content(tmp_path):
    path = write_lines(tmp_path / "ids.jsonl", [{"id": 1, **GOOD}, {"id": 1, "prompt": "Other", "response": "B"}])
    # skip (default): an id reused for different content is a data bug, handled as a bad record
    expected = r"ids\.jsonl line 2: field 'id': sample_id '1' was already used by ids\.jsonl:1"
    with pytest.raises(DataError, match=expected):
        load(path)
    samples, report = load(path, on_bad_record="skip")
    assert [s.response for s in samples] == ["A"] and report.skipped == {"duplicate_id_conflict": 1}
    # keep_first: the first wins, the repeat is counted as a duplicate
    samples, report = load(path, on_duplicate="keep_first")
    assert [s.response for s in samples] == ["A"] and report.skipped == {"duplicate": 1}
    assert "different content; the first is kept" in report.examples["duplicate"][0]


# ---------------------------------------------------------------------------------------------- limit / report


def test_limit_counts_valid_records_and_stops_reading(tmp_path):
    records = ['{"broken', *({"prompt": f"Q{i}", "response": "A"} for i in range(5))]
    samples, report = load(write_lines(tmp_path / "many.jsonl", records), limit=2, on_bad_record="skip")
    assert [s.messages[0]["content"] for s in samples] == ["Q0", "Q1"]
    assert report.records_read == 3 and report.skipped == {"malformed_json": 1}


def test_report_keeps_first_examples_and_serialises(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [GOOD] + ["{bad"] * 5)
    _, report = load(path, on_bad_record="skip")
    assert report.skipped == {"malformed_json": 5}
    assert len(report.examples["malformed_json"]) == DataReport.max_examples
    as_dict = report.to_dict()
    assert as_dict["n_skipped"] == 5 and as_dict["kept"] == 1 and as_dict["records_read"] == 6
    json.dumps(as_dict)
    summary = report.summary()
    assert "records read: 6" in summary and "malformed_json: 5" in summary and "r.jsonl line 2" in summary


# ---------------------------------------------------------------------------------------------- tokenisation


def _sample(messages, response, sample_id="s1") -> Sample:
    return Sample(sample_id=sample_id, messages=tuple(messages), response=response, source="t.jsonl:1")


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Ünïcode ✓ and\nnewlines?"},
]


@pytest.mark.parametrize(
    "messages", [[{"role": "user", "content": "What is 2+2?"}], MULTI_TURN], ids=["single", "multi"]
)
def test_labels_mask_exactly_the_prompt(tokenizer, messages):
    sample = _sample(messages, "It is 4.\nDone ✓")
    tokenized = tokenize_sample(sample, tokenizer, max_length=4096)
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert tokenized.n_prompt_tokens == n_prompt
    assert tokenized.labels[:n_prompt] == [-100] * n_prompt
    supervised = tokenized.labels[n_prompt:]
    assert -100 not in supervised and supervised == tokenized.input_ids[n_prompt:]
    assert tokenized.n_response_tokens == len(supervised)
    assert tokenizer.decode(tokenized.input_ids[:n_prompt]) == prompt_text
    # the response is supervised through the end-of-turn token; the template's newline after it is not
    assert tokenizer.decode(supervised) == sample.response + "<|im_end|>"
    assert supervised[-1] == tokenizer.eos_token_id
    assert not tokenized.truncated and len(tokenized) == len(tokenized.input_ids)


def test_truncation_cuts_response_tail(tokenizer):
    sample = _sample([{"role": "user", "content": "Q"}], "A long answer that will not fit.")
    full = tokenize_sample(sample, tokenizer, max_length=4096)
    cut = tokenize_sample(sample, tokenizer, max_length=full.n_prompt_tokens + 5)
    assert cut.truncated and len(cut.input_ids) == full.n_prompt_tokens + 5 and cut.n_response_tokens == 5
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)] and cut.labels == full.labels[: len(cut.labels)]
    with pytest.raises(DataError, match="prompt_too_long"):
        tokenize_sample(sample, tokenizer, max_length=full.n_prompt_tokens)


def _overlong_samples(tokenizer):
    short = _sample([{"role": "user", "content": "Q"}], "A", "short")
    n_short = len(tokenize_sample(short, tokenizer, 4096).input_ids)
    long = _sample([{"role": "user", "content": "Q"}], "A" * 50, "long")
    huge_prompt = _sample([{"role": "user", "content": "Q" * 100}], "A", "huge")
    return [short, long, huge_prompt], n_short


def test_tokenize_samples_truncate_policy(tokenizer):
    samples, n_short = _overlong_samples(tokenizer)
    report = DataReport(records_read=3, kept=3)
    out = tokenize_samples(samples, tokenizer, DataConfig(max_length=n_short + 10), report)
    assert [t.sample_id for t in out] == ["short", "long"] and out[1].truncated
    assert report.truncated == 1 and report.skipped == {"prompt_too_long": 1} and report.kept == 2
    assert "sample huge (t.jsonl:1): field 'prompt'" in report.examples["prompt_too_long"][0]
    assert_consistent(report)


def test_tokenize_samples_skip_policy(tokenizer):
    samples, n_short = _overlong_samples(tokenizer)
    report = DataReport(records_read=3, kept=3)
    out = tokenize_samples(samples, tokenizer, DataConfig(max_length=n_short + 10, on_overlong="skip"), report)
    assert [t.sample_id for t in out] == ["short"]
    assert report.skipped == {"overlong": 1, "prompt_too_long": 1} and report.truncated == 0
    assert_consistent(report)


def test_tokenize_samples_error_policy(tokenizer):
    samples, n_short = _overlong_samples(tokenizer)
    cfg = DataConfig(max_length=n_short + 10, on_overlong="error")
    with pytest.raises(DataError, match=r"sample long \(t\.jsonl:1\): field 'response': .* exceed max_length") as err:
        tokenize_samples(samples[:2], tokenizer, cfg, DataReport())
    assert err.value.reason == "overlong"
    with pytest.raises(DataError, match="prompt_too_long"):
        tokenize_samples(samples[2:], tokenizer, cfg, DataReport())


def test_fallback_format_without_chat_template(caplog, monkeypatch):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    monkeypatch.setattr(tokenize_module, "_warned_no_template", False)
    sample = _sample(MULTI_TURN, "Yes.")
    with caplog.at_level(logging.WARNING, logger="sqsd_ray.data.tokenize"):
        prompt_text, response_text = render_prompt_and_response(sample, tokenizer)
        render_prompt_and_response(sample, tokenizer)
    assert sum("no chat template" in r.message for r in caplog.records) == 1  # warned once
    assert prompt_text == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello<|im_end|>\n\n"
        "### Instruction:\nÜnïcode ✓ and\nnewlines?\n\n### Response:\n"
    )
    assert response_text == "Yes.<|im_end|>"
    tokenized = tokenize_sample(sample, tokenizer, 4096)
    assert tokenizer.decode([t for t in tokenized.labels if t != -100]) == response_text


def test_template_without_prefix_property_is_rejected():
    tokenizer = build_tiny_tokenizer()
    # generation prompt says "assistant" but the rendered assistant turn says "model": no exact boundary
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' "
        "+ m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match=r"does not render the prompt.*'assistant\\n' vs full 'model"):
        render_prompt_and_response(_sample([{"role": "user", "content": "Q"}], "A"), tokenizer)


# ---------------------------------------------------------------------------------------------- collate / batching


def _tokenized(sample_id: str, n_prompt: int, n_response: int) -> TokenizedSample:
    ids = list(range(1, n_prompt + n_response + 1))
    return TokenizedSample(sample_id, ids, [-100] * n_prompt + ids[n_prompt:], n_prompt, n_response, False)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads(side):
    batch = [_tokenized("a", 2, 1), _tokenized("b", 2, 3)]
    out = collate(batch, pad_token_id=0, padding_side=side)
    assert out["sample_ids"] == ["a", "b"]
    assert out["input_ids"].shape == (2, 5) and out["input_ids"].dtype == torch.long
    if side == "right":
        assert out["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
        assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
        assert out["labels"][0].tolist() == [-100, -100, 3, -100, -100]
    else:
        assert out["input_ids"][0].tolist() == [0, 0, 1, 2, 3]
        assert out["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]
        assert out["labels"][0].tolist() == [-100, -100, -100, -100, 3]
    assert out["input_ids"][1].tolist() == [1, 2, 3, 4, 5] and out["labels"][1].tolist() == [-100, -100, 3, 4, 5]
    with pytest.raises(ValueError, match="pad token"):
        collate(batch, pad_token_id=None)


def test_collate_real_tokenizer_batch(tokenizer):
    samples = [_sample([{"role": "user", "content": "Q" * n}], "A", f"s{n}") for n in (1, 7)]
    tokenized = [tokenize_sample(s, tokenizer, 4096) for s in samples]
    out = collate(tokenized, tokenizer.pad_token_id, "left")
    assert (out["input_ids"][0, :6] == tokenizer.pad_token_id).all()
    assert int((out["labels"] != -100).sum()) == sum(t.n_response_tokens for t in tokenized)


def test_length_sorted_batches_known_case():
    lengths = [3, 10, 5, 5, 1, 30]
    # 30 > max_tokens: alone; then [10] (10*2=20 > 16); then 5,5,3 -> 15 <= 16; then 1
    assert length_sorted_batches(lengths, max_batch_size=4, max_tokens=16) == [[5], [1], [2, 3, 0], [4]]
    assert length_sorted_batches(lengths, max_batch_size=2, max_tokens=1000) == [[5, 1], [2, 3], [0, 4]]


def test_length_sorted_batches_respects_budgets():
    rng = random.Random(0)
    samples = [_tokenized(str(i), 1, rng.randint(0, 60)) for i in range(200)]
    batches = length_sorted_batches(samples, max_batch_size=8, max_tokens=128)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for batch in batches:
        widths = [len(samples[i]) for i in batch]
        assert len(batch) <= 8
        assert max(widths) * len(batch) <= 128 or len(batch) == 1
    with pytest.raises(ValueError):
        length_sorted_batches(samples, max_batch_size=0, max_tokens=10)


# ---------------------------------------------------------------------------------------------- real data


@needs_real_data
def test_real_alpaca_loads_cleanly(tokenizer):
    samples, report = load(REAL_DATA / "alpaca_1904.json")
    assert len(samples) == report.kept == report.records_read == 1904 and report.n_skipped == 0
    assert report.schema == "alpaca" and len({s.sample_id for s in samples}) == 1904
    with_input = sum("\n\n" in s.messages[0]["content"] for s in samples)
    assert with_input >= 451  # 451 records have a non-empty input (some instructions contain blank lines too)
    tokenized = tokenize_samples(samples[:20], tokenizer, DataConfig(max_length=4096), report)
    assert len(tokenized) == 20


@needs_real_data
def test_real_dolly_loads_with_one_duplicate():
    samples, report = load(REAL_DATA / "dolly_387.jsonl")
    assert report.schema == "dolly" and report.records_read == 387
    # lines 60 and 233 are the same record ("Who is LBJ?"); the repeat is skipped and reported
    assert report.kept == len(samples) == 386 and report.skipped == {"duplicate": 1}
    assert "dolly_387.jsonl line 233: duplicate of dolly_387.jsonl:60" in report.examples["duplicate"][0]
    assert sum(bool(s.meta["category"]) for s in samples) == 386
    samples, report = load(REAL_DATA / "dolly_387.jsonl", on_duplicate="keep_first")
    assert len(samples) == 386
    with pytest.raises(DataError, match="line 233"):
        load(REAL_DATA / "dolly_387.jsonl", on_duplicate="error")


@needs_real_data
def test_real_instruction_only_file():
    with pytest.raises(DataError, match=r"alpaca_instructions_31k\.json record index 0 \(0-based\): field 'output'"):
        load(REAL_DATA / "alpaca_instructions_31k.json")
    samples, report = load(REAL_DATA / "alpaca_instructions_31k.json", require_response=False, limit=1000)
    assert len(samples) == 1000 and report.n_skipped == 0
    assert all(s.response == "" for s in samples) and samples[0].meta == {"category": None, "record_index": 0}
