"""The demo's published results as ranges, so a user sees whether their own run falls inside them.

The figures in docs/demo.md come from runs kept as one JSON per seed under ``docs/results/<setting>/seed-N.json``
(written by ``bench/demo_validity.py`` and ``bench/smollm2_seeds.py``). ``collect_ranges`` reduces them to the
min–max per ranking of every band and of Δ, and ``published.json`` beside this module holds that reduction (with
the seeds, the machines and the commits it came from): the demo's report reads it and prints, beside its own
Table 1, the published range of each ranking and whether this run's Δ falls inside it. Floating-point differences
between CPUs move the band fine-tunes (docs/demo.md measures by how much), so a run on another machine can land
outside a range drawn from a handful of seeds; the report says so rather than hiding it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

PUBLISHED = Path(__file__).with_name("published.json")
BANDS = ("S1", "S2", "S3", "S4", "S5")


def setting_name(model: str, world: int | None) -> str:
    """Key of a demo setting: ``organism-world-2``, ``smollm2``."""
    return f"organism-world-{world}" if model == "organism" else model


def collect_ranges(results_dir: Path) -> dict:
    """Min–max per ranking of each band and of Δ over every ``seed-N.json`` in ``results_dir``, and where from."""
    runs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("seed-*.json"))]
    if not runs:
        raise FileNotFoundError(f"no seed-N.json in {results_dir}")
    rows = pd.DataFrame([{"seed": run["seed"], **row} for run in runs for row in run["table"]])
    ranges = {}
    for ranking, part in rows.groupby("ranking", sort=False):
        # unrounded: a run that repeats a published seed must compare equal to it (the report rounds for display)
        ranges[ranking] = {key: [float(part[key].min()), float(part[key].max())]
                           for key in (*BANDS, "delta")}
        ranges[ranking]["mono"] = f"{int((part['mono'] == '✓').sum())}/{len(part)}"
        ranges[ranking]["seeds"] = sorted(int(s) for s in part["seed"])
    return {"seeds": sorted(run["seed"] for run in runs),
            "machines": sorted({run["machine"]["cpu"] for run in runs}),
            "commits": sorted({run["commit"] for run in runs}), "rankings": ranges}


def load_published(setting: str, path: Path = PUBLISHED) -> dict | None:
    """The published ranges of one setting, or None when none are published."""
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(setting)


def with_published_range(table: pd.DataFrame, published: dict | None) -> pd.DataFrame:
    """Table 1 (arm, S1…S5, delta, mono) with the published Δ range of each ranking and whether this run's Δ
    falls inside it ("—" for a ranking with no published figures)."""
    if published is None:
        return table
    ranges = published["rankings"]

    def span(arm: str) -> str:
        low, high = ranges[arm]["delta"] if arm in ranges else (None, None)
        return "—" if low is None else f"{low:+.1f} … {high:+.1f}"

    def inside(arm: str, delta: float) -> str:
        if arm not in ranges:
            return "—"
        low, high = ranges[arm]["delta"]
        return "✓" if low - 1e-9 <= delta <= high + 1e-9 else "✗"

    seeds = ",".join(map(str, published["seeds"]))
    return table.assign(**{f"published Δ (seeds {seeds})": [span(a) for a in table["arm"]],
                           "inside": [inside(a, d) for a, d in zip(table["arm"], table["delta"])]})


__all__ = ["collect_ranges", "load_published", "setting_name", "with_published_range"]
