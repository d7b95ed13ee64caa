"""Rebuild ``sqsd_ray/demo/published.json`` from the per-seed results kept under ``docs/results/``.

Each folder ``docs/results/<setting>/`` (``organism-world-2``, ``organism-world-1``, ``smollm2``) holds one
``seed-N.json`` per documented seed; its ranges (min–max per ranking of every band and of Δ) are what the demo's
report prints beside its own Table 1.

    PYTHONPATH=. python bench/publish_ranges.py
"""

from __future__ import annotations

import json
from pathlib import Path

from sqsd_ray.demo.published import PUBLISHED, collect_ranges

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def main() -> int:
    published = {folder.name: collect_ranges(folder) for folder in sorted(RESULTS.iterdir())
                 if folder.is_dir() and any(folder.glob("seed-*.json"))}
    PUBLISHED.write_text(json.dumps(published, indent=1, ensure_ascii=False) + "\n")
    for name, entry in published.items():
        print(f"{name}: seeds {entry['seeds']}, {len(entry['rankings'])} rankings")
    print(f"wrote {PUBLISHED}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
