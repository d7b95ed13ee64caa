"""Human-readable summary of a score table: top/bottom samples, histogram, score-vs-length correlation.

The length correlation is there because gradient scores are known to track response length (paper App. H):
the normalised SQSD should correlate with length much less than its unnormalised variant.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd


# two points always correlate ±1, whatever they are: a correlation needs three pairs to say anything
MIN_CORRELATION_PAIRS = 3


def _finite_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The pairs where both values are finite, or None where no correlation is defined on them: fewer than
    ``MIN_CORRELATION_PAIRS`` pairs, or a constant side (zero variance: scipy would return NaN with a warning)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"correlation of arrays of different shapes: {x.shape} vs {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < MIN_CORRELATION_PAIRS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return x, y


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ (``scipy.stats.spearmanr``: Pearson's r of the ranks, ties sharing their average rank) over the
    pairs where both values are finite; NaN when fewer than three such pairs remain or either side is constant."""
    from scipy.stats import spearmanr

    pairs = _finite_pairs(x, y)
    return float("nan") if pairs is None else float(spearmanr(*pairs).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r (``scipy.stats.pearsonr``) over the pairs where both values are finite; NaN as for ``spearman``."""
    from scipy.stats import pearsonr

    pairs = _finite_pairs(x, y)
    return float("nan") if pairs is None else float(pearsonr(*pairs).statistic)


def markdown_table(frame: pd.DataFrame, digits: int | dict[str, int] = 1) -> list[str]:
    """A DataFrame as Markdown table lines; floats to ``digits`` decimals (one number, or per column, default 1),
    a missing float (NaN: no value for that row) as "—"."""
    lines = [list(map(str, frame.columns)), ["---"] * len(frame.columns)]
    places = [digits.get(c, 1) if isinstance(digits, dict) else digits for c in frame.columns]
    lines += [["—" if isinstance(v, float) and math.isnan(v) else f"{v:.{d}f}" if isinstance(v, float) else str(v)
               for v, d in zip(row, places)] for row in frame.itertuples(index=False)]
    return ["| " + " | ".join(line) + " |" for line in lines]


def _snippet(text: str, width: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def length_correlations(df: pd.DataFrame) -> dict[str, float]:
    """Spearman ρ of each score column with the response token count."""
    out = {}
    for col in ("sqsd", "sqsd_raw", "danger_proj", "safety_proj"):
        if col in df:
            out[col] = spearman(df[col].to_numpy(float), df["n_response_tokens"].to_numpy(float))
    return out


def term_ordering(df: pd.DataFrame, top_fraction: float = 0.2) -> pd.DataFrame:
    """What orders the scores: SQSD = Σ danger cosines − Σ safety cosines (Eq. 12), and a term whose spread dwarfs
    the other's ranks the samples almost alone. Per sample group (all scored samples; the riskiest ``top_fraction``
    by SQSD, the S1 band): each term's standard deviation and the Spearman ρ of SQSD with the danger term and with
    the negated safety term (the part SQSD adds), and of the two terms with each other."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    ok = ok[np.isfinite(ok["sqsd"].to_numpy(float))]
    top = ok.nlargest(max(1, round(top_fraction * len(ok))), "sqsd") if len(ok) else ok
    rows = []
    for name, part in (("all samples", ok), (f"riskiest {round(100 * top_fraction)} % by SQSD", top)):
        sqsd, danger = part["sqsd"].to_numpy(float), part["danger_proj"].to_numpy(float)
        neg_safety = -part["safety_proj"].to_numpy(float)
        rows.append({"samples": name, "n": len(part),
                     "sd danger": float(np.std(danger, ddof=1)) if len(part) > 1 else float("nan"),
                     "sd safety": float(np.std(neg_safety, ddof=1)) if len(part) > 1 else float("nan"),
                     "ρ(SQSD, danger)": spearman(sqsd, danger), "ρ(SQSD, −safety)": spearman(sqsd, neg_safety),
                     "ρ(danger, −safety)": spearman(danger, neg_safety)})
    return pd.DataFrame(rows)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (Ray workers and CI have no display), imported on first use
    so that importing a module that plots does not import matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write and close a figure (an open one would pile up in a long-lived worker); returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_histogram(df: pd.DataFrame, path: Path) -> Path:
    """SQSD and its unnormalised variant side by side (the raw one is on its own scale)."""
    import matplotlib.ticker

    plt = pyplot()

    cols = [c for c in ("sqsd", "sqsd_raw") if c in df]
    fig, axes = plt.subplots(1, len(cols) + 1, figsize=(4.2 * (len(cols) + 1), 3.4))
    ok = df[df["status"] == "ok"] if "status" in df else df
    for ax, col in zip(axes, cols):
        values = ok[col].to_numpy(float)
        ax.hist(values[np.isfinite(values)], bins=min(50, max(5, int(math.sqrt(len(values))))), color="#3b6ea8")
        ax.set_title({"sqsd": "SQSD (Eq. 12)", "sqsd_raw": "SQSD w/o normalisation"}[col])
        ax.set_xlabel("score (higher = riskier)")
        ax.set_ylabel("samples")
    ax = axes[-1]
    ax.scatter(ok["n_response_tokens"], ok["sqsd"], s=6, alpha=0.6, color="#a83b3b")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
    ax.set_xlabel("response tokens")
    ax.set_ylabel("SQSD")
    ax.set_title(f"SQSD vs length (Spearman {spearman(ok['sqsd'].to_numpy(float), ok['n_response_tokens'].to_numpy(float)):.2f})")
    return save_figure(fig, path)


def render_summary(
    df: pd.DataFrame, texts: pd.DataFrame | None = None, top_k: int = 10, data_report: str | None = None
) -> str:
    """Markdown summary. ``texts`` (sample_id, prompt, response) adds snippets to the top/bottom tables;
    ``data_report`` (DataReport.summary()) says what was read, skipped and truncated."""
    lines = ["# SQSD scores", ""]
    if data_report:
        lines += ["```", data_report.rstrip(), "```", ""]
    status_counts = df["status"].value_counts().to_dict() if "status" in df else {}
    ok = df[df["status"] == "ok"] if "status" in df else df
    lines.append(f"- samples scored: {len(df)} ({', '.join(f'{k}: {v}' for k, v in status_counts.items())})")
    if len(ok):
        q = ok["sqsd"].quantile([0.0, 0.25, 0.5, 0.75, 1.0]).to_numpy()
        lines.append(
            f"- SQSD min / q25 / median / q75 / max: {q[0]:.4f} / {q[1]:.4f} / {q[2]:.4f} / {q[3]:.4f} / {q[4]:.4f}"
        )
    for col, rho in length_correlations(ok).items():
        lines.append(f"- Spearman ρ({col}, response tokens) = {rho:.3f}")
    lines.append("")
    if len(ok) >= 3:  # Spearman needs three samples
        ordering = term_ordering(ok)
        lines += ["## What orders the scores", "",
                  "SQSD = danger term − safety term (Eq. 12). A term whose ρ with SQSD is near 1 orders the samples "
                  "almost alone; the other then only reorders samples whose dominant terms are close. Which term "
                  "predicts degradation is measured by the ablation experiment's `danger only` / `safety only` arms "
                  "(columns `danger_proj`, `neg_safety_proj`) and `experiment mitigate`'s `curate_also_by`, not by "
                  "these figures.", "",
                  *markdown_table(ordering, {"n": 0, "sd danger": 3, "sd safety": 3, "ρ(SQSD, danger)": 2,
                                           "ρ(SQSD, −safety)": 2, "ρ(danger, −safety)": 2}), ""]
    merged = ok.merge(texts, on="sample_id", how="left") if texts is not None else ok
    for title, part in (
        (f"Top {top_k} (riskiest)", merged.nlargest(top_k, "sqsd")),
        (f"Bottom {top_k} (safest)", merged.nsmallest(top_k, "sqsd")),
    ):
        lines += [f"## {title}", "", "| sample_id | SQSD | danger | safety | resp. tokens | prompt | response |",
                  "|---|---|---|---|---|---|---|"]
        for _, row in part.iterrows():
            prompt = _snippet(row.get("prompt", ""), 50).replace("|", "\\|")
            response = _snippet(row.get("response", ""), 50).replace("|", "\\|")
            lines.append(
                f"| {row['sample_id']} | {row['sqsd']:.4f} | {row['danger_proj']:.4f} | {row['safety_proj']:.4f} "
                f"| {int(row['n_response_tokens'])} | {prompt} | {response} |"
            )
        lines.append("")
    return "\n".join(lines)


def render_method_summary(df: pd.DataFrame, texts: pd.DataFrame, column: str, top_k: int, data_report: str) -> str:
    """summary.md of a baseline score file: the highest and lowest ranked samples by ``column``."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    merged = ok.merge(texts, on="sample_id", how="left")
    rho = spearman(ok[column].to_numpy(float), ok["n_response_tokens"].to_numpy(float))
    lines = [f"# {column}: {len(ok)} samples scored", "", "```", data_report, "```", "",
             f"Spearman({column}, response length) = {rho:+.3f}", ""]
    for title, rows in ((f"Top {top_k} (riskiest)", merged.nlargest(top_k, column)),
                        (f"Bottom {top_k} (safest)", merged.nsmallest(top_k, column))):
        lines += [f"## {title}", "", f"| sample_id | {column} | resp. tokens | prompt | response |", "|---|---|---|---|---|"]
        for _, row in rows.iterrows():
            lines.append(f"| {row['sample_id']} | {row[column]:.4f} | {int(row['n_response_tokens'])} | "
                         f"{_snippet(str(row['prompt']))} | {_snippet(str(row['response']))} |")
        lines.append("")
    return "\n".join(lines)
