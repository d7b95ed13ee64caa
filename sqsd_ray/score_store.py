"""The run directory's score parts: resumable writes, identity checks, and the final consolidated file.

Scores are written as part files under ``<dir>/parts/`` as they are produced (by the in-process loop or by
Ray Data's Parquet writer), next to ``manifest.json`` holding the run's *identity*: the fingerprints of the
scoring-relevant config, the model, both directions and the package version. Re-running the same job
resumes: ids already in readable parts are skipped. A job whose identity differs refuses to resume and says
what differs. ``consolidate`` reads every part, keeps each ``sample_id`` once, moves tokenisation skips to the
data report, and writes ``scores.parquet``.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

STATUS_SKIPPED = "skipped"  # a row that tokenisation skipped (reason in `skip_reason`); not a score
INT_COLUMNS = ("n_response_tokens", "n_tokens", "n_prompt_tokens", "zero_norm_modules", "padded_length")
INTERNAL_COLUMNS = ("skip_reason", "padded_length", "model_weights", "worker_peak_rss_mb")


class ResumeMismatchError(ValueError):
    """The run directory holds parts of a different job; the message names what differs."""


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class ScoreStore:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.parts_dir = self.dir / "parts"
        self.manifest_path = self.dir / "manifest.json"
        self.final_path = self.dir / "scores.parquet"

    def begin(self, identity: dict[str, Any], overwrite: bool, resume: bool) -> set[str]:
        """Prepare the directory; returns the sample ids already scored (empty unless resuming)."""
        has_parts = self.parts_dir.exists() and any(self.parts_dir.glob("*.parquet"))
        if overwrite:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self.final_path.unlink(missing_ok=True)
            self.manifest_path.unlink(missing_ok=True)
        elif has_parts or self.final_path.exists():
            if not resume:
                raise FileExistsError(
                    f"{self.dir} already holds scores; set output.overwrite=true to replace them, "
                    "output.resume=true to continue, or choose another output.dir"
                )
            if not self.manifest_path.exists():
                raise ResumeMismatchError(f"{self.dir} holds scores but no manifest.json; cannot tell what job wrote them")
            old = json.loads(self.manifest_path.read_text())
            differences = _diff(old, identity)
            if differences:
                raise ResumeMismatchError(
                    f"{self.dir} holds scores of a different job; refusing to resume. Differences (stored -> now): "
                    + "; ".join(differences)
                    + ". Use output.overwrite=true to start over or another output.dir."
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path.write_text(json.dumps(identity, indent=2, sort_keys=True))
        done = self.done_ids()
        if done:
            log.info("resuming: %d samples already scored in %s", len(done), self.parts_dir)
        return done

    def _readable_parts(self) -> list[Path]:
        parts = []
        for path in sorted(self.parts_dir.glob("*.parquet")):
            try:
                pq.read_metadata(path)
            except Exception as err:  # a part cut short by a crash: its rows are rescored
                log.warning("removing unreadable part %s (%s); its samples will be scored again", path, err)
                path.unlink()
                continue
            parts.append(path)
        return parts

    def done_ids(self) -> set[str]:
        ids: set[str] = set()
        for path in self._readable_parts():
            ids.update(pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist())
        return ids

    def write_part(self, df: pd.DataFrame) -> Path:
        """Atomic part write (temp file + rename): a crash leaves either the whole part or none."""
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.parts_dir / f".{name}.tmp"
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
        tmp.rename(self.parts_dir / name)
        return self.parts_dir / name

    def read_all(self) -> pd.DataFrame:
        frames = [pq.read_table(p).to_pandas() for p in self._readable_parts()]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def consolidate(self, metadata: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Write scores.parquet (each sample_id once, sorted); returns it and facts for run.json."""
        df = self.read_all()
        facts: dict[str, Any] = {"parts": len(self._readable_parts()), "duplicate_rows_dropped": 0}
        if not len(df):
            raise RuntimeError(f"no scores in {self.parts_dir}: nothing was scored")
        n_before = len(df)
        df = df.drop_duplicates("sample_id", keep="first")
        facts["duplicate_rows_dropped"] = n_before - len(df)
        skipped = df[df["status"] == STATUS_SKIPPED] if "status" in df else df.iloc[:0]
        facts["tokenisation_skips"] = skipped["skip_reason"].value_counts().to_dict() if len(skipped) else {}
        facts["tokenisation_skip_examples"] = skipped["sample_id"].head(5).tolist()
        df = df[df["status"] != STATUS_SKIPPED].copy()
        for col in INT_COLUMNS:  # parts holding skipped rows carried NaN in these; the scored rows are whole
            if col in df:
                df[col] = df[col].astype("int32")
        if "padded_length" in df and len(df):
            facts["padding_fraction"] = float(1.0 - df["n_tokens"].sum() / df["padded_length"].sum())
        if "worker_peak_rss_mb" in df:
            facts["worker_peak_rss_mb"] = float(df["worker_peak_rss_mb"].max())
        if "model_weights" in df:
            weights = sorted(set(df["model_weights"].dropna()))
            facts["model_weights"] = weights
            if len(weights) > 1:
                raise RuntimeError(f"scoring workers saw different model weights: fingerprints {weights}")
            if weights:  # the loaded weights' fingerprint, next to the driver's identity of the model
                metadata = {**metadata, "fingerprints": {**metadata.get("fingerprints", {}), "model_weights": weights[0]}}
        df = df.drop(columns=[c for c in INTERNAL_COLUMNS if c in df])
        df = df.sort_values("sample_id", kind="stable").reset_index(drop=True)
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"sqsd_ray": json.dumps(metadata).encode()}
        )
        tmp = self.dir / ".scores.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.rename(self.final_path)
        facts["metadata"] = metadata
        return df, facts
