"""S1…S5: risk bands of a scored corpus, written as fine-tuning sets (paper §5.3.1, Table 1).

The scored samples are ranked by a score column (``sqsd`` by default, highest risk first; an ablation column
such as ``danger_proj`` or a baseline's score works the same) and cut into ``n_bands`` contiguous rank bands
of equal size. From each band ``subset_size`` samples are drawn: ``uniform`` takes evenly spaced ranks (the
paper: "uniformly sampled from highest to lowest risk rankings"; with a 5k corpus and 1000 per band it is the
whole band), ``random`` a seeded random subset, ``top`` the band's head. Samples without a finite score
(status other than ok) are left out and counted.

Each subset is written as JSONL in the ``messages`` schema (the normalised sample, id kept), so any corpus
format fine-tunes the same way, plus ``partition.csv`` (sample_id, rank, band, score) and ``partition.json``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..config import ConfigError, help_field
from ..data.records import DataConfig, Sample, load_samples

log = logging.getLogger(__name__)


@dataclass
class PartitionSettings:
    column: str = help_field("sqsd", help="score column to rank by (sqsd, sqsd_raw, danger_proj, ...; experiments add neg_safety_proj)")
    higher_is_riskier: bool = help_field(True, help="rank descending (true for SQSD and the danger projection)")
    n_bands: int = help_field(5, help="number of rank bands S1 (riskiest) ... Sn")
    subset_size: int | None = help_field(None, help="samples per band (paper: 1000); default the whole band")
    sampling: Literal["uniform", "random", "top"] = help_field(
        "uniform", help="uniform: evenly spaced ranks within the band; random: seeded; top: the band's head"
    )
    seed: int = help_field(0, help="seed of random sampling")

    def __post_init__(self) -> None:
        if self.n_bands < 2:
            raise ConfigError(f"partition.n_bands must be >= 2, got {self.n_bands}")
        if self.subset_size is not None and self.subset_size < 1:
            raise ConfigError(f"partition.subset_size must be >= 1 or null, got {self.subset_size}")


@dataclass
class PartitionConfig:
    scores: str = help_field("", help="scores.parquet of a `score` run (or any Parquet with sample_id + the column)")
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionSettings = field(default_factory=PartitionSettings)
    output_dir: str = help_field("runs/partition", help="where S1.jsonl ... and partition.csv/json are written")


def rank_bands(scores: pd.DataFrame, settings: PartitionSettings) -> tuple[pd.DataFrame, int]:
    """Rows (sample_id, score, rank, band) of the chosen samples, and the number left out for lack of a score."""
    column = settings.column
    if column not in scores.columns:
        raise ConfigError(f"partition.column {column!r} is not a column of the scores; columns: {sorted(scores.columns)}")
    if "sample_id" not in scores.columns:
        raise ValueError("the scores have no sample_id column")
    values = pd.to_numeric(scores[column], errors="coerce").to_numpy(dtype=float)
    usable = np.isfinite(values)
    if "status" in scores.columns:
        usable &= (scores["status"] == "ok").to_numpy()
    table = pd.DataFrame({"sample_id": scores["sample_id"].to_numpy()[usable], "score": values[usable]})
    excluded = int((~usable).sum())
    if len(table) < settings.n_bands:
        raise ValueError(f"only {len(table)} scored samples for {settings.n_bands} bands")
    # ties broken by sample_id so the ranking does not depend on row order
    table = table.sort_values(["score", "sample_id"], ascending=[not settings.higher_is_riskier, True],
                              kind="mergesort").reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    edges = np.linspace(0, len(table), settings.n_bands + 1).round().astype(int)
    chosen = []
    rng = random.Random(settings.seed)
    for band in range(settings.n_bands):
        members = table.iloc[edges[band]:edges[band + 1]]
        size = settings.subset_size or len(members)
        if size > len(members):
            raise ValueError(f"band S{band + 1} has {len(members)} samples, fewer than subset_size {size}")
        if settings.sampling == "top":
            picked = members.iloc[:size]
        elif settings.sampling == "random":
            picked = members.iloc[sorted(rng.sample(range(len(members)), size))]
        else:
            picked = members.iloc[np.floor(np.arange(size) * len(members) / size).astype(int)]
        chosen.append(picked.assign(band=f"S{band + 1}"))
    return pd.concat(chosen, ignore_index=True), excluded


def _as_record(sample: Sample) -> dict:
    return {"id": sample.sample_id, "messages": sample.conversation()}


def run_partition(cfg: PartitionConfig) -> Path:
    scores = pd.read_parquet(cfg.scores)
    chosen, excluded = rank_bands(scores, cfg.partition)
    samples, report = load_samples(cfg.data)
    by_id = {s.sample_id: s for s in samples}
    missing = [sid for sid in chosen["sample_id"] if sid not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} scored sample(s) are not in the corpus {cfg.data.path} (first: "
                         f"{missing[0]!r}); partition with the data config the scores were made from")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bands = {}
    for band, rows in chosen.groupby("band", sort=False):
        path = out / f"{band}.jsonl"
        with path.open("w") as f:
            for sid in rows["sample_id"]:
                f.write(json.dumps(_as_record(by_id[sid]), ensure_ascii=False) + "\n")
        bands[band] = {"path": str(path), "n": len(rows), "score_max": float(rows["score"].max()),
                       "score_min": float(rows["score"].min()), "rank_first": int(rows["rank"].min()),
                       "rank_last": int(rows["rank"].max())}
    chosen.to_csv(out / "partition.csv", index=False)
    summary = {"scores": cfg.scores, "column": cfg.partition.column, "sampling": cfg.partition.sampling,
               "n_scored": int(len(scores)), "excluded_without_score": excluded, "bands": bands,
               "corpus_report": report.to_dict()}
    (out / "partition.json").write_text(json.dumps(summary, indent=1))
    log.info("partition: %s", ", ".join(f"{b} n={v['n']} score {v['score_max']:.3g}..{v['score_min']:.3g}"
                                         for b, v in bands.items()))
    if excluded:
        log.warning("%d scored samples had no finite %s and were left out", excluded, cfg.partition.column)
    return out


def band_paths(partition_dir: str | Path) -> dict[str, Path]:
    """S1 -> path, ... of a partition directory, in band order."""
    summary = json.loads((Path(partition_dir) / "partition.json").read_text())
    return {band: Path(info["path"]) for band, info in sorted(summary["bands"].items(),
                                                                  key=lambda kv: int(kv[0][1:]))}


__all__ = ["PartitionConfig", "PartitionSettings", "band_paths", "rank_bands", "run_partition"]
