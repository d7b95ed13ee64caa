"""``curate``: the right ids removed or down-weighted, the corpus written back in its own format with kept records
unchanged, the manifest and the length / source comparison exact, unscored records kept and counted, and every
bad input named; plus the data layer's per-sample loss weights."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pandas as pd
import pytest

from sqsd_ray.cli import main
from sqsd_ray.config import ConfigError
from sqsd_ray.data.location import DataError
from sqsd_ray.data.records import DataConfig, DataReport, load_samples
from sqsd_ray.data.tokenize import tokenize_samples
from sqsd_ray.mitigation.curate import CurateConfig, CurateOutput, ReweightSettings, rank_weights, run_curate
from sqsd_ray.models.tiny import build_tiny_tokenizer
from sqsd_ray.scoring.store import ScoreStore

N = 20
UNSCORED = (18, 19)  # records without a score row
NOT_USABLE = 17  # a score row with status nonfinite
FORMATS = ("jsonl", "json", "csv", "parquet")
SUFFIX = {"jsonl": ".jsonl", "json": ".json", "csv": ".csv", "parquet": ".parquet"}


def _records(n: int = N) -> list[dict]:
    """Dolly records; record i has a response of 5 + i characters, category a (odd) / b (even)."""
    return [{"instruction": f"question {i}", "context": "", "response": "r" * (5 + i),
             "category": "a" if i % 2 else "b"} for i in range(n)]


def _score_of(i: int) -> float:
    return float((i * 7) % N)  # a permutation of 0..19: not in record order, not in length order


def _write_corpus(path, records: list[dict], fmt: str):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=2))
    elif fmt == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        pd.DataFrame(records).to_parquet(path, index=False)
    return path


def _write_scores(tmp_path, ids: list[str], extra_rows: int = 2):
    """scores.parquet written the scorer's way (ScoreStore parts -> consolidate, with its metadata)."""
    rows = []
    for i, sid in enumerate(ids):
        if i in UNSCORED:
            continue
        ok = i != NOT_USABLE
        rows.append({"sample_id": sid, "sqsd": _score_of(i) if ok else np.nan, "sqsd_raw": -_score_of(i),
                     "n_response_tokens": 6 + i, "n_prompt_tokens": 12, "n_tokens": 18 + i,
                     "status": "ok" if ok else "nonfinite"})
    rows += [{"sample_id": f"ghost-{j}", "sqsd": 1.0, "sqsd_raw": 1.0, "n_response_tokens": 3, "n_prompt_tokens": 3,
              "n_tokens": 6, "status": "ok"} for j in range(extra_rows)]
    store = ScoreStore(tmp_path / "score_run")
    store.begin({"config": {"data": "test"}}, {r["sample_id"]: "fp" for r in rows}, overwrite=True, resume=False)
    store.write_part(pd.DataFrame(rows))
    store.consolidate({"sqsd_ray_version": "test", "fingerprints": {"config": "abc123"}})
    return store.final_path


@pytest.fixture
def corpus_factory(tmp_path):
    def make(fmt: str, records: list[dict] | None = None):
        path = _write_corpus(tmp_path / f"corpus{SUFFIX[fmt]}", records or _records(), fmt)
        samples, _ = load_samples(DataConfig(path=str(path)))
        return path, [s.sample_id for s in samples]
    return make


def _cfg(tmp_path, corpus, scores, **kwargs) -> CurateConfig:
    output = kwargs.pop("output", CurateOutput(dir=str(tmp_path / "curated"), figure=False))
    data = kwargs.pop("data", DataConfig(path=str(corpus)))
    return CurateConfig(scores=str(scores), data=data, output=output, **kwargs)


def _ranked() -> list[int]:
    """Record indices with a usable score, riskiest first."""
    usable = [i for i in range(N) if i not in UNSCORED and i != NOT_USABLE]
    return sorted(usable, key=lambda i: -_score_of(i))


def _raw_records(path, fmt):
    if fmt == "jsonl":
        return path.read_bytes().splitlines(keepends=True)
    if fmt == "csv":
        return path.read_text().splitlines(keepends=True)[1:]
    if fmt == "json":
        return json.loads(path.read_text())
    return pd.read_parquet(path).to_dict("records")


@pytest.mark.parametrize("fmt", FORMATS)
def test_drop_top_fraction_removes_the_riskiest_and_keeps_the_rest_verbatim(tmp_path, corpus_factory, fmt):
    corpus, ids = corpus_factory(fmt)
    scores = _write_scores(tmp_path, ids)
    out = run_curate(_cfg(tmp_path, corpus, scores, fraction=0.1))
    manifest = json.loads((out / "manifest.json").read_text())
    k = math.ceil(0.1 * len(_ranked()))  # 17 ranked -> 2
    expected = _ranked()[:k]
    assert [r["sample_id"] for r in manifest["removed"]] == [ids[i] for i in expected]
    assert [r["score"] for r in manifest["removed"]] == [_score_of(i) for i in expected]
    assert [r["rank"] for r in manifest["removed"]] == [1, 2]
    assert [r["record_index"] for r in manifest["removed"]] == expected

    written = out / f"corpus.curated{SUFFIX[fmt]}"
    assert manifest["corpus"]["output"] == str(written) and manifest["corpus"]["output_format"] == fmt
    before, after = _raw_records(corpus, fmt), _raw_records(written, fmt)
    assert after == [r for i, r in enumerate(before) if i not in expected]  # JSONL/CSV byte for byte
    if fmt == "csv":
        assert written.read_text().splitlines()[0] == corpus.read_text().splitlines()[0]
    kept, _ = load_samples(DataConfig(path=str(written)))
    assert [s.sample_id for s in kept] == [sid for i, sid in enumerate(ids) if i not in expected]

    counts = manifest["counts"]
    assert counts["records_in_corpus"] == N and counts["records_written"] == N - k and counts["records_removed"] == k
    assert counts["kept_without_score"] == {"no_score_row": 2, "score_not_usable": 1, "not_read_as_sample": 0}
    assert counts["scores_without_record"] == 2 and counts["samples_scored"] == 17
    assert manifest["scores"]["config_hash"] == "abc123"
    assert manifest["scores"]["metadata"]["sqsd_ray_version"] == "test"
    assert len(manifest["config_hash"]) == 16
    md = (out / "curate.md").read_text()
    assert "no score row: 2, score not ok / not finite: 1" in md and "without a corpus record: 2" in md


def test_drop_above_threshold(tmp_path, corpus_factory):
    corpus, ids = corpus_factory("jsonl")
    scores = _write_scores(tmp_path, ids)
    out = run_curate(_cfg(tmp_path, corpus, scores, mode="drop_above", threshold=12.5))
    manifest = json.loads((out / "manifest.json").read_text())
    expected = [i for i in _ranked() if _score_of(i) > 12.5]
    assert [r["sample_id"] for r in manifest["removed"]] == [ids[i] for i in expected] and len(expected) == 5
    # lower is riskier (e.g. sqsd_raw = −score here): the threshold cuts the other side
    out2 = run_curate(_cfg(tmp_path, corpus, scores, mode="drop_above", threshold=-12.5, column="sqsd_raw",
                           higher_is_riskier=False, output=CurateOutput(dir=str(tmp_path / "c2"), figure=False)))
    manifest2 = json.loads((out2 / "manifest.json").read_text())
    assert {r["sample_id"] for r in manifest2["removed"]} == {ids[i] for i in expected}  # status not ok: left out


def test_comparison_numbers_in_curate_md(tmp_path, corpus_factory):
    corpus, ids = corpus_factory("jsonl")
    scores = _write_scores(tmp_path, ids)
    out = run_curate(_cfg(tmp_path, corpus, scores, fraction=0.25,
                          output=CurateOutput(dir=str(tmp_path / "curated"), figure=True)))
    md = (out / "curate.md").read_text()
    ranked = _ranked()
    k = math.ceil(0.25 * len(ranked))  # 5
    removed, kept = ranked[:k], ranked[k:]
    tokens, chars = (lambda i: 6 + i), (lambda i: 5 + i)
    for label, group in (("removed", removed), ("kept (scored)", kept)):
        t, c = [tokens(i) for i in group], [chars(i) for i in group]
        assert (f"| {label} | {len(group)} | {np.mean(t):.1f} | {np.median(t):.1f} | {np.mean(c):.1f} | "
                f"{np.median(c):.1f} |") in md
    unscored = [i for i in range(N) if i not in ranked]
    c = [chars(i) for i in unscored]
    assert f"| kept without a score | 3 | – | – | {np.mean(c):.1f} | {np.median(c):.1f} |" in md
    rank_score, rank_len = (pd.Series(v).rank() for v in ([_score_of(i) for i in ranked], [tokens(i) for i in ranked]))
    rho = np.corrcoef(rank_score, rank_len)[0, 1]  # Spearman = Pearson of the ranks
    assert f"Spearman(sqsd, response tokens) = {rho:.3f}" in md
    longest = sorted(ranked, key=lambda i: -tokens(i))[:k]
    shortest = sorted(ranked, key=lambda i: tokens(i))[:k]
    shared_long, shared_short = len(set(longest) & set(removed)), len(set(shortest) & set(removed))
    assert (f"of the {k} removed samples, {shared_long} ({100 * shared_long / k:.1f}%) are also among the {k} "
            f"longest responses (in tokens) and {shared_short} ({100 * shared_short / k:.1f}%) among the {k} "
            f"shortest; a random pick of {k} shares {100 * k / len(ranked):.1f}%") in md
    assert "## By source (`category`)" in md
    for cat in ("a", "b"):
        members = [i for i in range(N) if ("a" if i % 2 else "b") == cat]
        scored = [i for i in members if i in ranked]
        gone = [i for i in members if i in removed]
        assert (f"| {cat} | {len(members)} | {len(scored)} | {len(gone)} | {100 * len(gone) / len(scored):.1f}% | "
                f"{100 * len(gone) / k:.1f}% |") in md
    assert (out / "curate.png").exists() and "![sqsd vs response length](curate.png)" in md
    table = pd.read_csv(out / "curate.csv")
    assert set(table.loc[table["removed"], "sample_id"]) == {ids[i] for i in removed}


@pytest.mark.parametrize("fmt", ("jsonl", "csv", "parquet", "json"))
def test_reweight_writes_monotone_weights_that_load_back(tmp_path, corpus_factory, fmt):
    corpus, ids = corpus_factory(fmt)
    scores = _write_scores(tmp_path, ids)
    settings = ReweightSettings(w_min=0.2, power=2.0)
    out = run_curate(_cfg(tmp_path, corpus, scores, mode="reweight", reweight=settings))
    written = out / f"corpus.curated{SUFFIX[fmt]}"
    samples, _ = load_samples(DataConfig(path=str(written), weight_field="loss_weight"))
    assert [s.sample_id for s in samples] == ids  # every record kept, ids unchanged by the added field
    weight = {s.sample_id: s.weight for s in samples}
    ranked = _ranked()
    assert weight[ids[ranked[0]]] == pytest.approx(0.2) and weight[ids[ranked[-1]]] == pytest.approx(1.0)
    by_risk = [weight[ids[i]] for i in ranked]
    assert all(0.2 <= w <= 1.0 for w in weight.values())
    assert all(a <= b for a, b in zip(by_risk, by_risk[1:]))  # riskier -> never heavier
    n = len(ranked)
    for position, i in enumerate(ranked):  # w = 1 − (1 − w_min)·u², u = 1 for the riskiest, 0 for the safest
        u = (n - 1 - position) / (n - 1)
        assert weight[ids[i]] == pytest.approx(1 - 0.8 * u ** 2, abs=1e-6)
    assert all(weight[ids[i]] == 1.0 for i in (*UNSCORED, NOT_USABLE))
    tokenized = tokenize_samples(samples, build_tiny_tokenizer(), DataConfig(path="x", max_length=256),
                                 DataReport(kept=len(samples)))
    assert [t.weight for t in tokenized] == [s.weight for s in samples]
    before = _raw_records(corpus, fmt)
    if fmt == "jsonl":  # the weight is spliced in: every other byte of the line is unchanged
        for old, new in zip(before, _raw_records(written, fmt)):
            assert new.startswith(old.rstrip(b"}\n")) and new.endswith(b"}\n")
            assert {k: v for k, v in json.loads(new).items() if k != "loss_weight"} == json.loads(old)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["removed"] == [] and manifest["counts"]["records_written"] == N
    md = (out / "curate.md").read_text()
    assert "most down-weighted (2 riskiest)" in md and "weighted" in md


def test_rank_weights_ties_share_a_weight_and_value_basis():
    settings = ReweightSettings(w_min=0.1, power=1.0)
    w = rank_weights(np.array([3.0, 1.0, 3.0, 0.0]), settings)
    assert w[0] == w[2] and w[3] == 1.0 and w[1] > w[0]
    v = rank_weights(np.array([0.0, 5.0, 10.0]), ReweightSettings(basis="value", w_min=0.0, power=1.0))
    assert list(v) == [1.0, 0.5, 0.0]
    low = rank_weights(np.array([0.0, 5.0, 10.0]), ReweightSettings(basis="value", w_min=0.0, power=1.0),
                       higher_is_riskier=False)
    assert list(low) == [0.0, 0.5, 1.0]


def test_identical_repeats_follow_their_first_occurrence(tmp_path):
    records = _records()
    records.append(dict(records[_ranked()[0]]))  # a repeat of the riskiest record, skipped on loading
    corpus = _write_corpus(tmp_path / "dup.jsonl", records, "jsonl")
    samples, report = load_samples(DataConfig(path=str(corpus)))
    assert report.duplicates == {N: samples[_ranked()[0]].sample_id}
    scores = _write_scores(tmp_path, [s.sample_id for s in samples])
    out = run_curate(_cfg(tmp_path, corpus, scores, fraction=0.1))
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["records_removed"] == 3 and counts["samples_removed"] == 2 and counts["duplicate_records"] == 1
    assert len((out / "dup.curated.jsonl").read_text().splitlines()) == N + 1 - 3


def test_records_not_read_as_samples_are_kept_and_counted(tmp_path, corpus_factory):
    corpus, ids = corpus_factory("jsonl")
    scores = _write_scores(tmp_path, ids)
    out = run_curate(_cfg(tmp_path, corpus, scores, data=DataConfig(path=str(corpus), keep_if={"category": "a"})))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept_without_score"]["not_read_as_sample"] == N // 2
    odd_ranked = [i for i in _ranked() if i % 2]
    k = math.ceil(0.1 * len(odd_ranked))
    assert [r["sample_id"] for r in manifest["removed"]] == [ids[i] for i in odd_ranked[:k]]
    assert manifest["counts"]["records_written"] == N - k
    out = run_curate(_cfg(tmp_path, corpus, scores, data=DataConfig(path=str(corpus), keep_if={"category": "a"}),
                          unread_records="drop", output=CurateOutput(dir=str(tmp_path / "only_read"), figure=False)))
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["unread_records_left_out"] == N // 2 and counts["kept_without_score"]["not_read_as_sample"] == 0
    assert counts["records_written"] == N // 2 - k
    written = [json.loads(line) for line in (out / "corpus.curated.jsonl").read_text().splitlines()]
    assert len(written) == N // 2 - k and all(r["category"] == "a" for r in written)


def test_hf_dataset_is_written_as_jsonl(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    dataset_dir = tmp_path / "my_dataset"
    dataset_dir.mkdir()
    _write_corpus(dataset_dir / "train.jsonl", _records(), "jsonl")
    data = DataConfig(path=str(dataset_dir), format="hf")
    ids = [s.sample_id for s in load_samples(data)[0]]
    scores = _write_scores(tmp_path, ids)
    out = run_curate(_cfg(tmp_path, dataset_dir, scores, data=data))
    manifest = json.loads((out / "manifest.json").read_text())
    written = manifest["corpus"]["output"]
    assert written.endswith(".train.curated.jsonl") and manifest["corpus"]["output_format"] == "jsonl"
    removed = {r["sample_id"] for r in manifest["removed"]}
    kept, _ = load_samples(DataConfig(path=written))
    assert [s.sample_id for s in kept] == [sid for sid in ids if sid not in removed]
    assert "a Hugging Face dataset, written as JSON Lines" in (out / "curate.md").read_text()


def test_bad_inputs_are_named(tmp_path, corpus_factory):
    corpus, ids = corpus_factory("jsonl")
    scores = _write_scores(tmp_path, ids)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\)"):
            _cfg(tmp_path, corpus, scores, fraction=bad)
    with pytest.raises(ConfigError, match="drop_above needs threshold"):
        _cfg(tmp_path, corpus, scores, mode="drop_above")
    with pytest.raises(ConfigError, match=r"threshold -1 removes all 17 scored samples .* raise threshold"):
        run_curate(_cfg(tmp_path, corpus, scores, mode="drop_above", threshold=-1.0))
    with pytest.raises(ConfigError, match=r"column 'nope' is not in the score file .*available columns: .*'sqsd'"):
        run_curate(_cfg(tmp_path, corpus, scores, column="nope"))
    foreign = _write_scores(tmp_path / "other", [f"x{i}" for i in range(N)])
    with pytest.raises(ValueError, match="share no sample_id"):
        run_curate(_cfg(tmp_path, corpus, foreign))
    with pytest.raises(FileNotFoundError, match="score file .*missing.parquet does not exist"):
        run_curate(_cfg(tmp_path, corpus, tmp_path / "missing.parquet"))
    with pytest.raises(ConfigError, match="source_field 'topic' is in no corpus record"):
        run_curate(_cfg(tmp_path, corpus, scores, source_field="topic"))
    assert not (tmp_path / "curated").exists()  # nothing was written by the failures
    small = _write_corpus(tmp_path / "small.jsonl", _records(2), "jsonl")
    small_ids = [s.sample_id for s in load_samples(DataConfig(path=str(small)))[0]]
    with pytest.raises(ConfigError, match=r"fraction 0.9 of the 2 scored samples rounds up to all 2"):
        run_curate(_cfg(tmp_path, small, _write_scores(tmp_path / "s", small_ids), fraction=0.9))
    run_curate(_cfg(tmp_path, corpus, scores))
    with pytest.raises(FileExistsError, match="already holds a curation; set output.overwrite=true"):
        run_curate(_cfg(tmp_path, corpus, scores))
    run_curate(_cfg(tmp_path, corpus, scores, output=CurateOutput(dir=str(tmp_path / "curated"), overwrite=True,
                                                                  figure=False)))
    weighted = _write_corpus(tmp_path / "weighted.jsonl", [{**r, "loss_weight": 1} for r in _records()], "jsonl")
    with pytest.raises(ConfigError, match="already has a field 'loss_weight'; set reweight.weight_field"):
        run_curate(_cfg(tmp_path, weighted, scores, mode="reweight",
                        output=CurateOutput(dir=str(tmp_path / "w"), figure=False)))
    assert not list((tmp_path / "w").glob("*.curated.jsonl*"))  # no half-written corpus
    with pytest.raises(ConfigError, match="reweight.w_min must be in"):
        ReweightSettings(w_min=1.5)


@pytest.mark.parametrize("value, reason", [(None, "missing_field"), ("heavy", "wrong_type"), (True, "wrong_type"),
                                           (-0.5, "invalid_value"), ("nan", "invalid_value")])
def test_weight_field_bad_values_name_record_and_field(tmp_path, value, reason):
    records = [{"prompt": "q", "response": "a", "w": 0.5}, {"prompt": "q2", "response": "b"}]
    if value is not None:
        records[1]["w"] = value
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=rf"w.jsonl line 2: field 'w': .*\[{reason}\]"):
        load_samples(DataConfig(path=str(path), weight_field="w"))
    samples, report = load_samples(DataConfig(path=str(path), weight_field="w", on_bad_record="skip"))
    assert [s.weight for s in samples] == [0.5] and report.skipped == {reason: 1}
    assert "w" not in samples[0].meta


def test_weights_default_to_one_and_csv_strings_parse(tmp_path):
    path = _write_corpus(tmp_path / "c.csv", [{"prompt": "q", "response": "a", "w": "0.25"}], "csv")
    assert load_samples(DataConfig(path=str(path)))[0][0].weight == 1.0
    sample = load_samples(DataConfig(path=str(path), weight_field="w"))[0][0]
    assert sample.weight == 0.25


def test_cli_curate_verb(tmp_path, corpus_factory, capsys):
    corpus, ids = corpus_factory("jsonl")
    scores = _write_scores(tmp_path, ids)
    assert main(["curate", "--set", f"scores={scores}", "--set", f"data.path={corpus}", "--set",
                 f"output.dir={tmp_path / 'cli'}", "--set", "output.figure=false"]) == 0
    printed = capsys.readouterr().out
    assert "# Curation of" in printed and "More than a length filter?" in printed
    assert main(["curate", "--set", f"scores={scores}", "--set", f"data.path={corpus}", "--set",
                 f"output.dir={tmp_path / 'cli2'}", "--set", "fraction=2"]) == 2
    assert "fraction must be in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["curate_tiny.yaml", "curate_qwen3-8b_dolly_beaver.yaml"])
def test_curate_job_files_parse(name):
    import yaml

    from sqsd_ray.config import from_dict
    from tests.conftest import REPO_ROOT

    text = (REPO_ROOT / "jobs" / name).read_text()
    assert text.startswith("#")
    cfg = from_dict(CurateConfig, yaml.safe_load(text))
    assert cfg.scores.endswith("scores.parquet") and cfg.mode == "drop_top_fraction"
