"""The parts of a score run: ``parts/part-<uuid>.parquet`` files and ``parts/ledger.jsonl``, their checksum ledger.

A part is written whole: a temp file, its row count and sha256 appended to the ledger, then the rename. So a part in
``parts/`` is one the ledger vouches for, and a ledger line without its part is a write cut short before the rename.
Later entries for the same name add to the earlier ones (``set_aside``, ``dropped``). ``ScoreStore`` (``store``)
owns the run directory around them.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected(ledger_entry: Mapping[str, Any]) -> bool:
    """A ledger entry whose part should be in parts/ (not set aside, not dropped as never renamed)."""
    return "set_aside" not in ledger_entry and "dropped" not in ledger_entry


class PartLedger:
    """The part files of one run directory and the ledger that vouches for them."""

    def __init__(self, run_dir: Path):
        self.parts_dir = run_dir / "parts"
        self.path = self.parts_dir / "ledger.jsonl"
        self.set_aside_dir = run_dir / "set_aside"

    def parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet"))

    def entries(self) -> dict[str, dict[str, Any]]:
        """Part name -> its ledger entries merged, later ones winning."""
        entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a crash: its part never got its rename
                    continue
                entries[entry["name"]] = {**entries.get(entry["name"], {}), **entry}
        return entries

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def missing(self, entries: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Names the ledger expects in parts/ that are not there."""
        return [name for name, entry in entries.items() if _expected(entry) and not (self.parts_dir / name).exists()]

    @staticmethod
    def problem(path: Path, entry: Mapping[str, Any] | None) -> str | None:
        """What is wrong with the part at ``path`` given its ledger entry, or None."""
        if entry is None:
            return "not in the ledger (written by another program, or its ledger line was lost)"
        sha = file_sha256(path)
        if sha != entry.get("sha256"):
            return f"checksum mismatch (ledger {str(entry.get('sha256'))[:12]}…, file {sha[:12]}…)"
        try:
            rows = pq.read_metadata(path).num_rows
        except Exception as err:  # noqa: BLE001 - any unreadable footer is the same finding
            return f"unreadable ({err})"
        if rows != entry.get("rows"):
            return f"{rows} rows where the ledger says {entry.get('rows')}"
        return None

    def set_aside(self, path: Path, problem: str) -> str:
        """Move a failing part to ``set_aside/``, noting why in the ledger and in ``set_aside/reasons.txt``."""
        self.set_aside_dir.mkdir(exist_ok=True)
        os.replace(path, self.set_aside_dir / path.name)
        self.append({"name": path.name, "set_aside": problem})
        note = f"{path.name}: {problem}"
        with open(self.set_aside_dir / "reasons.txt", "a") as reasons:
            reasons.write(note + "\n")
        return note

    def write(self, df: pd.DataFrame) -> Path:
        """Durable part write: temp file, checksum into the ledger, then the rename. A crash at any point leaves
        the whole part (in the ledger) or none of it."""
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.parts_dir / f".{name}.tmp"
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        self.append({"name": name, "rows": len(df), "sha256": file_sha256(tmp)})
        os.replace(tmp, self.parts_dir / name)
        return self.parts_dir / name
