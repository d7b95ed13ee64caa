"""Response-length bias of a ranking (paper App. H, Fig. 7).

For each method (a score column, of one or several score files) the samples are cut into the same rank bands
as the experiments (S1 = highest risk), and the analysis reports the mean response length of each band and the
Spearman correlation between score and response length. Unnormalised gradient scores put short responses on top
(their loss, hence their gradient, is inflated by the first- and end-token spikes, App. H.2); a ranking that
tracks risk rather than length has a flat length profile. When an experiment's ``table.csv`` is given, its
metric per band is drawn next to the lengths, as in Fig. 7.

Outputs: ``length_bias.csv`` (method, band, mean / median response tokens, n), ``length_bias.md`` (Spearman
per method) and ``length_bias.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..experiments.partition import PartitionSettings, rank_bands
from .summary import save_figure, spearman

log = logging.getLogger(__name__)

LENGTH = "n_response_tokens"


def band_lengths(scores: pd.DataFrame, column: str, n_bands: int = 5, higher_is_riskier: bool = True
                 ) -> pd.DataFrame:
    """Mean and median response length per rank band of ``column`` (all samples of each band)."""
    if LENGTH not in scores.columns:
        raise ValueError(f"the scores have no {LENGTH} column (a score file from `sqsd-ray score` has it)")
    chosen, _ = rank_bands(scores, PartitionSettings(column=column, n_bands=n_bands,
                                                     higher_is_riskier=higher_is_riskier))
    lengths = scores.set_index("sample_id")[LENGTH]
    chosen = chosen.assign(length=lengths.loc[chosen["sample_id"]].to_numpy())
    table = chosen.groupby("band", sort=False)["length"].agg(["mean", "median", "size"]).reset_index()
    return table.rename(columns={"mean": "mean_tokens", "median": "median_tokens", "size": "n"}).assign(method=column)


def run_length_bias(scores: str | Path, columns: list[str], output_dir: str | Path, n_bands: int = 5,
                    experiment_table: str | Path | None = None) -> Path:
    frame = pd.read_parquet(scores)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables, lines = [], ["# Response-length bias (App. H)", "",
                         "Spearman correlation of each score with the response length (tokens), and the mean "
                         "response length of each rank band (S1 = highest score).", "",
                         "| method | Spearman(score, length) | " + " | ".join(f"S{i + 1}" for i in range(n_bands))
                         + " |", "|---" * (n_bands + 2) + "|"]
    for column in columns:
        table = band_lengths(frame, column, n_bands)
        tables.append(table)
        ok = frame["status"] == "ok" if "status" in frame.columns else np.ones(len(frame), bool)
        rho = spearman(frame.loc[ok, column].to_numpy(float), frame.loc[ok, LENGTH].to_numpy(float))
        lines.append(f"| {column} | {rho:+.3f} | " + " | ".join(f"{v:.0f}" for v in table["mean_tokens"]) + " |")
    result = pd.concat(tables, ignore_index=True)
    result.to_csv(out / "length_bias.csv", index=False)
    (out / "length_bias.md").write_text("\n".join(lines) + "\n\n![lengths per band](length_bias.png)\n")
    metric = pd.read_csv(experiment_table) if experiment_table else None
    _plot(result, columns, n_bands, metric, out / "length_bias.png")
    log.info("length bias written to %s", out)
    return out


def _plot(result: pd.DataFrame, columns: list[str], n_bands: int, metric: pd.DataFrame | None, path: Path) -> None:
    from .summary import pyplot

    plt = pyplot()

    bands = [f"S{i + 1}" for i in range(n_bands)]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6), squeeze=False)
    for ax, column in zip(axes[0], columns):
        rows = result[result["method"] == column]
        ax.bar(bands, rows["mean_tokens"], color="tab:blue", alpha=0.7)
        ax.set_title(f"ranked by {column}", fontsize=10)
        ax.set_ylabel("mean response length (tokens)")
        if metric is not None and {"arm", *bands} <= set(metric.columns) and len(metric):
            twin = ax.twinx()
            for _, row in metric.iterrows():
                twin.plot(bands, [row[b] for b in bands], marker="o", label=str(row["arm"]))
            twin.set_ylabel("experiment metric")
            twin.legend(fontsize=7)
    save_figure(fig, path)


__all__ = ["band_lengths", "run_length_bias"]
