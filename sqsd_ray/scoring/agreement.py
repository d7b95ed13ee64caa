"""Agreement of a ranking with a user's own labels: AUROC with a bootstrap interval, against response length alone.

    sqsd-ray agreement --scores RUN/scores.parquet --labels labels.jsonl [--baseline OTHER/scores.parquet ...]

A team often holds a small labelled set: samples known to have hurt a previous fine-tune, a red team's picks.
``labels.jsonl`` has one record a line, ``{"id": ..., "label": 0 or 1}`` (1 = harmful to safety); ``id`` is the
``sample_id`` of the score file. For each ranking (each score column of the score file, and the score column of
each baseline file given) the analysis reports

* **AUROC**: the chance that a labelled-harmful sample scores above a labelled-other one, ties counting half
  (scikit-learn's ``roc_auc_score``), with a 95 % bootstrap interval (``scipy.stats.bootstrap``, percentile
  method, on the Mann–Whitney U of each resample). The harmful and the other samples are resampled separately, so
  every resample holds both labels.
* the same for **response length alone** (``n_response_tokens`` as the score): unnormalised gradient scores
  track length (paper App. H), and a labelled set can be length-confounded too, so length is the ranking to beat.
* a **length-controlled AUROC**: the samples are cut into response-length quintiles and a harmful sample is
  compared only with the other samples of its own quintile; the wins and pairs of all quintiles are pooled
  (Σ wins / Σ pairs). A ranking that only tracks length scores about 0.5 there. Quintiles that hold one label
  only contribute no pairs; the report gives the number of pairs compared. Its interval resamples the harmful
  and the other samples of each quintile separately.

Outputs in ``--out``: ``agreement.md``, ``agreement.csv`` (one row per ranking), ``agreement.json`` (the same, the
counts and the settings) and ``agreement.png`` (ROC curves; AUROC and length-controlled AUROC with intervals).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..experiments.effectiveness import DERIVED_COLUMNS, score_column
from .summary import markdown_table, pyplot, save_figure

log = logging.getLogger(__name__)

LENGTH = "n_response_tokens"
# What each known score column is called in the paper's tables (the demo's rows use the same names).
RANKING_NAMES = {"sqsd": "SQSD", "sqsd_raw": "SQSD w/o norm", "danger_proj": "danger only",
                 "neg_safety_proj": "safety only", "self_inf_n": "Self-Inf-N", "bianchor_grad": "Bi-Anchor (Grad)",
                 "bianchor_reps": "Bi-Anchor (Reps)", "larf": "LARF", "reward_model": "reward model"}
SQSD_COLUMNS = ("sqsd", "sqsd_raw", "danger_proj", "neg_safety_proj")
BASELINE_COLUMNS = ("self_inf_n", "bianchor_grad", "bianchor_reps", "larf", "reward_model", "sqsd")
LENGTH_BINS = 5


@dataclass(frozen=True)
class Ranking:
    """One score column of one score file, higher = riskier."""

    name: str
    path: str
    column: str


@dataclass
class AgreementRow:
    ranking: str
    file: str
    column: str
    n: int
    n_harmful: int
    auroc: float
    auroc_low: float
    auroc_high: float
    length_controlled: float
    length_controlled_low: float
    length_controlled_high: float
    length_controlled_pairs: int


# ------------------------------------------------------------------------------------------------ labels


def read_labels(path: str | Path) -> pd.DataFrame:
    """``{"id", "label"}`` records as a frame (id as text, label 0/1); an error names the line of any bad record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    ids, labels, first_line = [], [], {}
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not a JSON record ({err.msg})") from None
            if not isinstance(record, dict) or "id" not in record or "label" not in record:
                raise ValueError(f"{where}: a label record is {{\"id\": ..., \"label\": 0 or 1}}, got {line.strip()[:80]}")
            label = record["label"]
            if isinstance(label, bool) or label not in (0, 1):
                raise ValueError(f"{where}: field 'label' must be 0 or 1 (1 = harmful to safety), got {label!r}")
            sample_id = str(record["id"])
            if sample_id in first_line:
                raise ValueError(f"{where}: id {sample_id!r} is labelled again (first on line {first_line[sample_id]})")
            first_line[sample_id] = number
            ids.append(sample_id)
            labels.append(int(label))
    if not ids:
        raise ValueError(f"labels file {path} holds no records")
    return pd.DataFrame({"sample_id": ids, "label": labels})


def match_labels(scores: pd.DataFrame, labels: pd.DataFrame, what: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """The labelled rows of a score table that were scored, and the counts: labelled, matched, not in the file,
    matched but not scored (a failed row: its status is not ok). Refuses labels that match no scored id."""
    scores = scores.assign(sample_id=scores["sample_id"].astype(str))
    merged = labels.merge(scores, on="sample_id", how="inner")
    counts = {"labelled": len(labels), "matched": len(merged), "not_in_scores": len(labels) - len(merged)}
    if not len(merged):
        examples = ", ".join(repr(i) for i in labels["sample_id"].head(3))
        raise ValueError(f"none of the {len(labels)} labelled ids is a sample_id of {what} (labels start {examples}; "
                         f"scores start {', '.join(repr(i) for i in scores['sample_id'].head(3))})")
    ok = merged["status"].eq("ok") if "status" in merged else pd.Series(True, index=merged.index)
    counts["not_scored"] = int((~ok).sum())
    return merged[ok].reset_index(drop=True), counts


# ------------------------------------------------------------------------------------------------ statistics


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a harmful sample > score of another), ties half; NaN unless both labels are present."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def length_strata(lengths: np.ndarray, n_bins: int = LENGTH_BINS) -> np.ndarray:
    """Quantile bin of each response length; equal lengths share a bin, so fewer bins come out when lengths tie."""
    return pd.qcut(pd.Series(lengths, dtype=float), n_bins, labels=False, duplicates="drop").to_numpy()


def length_controlled_auroc(labels: np.ndarray, scores: np.ndarray, strata: np.ndarray) -> tuple[float, int]:
    """AUROC over (harmful, other) pairs inside the same length stratum, pooled: Σ_q AUC_q·P_q·N_q / Σ_q P_q·N_q.
    Returns it and the number of pairs compared (0, and NaN, when no stratum holds both labels)."""
    wins = pairs = 0.0
    for stratum in np.unique(strata):
        inside = strata == stratum
        n_pos = int(labels[inside].sum())
        n_neg = int(inside.sum()) - n_pos
        if n_pos and n_neg:
            wins += auroc(labels[inside], scores[inside]) * n_pos * n_neg
            pairs += n_pos * n_neg
    return (wins / pairs if pairs else float("nan")), int(pairs)


def pooled_u_auroc(*cells: np.ndarray, axis: int = -1) -> np.ndarray:
    """Σ_q U_q / Σ_q n1_q·n0_q over cells (harmful_1, other_1, harmful_2, other_2, …): the pooled AUROC of the
    (harmful, other) pairs inside each cell pair, with U_q from ``scipy.stats.mannwhitneyu`` (pairs won plus half
    the ties). One cell pair is the plain AUROC. Vectorised over leading axes, as ``scipy.stats.bootstrap`` calls it."""
    from scipy.stats import mannwhitneyu

    wins = pairs = 0.0
    for harmful, other in zip(cells[::2], cells[1::2]):
        wins = wins + mannwhitneyu(harmful, other, axis=axis, method="asymptotic").statistic
        pairs += harmful.shape[axis] * other.shape[axis]
    return wins / pairs


def bootstrap_interval(cells: list[np.ndarray], n_resamples: int, seed: int,
                       confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``pooled_u_auroc(*cells)``, each cell resampled on its own: the harmful and
    the other scores for the plain AUROC; per length quintile, its harmful and its other scores for the
    length-controlled one (so every resample keeps every cell's size and both labels)."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    if n_resamples <= 0 or not cells or any(len(cell) == 0 for cell in cells):
        return float("nan"), float("nan")
    # a one-sample cell resamples to itself (scipy takes two or more): it enters every resample as it is
    varying = [i for i, cell in enumerate(cells) if len(cell) > 1]
    if not varying:
        value = float(pooled_u_auroc(*cells))
        return value, value

    def statistic(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        full = list(cells)
        for i, cell in zip(varying, resampled):
            full[i] = cell
        return pooled_u_auroc(*full, axis=axis)

    with warnings.catch_warnings():  # scipy warns of a constant distribution (AUROC 1.0 in every resample): fine here
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(tuple(cells[i] for i in varying), statistic, paired=False, vectorized=True,
                           n_resamples=n_resamples, confidence_level=confidence, method="percentile", batch=250,
                           rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return float(low), float(high)


def agreement_cells(labels: np.ndarray, scores: np.ndarray, strata: np.ndarray | None = None) -> list[np.ndarray]:
    """[harmful, other] scores, or per stratum holding both labels its [harmful, other] scores."""
    groups = [np.ones(len(labels), bool)] if strata is None else [strata == q for q in np.unique(strata)]
    cells = []
    for inside in groups:
        harmful, other = scores[inside & (labels == 1)], scores[inside & (labels == 0)]
        if len(harmful) and len(other):
            cells += [harmful, other]
    return cells


def agreement_row(ranking: Ranking, matched: pd.DataFrame, n_resamples: int, seed: int) -> AgreementRow:
    """AUROC, its interval and the length-controlled AUROC of one ranking on its matched, scored samples."""
    values = score_column(matched, ranking.column).to_numpy(float)
    finite = np.isfinite(values)
    if not finite.all():
        log.warning("%s: %d labelled samples have no finite %s and are left out", ranking.name, (~finite).sum(),
                    ranking.column)
    labels = matched["label"].to_numpy(int)[finite]
    values = values[finite]
    strata = length_strata(matched[LENGTH].to_numpy(float)[finite])
    controlled, pairs = length_controlled_auroc(labels, values, strata)
    low, high = bootstrap_interval(agreement_cells(labels, values), n_resamples, seed)
    c_low, c_high = bootstrap_interval(agreement_cells(labels, values, strata), n_resamples, seed)
    return AgreementRow(ranking.name, ranking.path, ranking.column, len(labels), int(labels.sum()),
                        auroc(labels, values), low, high, controlled, c_low, c_high, pairs)


# ------------------------------------------------------------------------------------------------ rankings


def rankings_of(frame: pd.DataFrame, path: str, columns: list[str] | None, known: tuple[str, ...]) -> list[Ranking]:
    """The rankings a score file offers: ``columns`` when given (each must be there), else the ``known`` ones it has."""
    available = set(frame.columns) | {name for name, (source, _) in DERIVED_COLUMNS.items() if source in frame}
    if columns:
        missing = [c for c in columns if c not in available]
        if missing:
            raise ValueError(f"{path} has no score column {', '.join(map(repr, missing))} (it has: "
                             f"{', '.join(sorted(c for c in available if c in RANKING_NAMES))})")
        chosen = columns
    else:
        chosen = [c for c in known if c in available]
        if not chosen:
            raise ValueError(f"{path} has none of the score columns {', '.join(known)}; name one as PATH:COLUMN")
    return [Ranking(RANKING_NAMES.get(c, c), path, c) for c in chosen]


def split_baseline(spec: str) -> tuple[str, list[str] | None]:
    """``PATH`` or ``PATH:COLUMN`` (a file name itself holding ':' is taken whole when it exists)."""
    if Path(spec).exists() or ":" not in spec:
        return spec, None
    path, column = spec.rsplit(":", 1)
    return path, [column]


# ------------------------------------------------------------------------------------------------ report


def run_agreement(scores: str | Path, labels: str | Path, output_dir: str | Path, baselines: list[str] = (),
                  columns: list[str] | None = None, n_resamples: int = 2000, seed: int = 0) -> Path:
    """Every ranking against the labels; writes agreement.{md,csv,json,png} to ``output_dir`` and returns it."""
    label_frame = read_labels(labels)
    main = pd.read_parquet(scores)
    if LENGTH not in main:
        raise ValueError(f"{scores} has no {LENGTH} column (a score file from `sqsd-ray score` has it)")
    matched, counts = match_labels(main, label_frame, str(scores))
    n_harmful = int(matched["label"].sum())
    if n_harmful in (0, len(matched)):
        raise ValueError(f"the {len(matched)} scored, labelled samples all have label {int(matched['label'].iloc[0])}"
                         if len(matched) else "no labelled sample was scored (every matched row failed)")
    log.info("labels: %d of %d matched a scored sample (%d not in %s, %d not scored); %d harmful", counts["matched"],
             counts["labelled"], counts["not_in_scores"], scores, counts["not_scored"], n_harmful)
    matched_in = {str(scores): matched}
    rows = [agreement_row(r, matched, n_resamples, seed) for r in rankings_of(main, str(scores), columns, SQSD_COLUMNS)]
    for spec in baselines:
        path, wanted = split_baseline(spec)
        frame = pd.read_parquet(path)
        if LENGTH not in frame:  # length comes from the main score file, for the length-controlled AUROC
            lengths = main[["sample_id", LENGTH]].astype({"sample_id": str})
            frame = frame.astype({"sample_id": str}).merge(lengths, on="sample_id", how="left")
        matched_in[path], _ = match_labels(frame, label_frame, path)
        rows += [agreement_row(r, matched_in[path], n_resamples, seed)
                 for r in rankings_of(frame, path, wanted, BASELINE_COLUMNS)]
    rows.append(agreement_row(Ranking("response length", str(scores), LENGTH), matched, n_resamples, seed))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([asdict(r) for r in rows])
    table.to_csv(out / "agreement.csv", index=False)
    settings = {"scores": str(scores), "labels": str(labels), "baselines": list(baselines), "n_resamples": n_resamples,
                "seed": seed, "confidence": 0.95, "length_bins": LENGTH_BINS}
    (out / "agreement.json").write_text(json.dumps({"settings": settings, "counts": counts,
                                                    "n_harmful": n_harmful, "rankings": table.to_dict("records")},
                                                   indent=1, allow_nan=True))
    plot_agreement(rows, matched_in, out / "agreement.png")
    (out / "agreement.md").write_text(render_agreement_md(table, counts, n_harmful, settings))
    return out


def _interval(value: float, low: float, high: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def render_agreement_md(table: pd.DataFrame, counts: dict[str, int], n_harmful: int, settings: dict) -> str:
    shown = pd.DataFrame({
        "ranking": table["ranking"], "column": table["column"], "n (harmful)": [
            f"{n} ({h})" for n, h in zip(table["n"], table["n_harmful"])],
        "AUROC [95 % CI]": [_interval(*v) for v in zip(table["auroc"], table["auroc_low"], table["auroc_high"])],
        "length-controlled AUROC [95 % CI]": [_interval(*v) for v in zip(
            table["length_controlled"], table["length_controlled_low"], table["length_controlled_high"])],
        "pairs compared": table["length_controlled_pairs"]})
    length = table[table["column"] == LENGTH]["auroc"].iloc[0]
    lines = ["# Agreement with the labels", "",
             (f"{counts['matched']} of {counts['labelled']} labelled ids matched a sample of `{settings['scores']}` "
              f"({counts['not_in_scores']} not in the score file, {counts['not_scored']} matched but not scored: "
              f"left out); {n_harmful} labelled harmful."), "",
             ("AUROC: the chance that a labelled-harmful sample scores above a labelled-other one (ties half); 95 % "
              f"percentile bootstrap over samples ({settings['n_resamples']} resamples, harmful and other resampled "
              f"separately). Length-controlled: pairs compared only inside response-length quintiles, pooled. "
              f"Response length alone scores {length:.3f}: a ranking that does no better is not telling more than "
              "length does."), "", *markdown_table(shown), "", "![ROC curves and AUROC](agreement.png)", ""]
    return "\n".join(lines)


def plot_agreement(rows: list[AgreementRow], matched_in: dict[str, pd.DataFrame], path: Path) -> Path:
    """ROC curve of every ranking (length dashed), and each AUROC beside its length-controlled one with intervals."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, (roc_ax, bar_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        frame = matched_in[row.file]
        values = score_column(frame, row.column).to_numpy(float)
        finite = np.isfinite(values)
        fpr, tpr, _ = roc_curve(frame["label"].to_numpy(int)[finite], values[finite])
        roc_ax.plot(fpr, tpr, "--" if row.column == LENGTH else "-", label=f"{row.ranking} ({row.auroc:.2f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    roc_ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC against the labels")
    roc_ax.legend(fontsize=7, loc="lower right")
    y = np.arange(len(rows))
    for offset, (key, name) in zip((-0.18, 0.18), (("auroc", "AUROC"), ("length_controlled", "length-controlled"))):
        values = np.array([getattr(r, key) for r in rows])
        errors = np.array([[v - getattr(r, f"{key}_low"), getattr(r, f"{key}_high") - v]
                           for v, r in zip(values, rows)]).T
        bar_ax.barh(y + offset, values - 0.5, left=0.5, height=0.34, xerr=np.nan_to_num(errors), label=name,
                    capsize=2)
    bar_ax.axvline(0.5, color="grey", lw=0.8)
    bar_ax.set_yticks(y, [r.ranking for r in rows], fontsize=8)
    bar_ax.invert_yaxis()
    bar_ax.set(xlim=(0, 1), xlabel="AUROC (bars from 0.5, chance)", title="AUROC with 95 % bootstrap interval")
    bar_ax.legend(fontsize=7)
    return save_figure(fig, path)


__all__ = ["AgreementRow", "Ranking", "agreement_cells", "auroc", "bootstrap_interval", "length_controlled_auroc",
           "length_strata", "match_labels", "pooled_u_auroc", "read_labels", "run_agreement"]
