"""The score summary's term diagnostics against the closed-form Spearman correlation (no ties) and pandas' sd;
the correlations themselves (scipy's) against hand-computed values, ties and degenerate inputs included."""

import warnings

import numpy as np
import pandas as pd
import pytest

from sqsd_ray.scoring.summary import pearson, render_summary, spearman, term_ordering


def _scores(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    danger = rng.normal(0.0, 0.3, n)
    safety = rng.normal(-5.0, 4.0, n)  # the safety term's spread dwarfs the danger term's
    return pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "danger_proj": danger, "safety_proj": safety,
                         "sqsd": danger - safety, "sqsd_raw": danger - safety,
                         "n_response_tokens": rng.integers(3, 60, n), "status": "ok"})


def _spearman_closed_form(x: pd.Series, y: pd.Series) -> float:
    """1 − 6 Σ d² / (n (n² − 1)) on the ranks: exact when no value repeats (continuous draws)."""
    rank_x, rank_y = np.argsort(np.argsort(x.to_numpy())), np.argsort(np.argsort(y.to_numpy()))
    n = len(x)
    return 1 - 6 * float(((rank_x - rank_y) ** 2).sum()) / (n * (n * n - 1))


def test_spearman_ties_share_their_average_rank():
    # ranks x: 1, 2.5, 2.5, 4, 5; y: 1, 4, 2.5, 2.5, 5 (mean 3): Σ dx·dy = 7.25, Σ dx² = Σ dy² = 9.5
    x, y = np.array([1.0, 2.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 2.0, 5.0])
    assert spearman(x, y) == pytest.approx(7.25 / 9.5, rel=1e-12)  # the no-ties formula would give 0.775
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # monotone, not linear
    # no ties: the closed form 1 − 6 Σ d² / (n (n² − 1)); d = (0, 1, −1, 0), n = 4
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(1 - 12 / 60)


def test_pearson_against_hand_value():
    # deviations (−1.5, −.5, .5, 1.5) and (−1.5, .5, −.5, 1.5): Σ dx·dy = 4, Σ dx² = Σ dy² = 5
    assert pearson(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8, rel=1e-12)


def test_correlations_drop_non_finite_pairs_and_give_nan_when_undefined():
    x = np.array([1.0, 2.0, np.nan, 3.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 7.0, np.inf, 4.0, 3.0])
    kept = [0, 1, 4, 5]
    for correlation in (spearman, pearson):
        assert correlation(x, y) == pytest.approx(correlation(x[kept], y[kept]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # scipy warns on constant input; these are guarded before it is called
            assert np.isnan(correlation(np.ones(5), np.arange(5.0)))  # a constant side has no ranking
            assert np.isnan(correlation(np.arange(2.0), np.arange(2.0)))  # two points: ±1 whatever they are
            assert np.isnan(correlation(np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, 3.0])))
        with pytest.raises(ValueError, match="different shapes"):
            correlation(np.arange(3.0), np.arange(4.0))


def test_term_ordering_match_pandas_on_all_samples_and_the_riskiest_fifth():
    df = _scores()
    df.loc[0, "status"] = "zero_norm"  # not scored: left out of every figure
    df.loc[0, "sqsd"] = 1e9
    ordering = term_ordering(df).set_index("samples")
    ok = df[df["status"] == "ok"]
    top = ok.nlargest(round(0.2 * len(ok)), "sqsd")
    for name, part in (("all samples", ok), ("riskiest 20 % by SQSD", top)):
        row = ordering.loc[name]
        assert row["n"] == len(part)
        assert row["sd danger"] == pytest.approx(part["danger_proj"].std())
        assert row["sd safety"] == pytest.approx(part["safety_proj"].std())
        assert row["ρ(SQSD, danger)"] == pytest.approx(_spearman_closed_form(part["sqsd"], part["danger_proj"]))
        assert row["ρ(SQSD, −safety)"] == pytest.approx(_spearman_closed_form(part["sqsd"], -part["safety_proj"]))
        assert row["ρ(danger, −safety)"] == pytest.approx(
            _spearman_closed_form(part["danger_proj"], -part["safety_proj"]))
    # the dominant term orders the corpus almost alone; inside the top fifth its hold loosens
    assert ordering.loc["all samples", "ρ(SQSD, −safety)"] > 0.99
    assert ordering.loc["riskiest 20 % by SQSD", "ρ(SQSD, −safety)"] < ordering.loc["all samples", "ρ(SQSD, −safety)"]


def test_summary_shows_what_orders_the_scores():
    df = _scores()
    text = render_summary(df)
    assert "## What orders the scores" in text
    assert "ablation experiment's `danger only` / `safety only` arms" in text and "`curate_also_by`" in text
    rho = _spearman_closed_form(df["sqsd"], -df["safety_proj"])
    line = next(line for line in text.splitlines() if line.startswith("| all samples |"))
    assert line.split(" | ")[5] == f"{rho:.2f}"
    assert "## What orders the scores" not in render_summary(df.head(2))  # too few samples for a rank correlation
