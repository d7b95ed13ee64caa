"""The run directory of a score job: durable, verified, exclusive parts, and the final consolidated file.

    <parent>/.<name>.lock          who runs on <name> now (pid, host, start); an flock held while it lives
    <parent>/.<name>.staging-<id>/ an overwrite in progress: the new run, swapped in only once it succeeded
    <name>/
      manifest.json    the job's identity (config, model, directions fingerprints) and one fingerprint per record
      parts/           part-<uuid>.parquet, each written whole (temp file + rename) as soon as it is scored
      parts/ledger.jsonl   one line per part: name, rows, sha256, written before the part's rename
      set_aside/       parts that failed their checksum, kept for inspection (their samples are scored again)
      scores.parquet   each current sample_id once; its sha256 is in run.json

What survives what. A part reaches ``parts/`` whole or not at all, and only once the ledger holds its checksum,
so an interruption (Ctrl-C, kill -9, a lost node) keeps every part written before it, and rerunning the same
command resumes from them. Every resume and every consolidation checks each part against the ledger; a part
that fails is moved to ``set_aside/`` with the reason, named in the log, and its samples are scored again.
Each score row carries the fingerprint of the record content it was computed from: a record whose text changed
is scored again, a record no longer in the corpus is left out of ``scores.parquet``. An overwrite never touches
the earlier run until the new one has succeeded; rerunning the same command resumes an interrupted overwrite.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .parts import PartLedger, file_sha256

log = logging.getLogger(__name__)

STORE_FORMAT = 2  # parts with record fingerprints and a checksum ledger
STATUS_SKIPPED = "skipped"  # a row that tokenisation skipped (reason in `skip_reason`); not a score
INT_COLUMNS = ("n_response_tokens", "n_tokens", "n_prompt_tokens", "zero_norm_modules", "padded_length")
RECORD_FP = "record_fp"  # the content fingerprint a row was scored from (parts only)
SCORED_ON = "ray_node_id"  # the Ray node whose actor scored a row (parts only; absent for in-process parts)
INTERNAL_COLUMNS = ("skip_reason", "padded_length", "model_weights", "worker_peak_rss_mb", "kernel", "batch_layout",
                    "layout_calibration", RECORD_FP, SCORED_ON)


class ResumeMismatchError(ValueError):
    """The run directory holds parts of a different job; the message names what differs."""


class RunLockedError(FileExistsError):
    """Another run holds the run directory's lock; the message names the holder."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C while scoring; the message says how much was kept and how to resume."""


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- lock


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live holder from a new process that reused its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _describe_holder(holder: Mapping[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command', '?')})")


class RunLock:
    """One run at a time per run directory: a lock file beside it, flock'ed by its holder while it lives.

    The flock dies with its process (kill -9 included), so on one host a lock whose holder is gone is taken over,
    and the log says whose it was. A lock written from another host cannot be checked from here (its flock may not
    reach this host over a network file system): it is refused, naming the holder, unless ``break_lock``.
    """

    def __init__(self, run_dir: Path):
        run_dir = Path(os.path.abspath(run_dir))
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self.run_dir = run_dir
        self._fd: int | None = None

    def acquire(self, break_lock: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise RunLockedError(f"{self.run_dir} is in use by {_describe_holder(holder)}; wait for that run to "
                                     "end or stop it, or choose another output.dir") from None
            try:  # the file we locked must still be the one at the path (a releasing holder unlinks it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        holder = self._read(fd)
        if holder:
            if holder.get("host") != socket.gethostname() and not break_lock:
                os.close(fd)
                raise RunLockedError(
                    f"{self.run_dir} is locked by {_describe_holder(holder)}, another host: this host cannot tell "
                    "whether that run is alive. If it is gone, rerun with --break-lock (output.break_lock=true)")
            log.warning("taking over the lock of %s: its holder, %s, is gone%s", self.run_dir, _describe_holder(holder),
                        " (--break-lock)" if holder.get("host") != socket.gethostname() else "")
        me = {"pid": os.getpid(), "pid_start": _process_start(os.getpid()), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        raw = os.pread(fd, 1 << 16, 0)
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return {"pid": "?", "host": "?", "started": "?", "command": f"unreadable lock file: {raw[:80]!r}"}

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def holder(self) -> dict[str, Any] | None:
        """The live holder of the lock, or None (for ``verify``)."""
        if not self.path.exists():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._read(fd) or {"pid": "?"}
            fcntl.flock(fd, fcntl.LOCK_UN)
            holder = self._read(fd)
            return holder if holder and holder.get("host") != socket.gethostname() else None
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------- the store


@dataclass
class ResumePlan:
    """What ``ScoreStore.begin`` found: the ids to skip, and what it threw out."""

    done: set[str] = field(default_factory=set)
    changed: int = 0  # records whose content changed since they were scored: scored again
    removed: int = 0  # scored records no longer in the corpus: left out of scores.parquet
    set_aside: list[str] = field(default_factory=list)  # parts that failed their check, with the reason
    staging: bool = False  # an overwrite: the run is built beside the earlier one

    def to_dict(self) -> dict[str, Any]:
        return {"kept": len(self.done), "changed_rescored": self.changed, "removed_dropped": self.removed,
                "parts_set_aside": self.set_aside, "staged_overwrite": self.staging}


class ScoreStore:
    """The run directory's parts, their ledger, and consolidation.

    ``begin`` picks the directory the run writes to (the run directory itself, or a staging directory beside it
    for an overwrite), ``write_part`` adds scores durably, ``consolidate`` writes ``scores.parquet`` and
    ``publish`` swaps a staged overwrite in. Only the lock holder should call them.
    """

    def __init__(self, out_dir: str | Path):
        self.final_dir = Path(out_dir)
        self._use(self.final_dir)
        self.records: dict[str, str] = {}

    def _use(self, directory: Path) -> None:
        self.dir = directory
        self.ledger = PartLedger(directory)
        self.parts_dir = self.ledger.parts_dir
        self.manifest_path = directory / "manifest.json"
        self.final_path = directory / "scores.parquet"

    def staging_dir(self, identity: dict[str, Any]) -> Path:
        from ..config import stable_hash

        return self.final_dir.parent / f".{self.final_dir.name}.staging-{stable_hash(identity, 12)}"

    @staticmethod
    def holds_a_run(directory: Path) -> bool:
        return directory.is_dir() and any(directory.iterdir())

    def begin(self, identity: dict[str, Any], records: Mapping[str, str], overwrite: bool, resume: bool) -> ResumePlan:
        """Prepare the run; ``records`` maps every current sample_id to its content fingerprint."""
        self.records = dict(records)
        identity = {**identity, "store_format": STORE_FORMAT}
        self._finish_interrupted_swap()
        if self.final_dir.exists() and not self.final_dir.is_dir():
            from ..config import ConfigError

            raise ConfigError(f"output.dir: {self.final_dir} is a file, not a directory; choose another output.dir")
        staging = False
        if overwrite and self.holds_a_run(self.final_dir) and not self._unfinished_run_of(identity):
            staging = True
            self._use(self.staging_dir(identity))  # the earlier run stays as it is until this one succeeds
            others = [p for p in self.final_dir.parent.glob(f".{self.final_dir.name}.staging-*") if p != self.dir]
            if others:
                log.warning("unfinished overwrites of other jobs beside %s: %s (rerun their command to finish one, "
                            "or delete them)", self.final_dir, ", ".join(p.name for p in others))
        has_scores = self.final_path.exists() or any(self.parts_dir.glob("*.parquet"))
        if has_scores and not (resume or staging):
            raise FileExistsError(
                f"{self.dir} already holds scores; set output.overwrite=true to replace them, "
                "output.resume=true to continue, or choose another output.dir")
        if has_scores:
            old = self._read_manifest_identity()
            differences = _diff(old, identity)
            if differences:
                raise ResumeMismatchError(
                    f"{self.dir} holds scores of a different job; refusing to resume. Differences (stored -> now): "
                    + "; ".join(differences)
                    + ". Use output.overwrite=true to start over or another output.dir.")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.manifest_path, json.dumps({"identity": identity, "records": self.records}, indent=1,
                                                     sort_keys=True))
        plan = ResumePlan(staging=staging)
        plan.set_aside = self.check_parts()
        scored = self._scored_fingerprints()
        for sid, fp in scored.items():
            if sid not in self.records:
                plan.removed += 1
            elif fp == self.records[sid]:
                plan.done.add(sid)
            else:
                plan.changed += 1
        if scored:
            log.info("resuming in %s: %d samples kept, %d changed since scored (scored again), %d no longer in the "
                     "corpus (dropped)", self.dir, len(plan.done), plan.changed, plan.removed)
        return plan

    def _unfinished_run_of(self, identity: dict[str, Any]) -> bool:
        """The run directory holds an interrupted run of this very job (no scores.parquet yet): an overwrite resumes
        it in place rather than starting over beside it."""
        if self.final_path.exists() or not self.manifest_path.exists():
            return False
        try:
            return not _diff(self._read_manifest_identity(), identity)
        except ValueError:
            return False

    def _read_manifest_identity(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            raise ResumeMismatchError(f"{self.dir} holds scores but no manifest.json; cannot tell what job wrote them")
        manifest = json.loads(self.manifest_path.read_text())
        return manifest.get("identity", manifest)  # an older run: the whole file was the identity

    # ---- parts (their files and ledger: ``PartLedger``)

    def check_parts(self) -> list[str]:
        """Check every part against the ledger; move failing ones to ``set_aside/``. Returns what was set aside.

        Also forgets what an interrupted writer left: temp files, and ledger lines of parts never renamed into place.
        Only the lock holder calls this, so no other writer is mid-part."""
        for tmp in [*self.parts_dir.glob(".*.tmp"), *self.dir.glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)
        ledger = self.ledger.entries()
        for name in self.ledger.missing(ledger):
            self.ledger.append({"name": name, "dropped": "interrupted before its rename; its samples are scored again"})
        set_aside = []
        for path in self.ledger.parts():
            problem = self.ledger.problem(path, ledger.get(path.name))
            if problem is not None:
                set_aside.append(self.ledger.set_aside(path, problem))
                log.warning("set aside part %s of %s: %s; its samples are scored again (the file is kept in %s)",
                            path.name, self.dir, problem, self.ledger.set_aside_dir)
        return set_aside

    def _scored_fingerprints(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for path in self.ledger.parts():
            table = pq.read_table(path, columns=["sample_id", RECORD_FP])
            out.update(zip(table.column("sample_id").to_pylist(), table.column(RECORD_FP).to_pylist()))
        return out

    def done_ids(self) -> set[str]:
        """Ids scored from their current content (``begin`` gave the corpus)."""
        return {sid for sid, fp in self._scored_fingerprints().items() if self.records.get(sid) == fp}

    def write_part(self, df: pd.DataFrame) -> Path:
        """Add scores durably (``PartLedger.write``: the whole part or none of it survives a crash), each row with
        the fingerprint of the record content it was scored from."""
        df = df.copy()
        missing = [sid for sid in df["sample_id"] if sid not in self.records]
        if missing:
            raise KeyError(f"scores for ids not in this run's corpus: {missing[:5]}")
        df[RECORD_FP] = [self.records[sid] for sid in df["sample_id"]]
        return self.ledger.write(df)

    def read_all(self) -> pd.DataFrame:
        frames = [pq.read_table(p).to_pandas() for p in self.ledger.parts()]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def consolidate(self, metadata: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Check the parts again, then write scores.parquet: each current sample_id once, from its current
        content, sorted. Returns it and facts for run.json (its sha256 among them)."""
        set_aside = self.check_parts()
        if set_aside:  # damaged between begin and now: not silently consolidated without them
            raise RuntimeError(f"parts of {self.dir} failed their check while scoring: {'; '.join(set_aside)}; "
                               "rerun the same command to score their samples again")
        df = self.read_all()
        facts: dict[str, Any] = {"parts": len(self.ledger.parts()), "duplicate_rows_dropped": 0}
        if not len(df):
            raise RuntimeError(f"no scores in {self.parts_dir}: nothing was scored")
        current = df[RECORD_FP].to_numpy() == df["sample_id"].map(self.records).to_numpy()
        facts["stale_rows_left_out"] = int((~current).sum())
        df = df[current]
        n_before = len(df)
        df = df.drop_duplicates("sample_id", keep="first")
        facts["duplicate_rows_dropped"] = n_before - len(df)
        missing = set(self.records) - set(df["sample_id"])
        if missing:
            raise RuntimeError(f"{len(missing)} samples of the corpus have no score in {self.parts_dir} "
                               f"(e.g. {sorted(missing)[:3]}); rerun the same command to score them")
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
        if "kernel" in df:  # scored rows per reduction (compiled or eager, and why); kept rows as they were scored
            facts["kernel"] = {k: int(v) for k, v in df["kernel"].dropna().value_counts().items()}
        if "batch_layout" in df:  # rows per batch layout, and each worker's calibration (batching.layout: auto)
            facts["batch_layout"] = {k: int(v) for k, v in df["batch_layout"].dropna().value_counts().items()}
        if "layout_calibration" in df:
            calibrations = [json.loads(c) for c in df["layout_calibration"].dropna().unique() if c]
            if calibrations:
                facts["layout_calibration"] = calibrations
        if SCORED_ON in df:  # counted over the rows kept, so the counts add up to scores.parquet's rows
            facts["rows_per_node"] = {str(k): int(v) for k, v in
                                      df[SCORED_ON].fillna("in_process").value_counts().sort_index().items()}
        if "model_weights" in df:
            weights = sorted(set(df["model_weights"].dropna()))
            facts["model_weights"] = weights
            if len(weights) > 1:
                raise RuntimeError(f"scoring workers saw different model weights: fingerprints {weights}")
            if weights:  # the loaded weights' fingerprint, next to the driver's identity of the model
                fingerprints = {**metadata.get("fingerprints", {}), "model_weights": weights[0]}
                metadata = {**metadata, "fingerprints": fingerprints}
        df = df.drop(columns=[c for c in INTERNAL_COLUMNS if c in df])
        df = df.sort_values("sample_id", kind="stable").reset_index(drop=True)
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"sqsd_ray": json.dumps(metadata).encode()}
        )
        tmp = self.dir / f".scores.parquet.{uuid.uuid4().hex[:12]}.tmp"
        pq.write_table(table, tmp)
        facts["scores_sha256"] = file_sha256(tmp)
        os.replace(tmp, self.final_path)
        facts["metadata"] = metadata
        return df, facts

    # ---- overwrite: build beside, swap in on success

    def _swap_marker(self, staging: Path) -> Path:
        return staging / ".complete"

    def publish(self) -> Path:
        """Swap a staged overwrite in place of the earlier run (a no-op for a run written in place)."""
        if self.dir == self.final_dir:
            return self.final_dir
        staging = self.dir
        self._swap_marker(staging).touch()  # from here on, an interrupted swap is finished, not undone
        replaced = self.final_dir.parent / f".{self.final_dir.name}.replaced-{uuid.uuid4().hex[:12]}"
        if self.final_dir.exists():  # (removed by hand while this run worked: nothing to set aside)
            os.replace(self.final_dir, replaced)
        os.replace(staging, self.final_dir)
        self._swap_marker(self.final_dir).unlink()
        shutil.rmtree(replaced, ignore_errors=True)
        self._use(self.final_dir)
        return self.final_dir

    def _finish_interrupted_swap(self) -> None:
        """A crash between publish's two renames leaves no run directory: finish the swap, or put the old run back."""
        parent, name = self.final_dir.parent, self.final_dir.name
        replaced = sorted(parent.glob(f".{name}.replaced-*"))
        if self.final_dir.exists():
            for old in replaced:  # the swap went through; only the clean-up was cut short
                shutil.rmtree(old, ignore_errors=True)
            return
        complete = [p for p in parent.glob(f".{name}.staging-*") if self._swap_marker(p).exists()]
        if complete:
            os.replace(complete[0], self.final_dir)
            self._swap_marker(self.final_dir).unlink()
            log.warning("finished an overwrite of %s that was interrupted while swapping it in", self.final_dir)
        elif replaced:
            os.replace(replaced[-1], self.final_dir)
            log.warning("restored the earlier run of %s (an overwrite was interrupted while swapping)", self.final_dir)
        for old in parent.glob(f".{name}.replaced-*"):
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def locked_run(out_dir: str | Path, break_lock: bool = False) -> Iterator[RunLock]:
    lock = RunLock(Path(out_dir))
    lock.acquire(break_lock=break_lock)
    try:
        yield lock
    finally:
        lock.release()


def verify_run(run_dir: Path) -> list[str]:
    """Everything wrong with a finished score run directory (empty when it checks out)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return [f"{run_dir} is not a directory"]
    problems = []
    holder = RunLock(run_dir).holder()
    if holder:
        problems.append(f"a run is in progress on {run_dir}: {_describe_holder(holder)}")
    store = ScoreStore(run_dir)
    try:
        manifest = json.loads(store.manifest_path.read_text())
        records = manifest["records"]
    except (OSError, ValueError, KeyError) as err:
        return problems + [f"{store.manifest_path}: missing or unreadable ({err})"]
    ledger = store.ledger.entries()
    for path in store.ledger.parts():
        problem = store.ledger.problem(path, ledger.get(path.name))
        if problem:
            problems.append(f"part {path}: {problem}")
    for name in store.ledger.missing(ledger):
        problems.append(f"part {store.parts_dir / name} is in the ledger but missing")
    run_json = run_dir / "run.json"
    if not store.final_path.exists():
        return problems + [f"{store.final_path} is missing: the run did not finish (rerun its command)"]
    try:
        run_info = json.loads(run_json.read_text())
        expected = run_info["scores_sha256"]
    except (OSError, ValueError, KeyError) as err:
        return problems + [f"{run_json}: missing or without scores_sha256 ({err})"]
    sha = file_sha256(store.final_path)
    if sha != expected:
        return problems + [f"{store.final_path}: checksum {sha[:12]}… differs from run.json's {expected[:12]}…"]
    ids = pq.read_table(store.final_path, columns=["sample_id"]).column("sample_id").to_pylist()
    if len(ids) != len(set(ids)):
        problems.append(f"{store.final_path}: {len(ids) - len(set(ids))} duplicate sample_id rows")
    stray = set(ids) - set(records)
    if stray:
        problems.append(f"{store.final_path}: {len(stray)} ids not in the run's corpus (e.g. {sorted(stray)[:3]})")
    skipped = sum(run_info.get("data_report", {}).get("tokenisation_skipped", {}).values())
    if len(set(ids)) + skipped < len(records):
        problems.append(f"{store.final_path}: {len(records) - len(set(ids)) - skipped} records of the corpus have "
                        "neither a score nor a recorded tokenisation skip")
    return problems
