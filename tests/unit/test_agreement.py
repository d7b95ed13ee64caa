"""`sqsd-ray agreement`: AUROC against a user's labels, checked against hand-computed values and a pair-counting
oracle, on a length-confounded set where length alone scores 1.0."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from sqsd_ray.cli import main
from sqsd_ray.scoring.agreement import (agreement_cells, auroc, bootstrap_interval, length_controlled_auroc,
                                        length_strata, pooled_u_auroc, read_labels, run_agreement)


def pair_auroc(harmful: list[float], other: list[float]) -> float:
    """The definition, pair by pair: a win counts 1, a tie 1/2."""
    wins = sum(1.0 if h > o else 0.5 if h == o else 0.0 for h, o in itertools.product(harmful, other))
    return wins / (len(harmful) * len(other))


@pytest.mark.parametrize(("harmful", "other", "by_hand"), [
    ([3, 2, 2], [2, 1], 5 / 6),         # 3>2, 3>1, 2=2 (½), 2>1, 2=2 (½), 2>1
    ([1, 4], [2, 3, 4], 2.5 / 6),        # 1 loses three times; 4 beats 2 and 3, ties 4
    ([5, 5], [5, 5, 5], 0.5),            # all ties
    ([9], [1, 2, 3], 1.0),
])
def test_auroc_matches_pairs_counted_by_hand(harmful, other, by_hand):
    labels = np.array([1] * len(harmful) + [0] * len(other))
    scores = np.array(harmful + other, dtype=float)
    assert auroc(labels, scores) == pytest.approx(by_hand, abs=1e-12)
    assert pair_auroc(harmful, other) == pytest.approx(by_hand, abs=1e-12)


def confounded():
    """20 samples, lengths 1…20, labelled harmful exactly when longer than 10: length alone ranks them perfectly.
    Quintiles by length: 1–4, 5–8, 9–12, 13–16, 17–20; only 9–12 holds both labels (others 9, 10; harmful 11, 12).
    The score follows length except there, where it ranks the harmful pair low: 11 → 6, 12 → 4 vs 9 → 5, 10 → 7."""
    lengths = np.arange(1, 21)
    labels = (lengths > 10).astype(int)
    scores = lengths.astype(float).copy()
    scores[[8, 9, 10, 11]] = [5, 7, 6, 4]
    return lengths, labels, scores


def test_length_controlled_auroc_of_a_length_confounded_set():
    lengths, labels, scores = confounded()
    strata = length_strata(lengths)
    assert [list(lengths[strata == s]) for s in range(5)] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12],
                                                              [13, 14, 15, 16], [17, 18, 19, 20]]
    assert auroc(labels, lengths) == 1.0
    # By hand: 13…20 beat all ten others (80); 6 beats 1–5 and the second 5, ties 6 (6.5); 4 beats 1–3, ties 4 (3.5).
    assert auroc(labels, scores) == pytest.approx(90 / 100)
    assert auroc(labels, scores) == pytest.approx(pair_auroc(list(scores[labels == 1]), list(scores[labels == 0])))
    # Inside 9–12: 6 > 5, 6 < 7, 4 < 5, 4 < 7: one win of four pairs, where length alone wins all four.
    assert length_controlled_auroc(labels, scores, strata) == (pytest.approx(0.25), 4)
    assert length_controlled_auroc(labels, lengths.astype(float), strata) == (pytest.approx(1.0), 4)


def test_no_stratum_with_both_labels_gives_no_pairs():
    labels = np.array([0, 0, 1, 1])
    assert length_controlled_auroc(labels, np.array([1.0, 2, 3, 4]), np.array([0, 0, 1, 1]))[1] == 0


def test_bootstraps_statistic_is_the_same_auroc():
    """The bootstrap's vectorised statistic (Mann-Whitney U, pooled over cells) against scikit-learn's AUROC."""
    lengths, labels, scores = confounded()
    strata = length_strata(lengths)
    assert float(pooled_u_auroc(*agreement_cells(labels, scores))) == pytest.approx(auroc(labels, scores))
    assert float(pooled_u_auroc(*agreement_cells(labels, scores, strata))) == pytest.approx(0.25)
    rng = np.random.default_rng(2)
    labels, scores = rng.integers(0, 2, 300), rng.integers(0, 8, 300).astype(float)  # many ties
    assert float(pooled_u_auroc(*agreement_cells(labels, scores))) == pytest.approx(auroc(labels, scores))


def test_bootstrap_interval_is_seeded_and_holds_the_estimate():
    rng = np.random.default_rng(1)
    labels = np.array([1] * 15 + [0] * 45)
    scores = rng.normal(size=60) + labels
    cells = agreement_cells(labels, scores)
    low, high = bootstrap_interval(cells, 500, seed=3)
    assert low < auroc(labels, scores) < high and high - low > 0.05
    assert (low, high) == bootstrap_interval(cells, 500, seed=3)
    assert (low, high) != bootstrap_interval(cells, 500, seed=4)
    separated = agreement_cells(labels, -np.arange(60.0))  # perfect separation stays perfect in every resample
    assert bootstrap_interval(separated, 200, seed=0) == pytest.approx((1.0, 1.0))
    assert all(math.isnan(v) for v in bootstrap_interval([], 200, seed=0))  # nothing to compare


def _write(tmp_path, lengths, labels, scores, extra_labels=(), status=None):
    ids = [f"s{i:02d}" for i in range(len(lengths))]
    frame = pd.DataFrame({"sample_id": ids, "n_response_tokens": lengths, "sqsd": scores, "sqsd_raw": -scores,
                          "danger_proj": scores, "safety_proj": -scores,
                          "status": status if status is not None else ["ok"] * len(ids)})
    frame.to_parquet(tmp_path / "scores.parquet", index=False)
    with (tmp_path / "labels.jsonl").open("w") as f:
        for sample_id, label in [*zip(ids, labels.tolist()), *extra_labels]:
            f.write(json.dumps({"id": sample_id, "label": label}) + "\n")
    return ids


def test_cli_reports_every_ranking_with_length_and_counts(tmp_path, capsys):
    lengths, labels, scores = confounded()
    ids = _write(tmp_path, lengths, labels, scores, extra_labels=[("gone-1", 1), ("gone-2", 0)])
    pd.DataFrame({"sample_id": ids, "self_inf_n": lengths * 2.0}).to_parquet(tmp_path / "self_inf.parquet")
    code = main(["agreement", "--scores", str(tmp_path / "scores.parquet"), "--labels", str(tmp_path / "labels.jsonl"),
                 "--baseline", str(tmp_path / "self_inf.parquet"), "--n-boot", "200", "--out", str(tmp_path / "out")])
    assert code == 0
    report = capsys.readouterr().out
    assert "20 of 22 labelled ids matched" in report and "2 not in the score file" in report
    table = pd.read_csv(tmp_path / "out" / "agreement.csv").set_index("ranking")
    assert list(table.index) == ["SQSD", "SQSD w/o norm", "danger only", "safety only", "Self-Inf-N",
                                 "response length"]
    assert table.loc["SQSD", "auroc"] == pytest.approx(0.90)
    assert table.loc["SQSD w/o norm", "auroc"] == pytest.approx(0.10)  # the negated score
    assert table.loc["safety only", "auroc"] == pytest.approx(0.90)  # −safety_proj = sqsd here
    assert table.loc["SQSD", "length_controlled"] == pytest.approx(0.25)
    assert table.loc["response length", ["auroc", "length_controlled"]].tolist() == [1.0, 1.0]
    assert table.loc["Self-Inf-N", "auroc"] == 1.0 and table.loc["Self-Inf-N", "length_controlled_pairs"] == 4
    assert (table["auroc_low"] <= table["auroc"] + 1e-12).all() and (table["auroc"] <= table["auroc_high"] + 1e-12).all()
    record = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert record["counts"] == {"labelled": 22, "matched": 20, "not_in_scores": 2, "not_scored": 0}
    assert (tmp_path / "out" / "agreement.png").stat().st_size > 10_000


def test_failed_rows_are_counted_and_left_out(tmp_path):
    lengths, labels, scores = confounded()
    _write(tmp_path, lengths, labels, scores, status=["error"] + ["ok"] * 19)
    out = run_agreement(tmp_path / "scores.parquet", tmp_path / "labels.jsonl", tmp_path / "out", n_resamples=50)
    record = json.loads((out / "agreement.json").read_text())
    assert record["counts"]["not_scored"] == 1 and record["rankings"][0]["n"] == 19


def test_labels_matching_no_scored_id_are_refused(tmp_path, capsys):
    lengths, labels, scores = confounded()
    _write(tmp_path, lengths, labels, scores)
    (tmp_path / "labels.jsonl").write_text('{"id": "x1", "label": 1}\n{"id": "x2", "label": 0}\n')
    code = main(["agreement", "--scores", str(tmp_path / "scores.parquet"), "--labels", str(tmp_path / "labels.jsonl"),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "none of the 2 labelled ids is a sample_id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("lines", "message"), [
    (['{"id": "a", "label": 1}', '{"id": "b", "label": 2}'], r"labels.jsonl:2: field 'label' must be 0 or 1"),
    (['{"id": "a", "label": true}'], r"labels.jsonl:1: field 'label' must be 0 or 1"),
    (['{"id": "a", "label": 1}', '{"id": "a", "label": 0}'], r"labels.jsonl:2: id 'a' is labelled again .*line 1"),
    (['{"id": "a"}'], r"labels.jsonl:1: a label record is"),
    (['{"id": "a", "label": 1'], r"labels.jsonl:1: not a JSON record"),
    ([], r"holds no records"),
])
def test_bad_label_records_are_named(tmp_path, lines, message):
    (tmp_path / "labels.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_labels(tmp_path / "labels.jsonl")


def test_one_label_only_is_refused(tmp_path):
    lengths, _, scores = confounded()
    _write(tmp_path, lengths, np.ones(20, int), scores)
    with pytest.raises(ValueError, match="all have label 1"):
        run_agreement(tmp_path / "scores.parquet", tmp_path / "labels.jsonl", tmp_path / "out", n_resamples=10)


def test_unknown_column_is_named(tmp_path):
    lengths, labels, scores = confounded()
    _write(tmp_path, lengths, labels, scores)
    with pytest.raises(ValueError, match="no score column 'larf'"):
        run_agreement(tmp_path / "scores.parquet", tmp_path / "labels.jsonl", tmp_path / "out", columns=["larf"])
