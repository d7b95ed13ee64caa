"""Fault drills for ``sqsd-ray score`` on Ray: the ways a long scoring run gets disturbed, one after another, in one go.

    python bench/faults.py                                   # 387 Dolly samples, tiny-llama, local Ray, 2 actors, CPU
    python bench/faults.py --faults 1,3 --work /tmp/faults   # some of them; keep the run directories and logs
    python bench/faults.py --layers 4                        # a longer scoring phase (~70 s on 2 busy cores)
    python bench/faults.py --out faults.json                 # the rows as JSON too

Corpus: the 387 Dolly records in ../shared/data/benign/dolly_387.jsonl, copied into the work directory with an
``id`` added to each record (without one the sample_id is a content hash, and an edited record would read as one
removed and one added). With ``data.max_length`` 512 the byte tokenizer skips the records whose prompt alone is
longer: they are recorded as skipped, not scored, and count as accounted for. Model: the built-in tiny-llama
(``--hidden-size``, ``--layers``) with seeded random rank-8 directions: this checks that no score is lost,
doubled or changed, not what the scores mean. Ray: a private local Ray per run, 2 CPUs, ``ray.num_actors`` 2 ×
0.75 CPU, 16 rows per call, so a run writes one small part per block.

Every run is the real CLI (``python -m sqsd_ray.cli score``) in a process of its own, in its own process group;
its stderr is read as it comes, and "at half" means once the driver's progress bar reports half of the corpus
scored (written to disk). Faults, one table row each:

    0  the undisturbed run: the reference every other row is compared with
    1  SIGINT to the driver at half (Ctrl-C): exit 130 and a message saying what was kept; rerun resumes
    2  kill -9 of the driver at half: how many of its Ray processes outlive it (10 s later); rerun resumes
    3  kill -9 of one scoring actor at half: the run finishes by itself (actor restarted, call retried)
    4  a complete run with two damaged parts (16 bytes overwritten mid-file; the lowest bit of one stored float64
       score flipped): ``sqsd-ray verify`` names both, the rerun sets them aside and scores their samples again
    5  a second run on the same output.dir while the first runs: refused (exit 2) naming the first one's pid; where
       the first run ended before the second reached the lock, the row says so, with the timings
    6  an overwrite that fails (data file missing): exit 2, the earlier run byte for byte as it was; and an
       overwrite interrupted at half: the earlier run byte for byte as it was, the rerun resumes from the staging
       directory beside it
    7  a corpus edited between runs (10 records removed, 5 added, 5 responses changed): the rerun scores exactly
       the 10 new or changed ones; compared with an undisturbed run on the edited corpus
    8  a worker node lost at half on a simulated multi-node cluster (tests/cluster_sim.py: a head with no CPUs,
       two worker nodes of 4 logical CPUs, all on 127.0.0.1; one actor per node): the run finishes by itself on
       the node that is left (the lost node's actor restarts there, its call retried)

Columns: samples expected (records of the corpus), kept on disk before the rerun (distinct samples in parts that
pass their ledger checksum, scored from their current content), scored again (the rerun's
``samples_scored_this_run``), duplicates (repeated sample_id in scores.parquet), missing (records with neither a
score nor a recorded skip, or scored in the reference but not here), max |Δ| over every float score column
against the reference. Goals: nothing missing, no duplicate, max |Δ| <= 1e-6, and after each stop at half at
least 40 % of the samples kept on disk. Each fault's expected behaviour is checked as well (exit codes, messages,
byte-identical directories, resume figures); the exit status is 1 when a goal or a check fails.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqsd_ray.data.records import DataConfig, load_samples
from sqsd_ray.models.directions import random_direction
from sqsd_ray.models.loading import ModelConfig, load_model
from sqsd_ray.models.lora import LoraSettings, lora_module_shapes
from sqsd_ray.scoring.blocks import record_fingerprint
from sqsd_ray.scoring.parts import file_sha256 as sha256

DEFAULT_DATA = REPO.parent / "shared" / "data" / "benign" / "dolly_387.jsonl"
PROGRESS = re.compile(r"scoring:.*?(\d+)/(\d+)")
INTERRUPTED = re.compile(r"interrupted: (\d+) of (\d+) samples kept in (\S+); rerun the same command to resume")
ACTOR_MARKERS = ("ScoringActor", "MapWorker")
SCORE_PREFIXES = ("sqsd", "danger_proj", "safety_proj", "update_norm_", "loss_")  # float64 in parts: the losses
GOAL_DELTA = 1e-6
GOAL_KEPT_AT_HALF = 0.40
LINGER_S = 10.0  # after kill -9 of the driver: how long its Ray processes get to notice before they are counted
FAULTS = ("1", "2", "3", "4", "5", "6", "7", "8")


# ---------------------------------------------------------------------------------------------- one CLI run


class CliRun:
    """One ``sqsd-ray`` command in a process group of its own; stderr read as it comes (progress, the log), and
    the driver's descendants recorded while it lives (Ray's processes, the scoring actors)."""

    started: list[CliRun] = []

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict[str, str] | None = None):
        if env is None:  # a private local Ray of its own
            env = {**os.environ}
            env.pop("RAY_ADDRESS", None)
        env = {**env, "PYTHONUNBUFFERED": "1"}
        self.name = name
        self.stderr_path = logs / f"{name}.stderr"
        self._stdout = open(logs / f"{name}.stdout", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "sqsd_ray.cli", *argv], cwd=REPO, env=env,
                                     stdout=self._stdout, stderr=subprocess.PIPE, start_new_session=True)
        CliRun.started.append(self)
        self.pid = self.proc.pid
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self.done = 0  # samples the progress bar reports scored
        self.total: int | None = None
        self.tree: dict[int, tuple[float, str]] = {}  # descendant pid -> (create time, command line)
        self.actor_pids: set[int] = set()  # descendants that ever ran a scoring actor (Ray renames its workers)
        self._chunks: list[str] = []
        self._tree_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch, daemon=True).start()

    # ---- stderr

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tail = ""
        fd = self.proc.stderr.fileno()
        with open(self.stderr_path, "w", encoding="utf-8") as log:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                text = decoder.decode(chunk)
                log.write(text)
                log.flush()
                self._chunks.append(text)
                segments = re.split(r"[\r\n]", tail + text)
                tail = segments.pop()
                for segment in segments:
                    self._progress(segment, whole=True)
                self._progress(tail, whole=False)  # tqdm starts each update with \r: the latest one has no end yet

    def _progress(self, segment: str, whole: bool) -> None:
        match = PROGRESS.search(segment)
        if match:
            self.done = max(self.done, int(match.group(1)))
            if whole:
                self.total = int(match.group(2))

    @property
    def log(self) -> str:
        return "".join(self._chunks)

    def log_tail(self, n: int = 12) -> str:
        lines = [line for line in re.split(r"[\r\n]", self.log) if line.strip() and not PROGRESS.search(line)]
        return "\n".join(lines[-n:])

    # ---- processes

    def _watch(self) -> None:
        while self.proc.poll() is None:
            self.snapshot_tree()
            time.sleep(0.25)
        self.ended_at = time.monotonic()

    def snapshot_tree(self) -> None:
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                entry = (child.create_time(), " ".join(" ".join(child.cmdline()).split()) or child.name())
            except psutil.Error:
                continue
            with self._tree_lock:
                self.tree[child.pid] = entry
                if any(m in entry[1] for m in ACTOR_MARKERS):
                    self.actor_pids.add(child.pid)

    def alive(self, pid: int, create_time: float) -> bool:
        try:
            p = psutil.Process(pid)
            return p.create_time() == create_time and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def alive_descendants(self) -> dict[int, str]:
        with self._tree_lock:
            tree = dict(self.tree)
        return {pid: cmd for pid, (ctime, cmd) in tree.items() if self.alive(pid, ctime)}

    def actors(self) -> dict[int, tuple[float, str]]:
        self.snapshot_tree()
        with self._tree_lock:
            tree = dict(self.tree)
        return {pid: (ctime, cmd) for pid, (ctime, cmd) in tree.items()
                if any(m in cmd for m in ACTOR_MARKERS) and self.alive(pid, ctime)}

    # ---- waiting, ending

    def wait(self, timeout: float) -> int | None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(timeout=10)
        return rc

    def wait_for(self, predicate, timeout: float) -> bool:
        """True once ``predicate()`` holds; False on timeout or when the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return bool(predicate())
            time.sleep(0.05)
        return False

    def kill_tree(self) -> None:
        """SIGKILL to the process group and to every recorded descendant still alive (by pid and start time)."""
        # The group is ours while the driver is not reaped, or while its number is held by the group alone (a pid
        # is not handed out again while a process group bears it); a live process under that pid after the
        # driver was reaped is someone else's.
        if self.proc.returncode is None or not psutil.pid_exists(self.pid):
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        with self._tree_lock:
            tree = dict(self.tree)
        for pid, (ctime, _) in tree.items():
            if self.alive(pid, ctime):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._stdout.close()


def short_name(cmd: str) -> str:
    first = cmd.split()[0] if cmd.split() else cmd
    return first if first.startswith("ray::") else os.path.basename(first)


# ----------------------------------------------------------------------------------------- run directories


def hash_tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def beside(run_dir: Path) -> list[str]:
    """What lies next to a run directory under its name: lock, staging or replaced directories."""
    return sorted(p.name for p in run_dir.parent.glob(f".{run_dir.name}.*"))


def verified_parts(run_dir: Path) -> list[Path]:
    """Parts in parts/ that the ledger lists (not set aside) and whose checksum matches it."""
    ledger: dict[str, dict] = {}
    path = run_dir / "parts" / "ledger.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            ledger[entry["name"]] = {**ledger.get(entry["name"], {}), **entry}
    out = []
    for part in sorted((run_dir / "parts").glob("part-*.parquet")):
        entry = ledger.get(part.name)
        if entry and "set_aside" not in entry and entry.get("sha256") == sha256(part):
            out.append(part)
    return out


def rows_on_disk(run_dir: Path, records: dict[str, str]) -> pd.DataFrame:
    """Rows of the verified parts that were scored from the current content of a record."""
    frames = [pq.read_table(p, columns=["sample_id", "status", "record_fp"]).to_pandas()
              for p in verified_parts(run_dir)]
    if not frames:
        return pd.DataFrame({"sample_id": [], "status": [], "record_fp": []})
    df = pd.concat(frames, ignore_index=True)
    return df[df["record_fp"].astype(str) == df["sample_id"].map(records).astype(str)]


def kept_on_disk(run_dir: Path, records: dict[str, str]) -> int:
    return int(rows_on_disk(run_dir, records)["sample_id"].nunique())


def score_frame(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "scores.parquet")


def compare(run_dir: Path, ref_dir: Path, records: dict[str, str]) -> dict:
    """Duplicates, missing and stray samples of a finished run, and max |Δ| of every float column vs ``ref_dir``."""
    got, ref = score_frame(run_dir), score_frame(ref_dir)
    on_disk = rows_on_disk(run_dir, records)
    skipped = set(on_disk.loc[on_disk["status"] == "skipped", "sample_id"])
    got_ids = list(got["sample_id"])
    accounted = set(got_ids) | skipped
    missing = (set(records) - accounted) | (set(ref["sample_id"]) - set(got_ids))
    columns = [c for c in ref.columns if pd.api.types.is_float_dtype(ref[c].dtype) and c in got.columns]
    g = got.drop_duplicates("sample_id").set_index("sample_id")
    r = ref.set_index("sample_id")
    common = r.index.intersection(g.index)
    a = g.loc[common, columns].to_numpy(dtype=float, na_value=np.nan)
    b = r.loc[common, columns].to_numpy(dtype=float, na_value=np.nan)
    delta = np.abs(a - b)
    delta[np.isnan(a) & np.isnan(b)] = 0.0
    delta[np.isnan(delta)] = np.inf  # NaN on one side only
    return {"duplicates": len(got_ids) - len(set(got_ids)), "missing": len(missing),
            "stray": len(set(got_ids) - set(records)), "max_delta": float(delta.max()) if delta.size else 0.0,
            "columns": columns, "skipped": len(skipped)}


def run_info(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------------------------------- damage


def damage_data_page(part: Path) -> None:
    """Overwrite 16 bytes in the middle of the data: the footer (schema, offsets) stays intact."""
    blob = bytearray(part.read_bytes())
    footer = int.from_bytes(blob[-8:-4], "little") + 8
    middle = (4 + len(blob) - footer) // 2
    blob[middle:middle + 16] = b"\xff" * 16
    part.write_bytes(bytes(blob))


def flip_bit_in_a_value(part: Path) -> str | None:
    """Flip the lowest bit of one stored float64 score found verbatim, once, in the file (still readable)."""
    import struct

    table = pq.read_table(part)
    blob = bytearray(part.read_bytes())
    for name in table.column_names:
        if str(table.schema.field(name).type) != "double" or not name.startswith(SCORE_PREFIXES):
            continue
        for value in table.column(name).to_pylist():
            if value is None or not math.isfinite(value):
                continue
            packed = struct.pack("<d", value)
            if blob.count(packed) == 1:
                blob[blob.find(packed)] ^= 1
                part.write_bytes(bytes(blob))
                return name
    return None


# ------------------------------------------------------------------------------------------------ the job


@dataclass
class Row:
    fault: str
    disturbed: str = ""
    expected: int | None = None
    kept: int | str | None = None
    rescored: int | str | None = None
    duplicates: int | None = None
    missing: int | None = None
    max_delta: float | None = None
    stray: int = 0
    kept_fraction: float | None = None  # rows that stop a run at half
    checks: list[tuple[str, bool]] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)  # log tails of runs that went wrong
    seconds: float = 0.0

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, bool(ok)))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok in self.checks)


class DrillFailed(Exception):
    """A wait that ran out of time, or a run that ended before the moment a fault waits for."""


class Job:
    """The corpus, the directions, the config, and how to run the CLI on them."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work, self.timeout = args, work, args.timeout
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.corpus = work / "corpus.jsonl"
        self.source = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
        for i, record in enumerate(self.source):
            record.setdefault("id", f"dolly-{i:03d}")
        self.write_corpus(self.source)
        model = ModelConfig(name_or_path=args.model, tiny_hidden_size=args.hidden_size, tiny_layers=args.layers)
        shapes = lora_module_shapes(load_model(model), LoraSettings())
        for kind, seed in (("danger", 1), ("safety", 2)):
            random_direction(shapes, rank=8, seed=seed, kind=kind).save(work / f"{kind}.safetensors")
        config = {
            "model": {"name_or_path": args.model, "attn_implementation": "eager",
                      "tiny_hidden_size": args.hidden_size, "tiny_layers": args.layers},
            "data": {"path": str(self.corpus), "max_length": args.max_length},
            "directions": {"danger": str(work / "danger.safetensors"), "safety": str(work / "safety.safetensors")},
            "batching": {"device": "cpu"},
            "output": {"dir": str(work / "reference")},
            "ray": {"enabled": True, "num_actors": args.num_actors, "num_cpus_per_actor": 0.75, "local_num_cpus": 2,
                    "object_store_mb": 200, "rows_per_call": args.rows_per_call},
        }
        self.config = work / "score.yaml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.records = self.fingerprints()

    def write_corpus(self, records: list[dict]) -> None:
        self.corpus.write_text("".join(json.dumps(r) + "\n" for r in records))

    def fingerprints(self) -> dict[str, str]:
        samples, _ = load_samples(DataConfig(path=str(self.corpus), max_length=self.args.max_length))
        return {s.sample_id: record_fingerprint(s) for s in samples}

    @property
    def half(self) -> int:
        return math.ceil(len(self.records) / 2)

    def score(self, name: str, out: Path, *sets: str, env: dict[str, str] | None = None) -> CliRun:
        argv = ["score", "--config", str(self.config), "--set", f"output.dir={out}"]
        for s in sets:
            argv += ["--set", s]
        return CliRun(name, argv, self.logs, env)

    def verify(self, name: str, out: Path) -> CliRun:
        return CliRun(name, ["verify", str(out)], self.logs)

    # ---- helpers shared by the faults

    def wait(self, run: CliRun, row: Row) -> int:
        rc = run.wait(self.timeout)
        if rc is None:
            row.logs[run.name] = run.log_tail()
            raise DrillFailed(f"{run.name} still running after {self.timeout:.0f} s")
        if rc != 0:
            row.logs[run.name] = run.log_tail()
        return rc

    def at_half(self, run: CliRun, row: Row) -> int:
        """Wait until the run reports half of the corpus scored; the count it reported then."""
        if not run.wait_for(lambda: run.done >= self.half, self.timeout):
            row.logs[run.name] = run.log_tail()
            if run.proc.poll() is not None:
                raise DrillFailed(f"{run.name} ended (exit {run.proc.returncode}) before half was reported "
                              f"({run.done} of {len(self.records)})")
            raise DrillFailed(f"{run.name}: half not reported within {self.timeout:.0f} s ({run.done} so far)")
        return run.done

    def finish(self, row: Row, out: Path, rerun: CliRun | None, ref: Path, records: dict[str, str],
               kept: int | None) -> None:
        """Fill the row from a finished run directory: the rerun's figures, duplicates, missing, max |Δ|."""
        row.expected = len(records)
        if rerun is not None:
            rc = self.wait(rerun, row)
            info = run_info(out)
            row.rescored = info.get("samples_scored_this_run")
            resume = info.get("resume", {})
            row.check(f"rerun exits 0 (got {rc})", rc == 0)
            if kept is not None:
                row.check(f"rerun keeps the {kept} samples on disk (run.json resume.kept {resume.get('kept')})",
                          resume.get("kept") == kept)
                row.check(f"rerun scores the other {row.expected - kept} (samples_scored_this_run {row.rescored})",
                          row.rescored == row.expected - kept)
        if not (out / "scores.parquet").exists():
            row.check(f"{out}/scores.parquet exists", False)
            return
        c = compare(out, ref, records)
        row.duplicates, row.missing, row.stray = c["duplicates"], c["missing"], c["stray"]
        row.max_delta = c["max_delta"]
        row.check("no sample_id outside the corpus in scores.parquet", c["stray"] == 0)


# ------------------------------------------------------------------------------------------------ faults


def fault_reference(job: Job, row: Row) -> None:
    out = job.work / "reference"
    run = job.score("0-reference", out)
    rc = job.wait(run, row)
    row.check(f"exit 0 (got {rc})", rc == 0)
    info = run_info(out)
    row.disturbed = (f"exit {rc} (undisturbed); scoring phase {info.get('scoring_s', float('nan')):.1f} s, "
                     f"{info.get('parts', '?')} parts")
    row.kept, row.rescored = "—", f"{info.get('samples_scored_this_run')} (all, fresh)"
    job.finish(row, out, None, out, job.records, None)
    skipped = sum(info.get("data_report", {}).get("tokenisation_skipped", {}).values())
    if skipped:
        row.disturbed += f"; {info.get('n_rows')} scored + {skipped} skipped (prompt > max_length)"


def stop_at_half(job: Job, row: Row, name: str, out: Path, how: str, *sets: str) -> tuple[CliRun, int, int | None]:
    """Start a run, stop it at half with SIGINT or SIGKILL to the driver; (run, reported count, exit code)."""
    run = job.score(name, out, *sets)
    at = job.at_half(run, row)
    run.snapshot_tree()
    os.kill(run.pid, signal.SIGINT if how == "int" else signal.SIGKILL)
    rc = run.wait(job.timeout)
    if rc is None:
        row.logs[run.name] = run.log_tail()
        raise DrillFailed(f"{name}: still running {job.timeout:.0f} s after the signal")
    return run, at, rc


def fault_sigint(job: Job, row: Row) -> None:
    out = job.work / "f1-sigint"
    run, at, rc = stop_at_half(job, row, "1-sigint", out, "int")
    message = INTERRUPTED.search(run.log)
    time.sleep(3)
    left = run.alive_descendants()
    run.kill_tree()
    kept = kept_on_disk(out, job.records)
    row.kept, row.kept_fraction = kept, kept / len(job.records)
    row.check(f"exit 130 (got {rc})", rc == 130)
    row.check("the message says how many were kept and how to resume", message is not None)
    if message:
        row.check(f"the message's count ({message.group(1)}) is what is on disk ({kept})",
                  int(message.group(1)) == kept)
    row.check(f"no Ray process of the run left 3 s after it exited ({len(left)})", not left)
    row.disturbed = (f"SIGINT at {at}/{len(job.records)} reported → exit {rc}, "
                     + (f"\"interrupted: {message.group(1)} of {message.group(2)} samples kept …\"" if message
                        else "no 'interrupted' message")
                     + (f"; {len(left)} Ray processes left" if left else ""))
    if rc is None or message is None:
        row.logs[run.name] = run.log_tail()
    job.finish(row, out, job.score("1-sigint-rerun", out), job.work / "reference", job.records, kept)


def fault_kill_driver(job: Job, row: Row) -> None:
    out = job.work / "f2-kill9"
    run, at, rc = stop_at_half(job, row, "2-kill9", out, "kill")
    time.sleep(LINGER_S)
    left = run.alive_descendants()
    names = sorted({short_name(cmd) for cmd in left.values()})
    run.kill_tree()
    kept = kept_on_disk(out, job.records)
    row.kept, row.kept_fraction = kept, kept / len(job.records)
    row.check(f"exit -9 (got {rc})", rc == -signal.SIGKILL)
    row.disturbed = (f"kill -9 at {at}/{len(job.records)} reported → exit {rc}; Ray processes left "
                     f"{LINGER_S:.0f} s later: {len(left)} of {len(run.tree)}"
                     + (f" ({', '.join(names)}; killed)" if left else ""))
    rerun = job.score("2-kill9-rerun", out)
    job.finish(row, out, rerun, job.work / "reference", job.records, kept)
    if "is gone" in rerun.log:
        row.disturbed += "; rerun took over the dead run's lock"


def fault_kill_actor(job: Job, row: Row) -> None:
    out = job.work / "f3-actor"
    run = job.score("3-kill-actor", out)
    at = job.at_half(run, row)
    actors = run.actors()
    if not row.check(f"a scoring actor among the driver's descendants ({len(actors)} found)", bool(actors)):
        row.disturbed = f"no scoring actor process found at {at}/{len(job.records)}"
        run.kill_tree()
        return
    pid = min(actors)
    ctime, cmd = actors[pid]
    before = set(run.actor_pids)
    os.kill(pid, signal.SIGKILL)
    print(f"  fault 3: killed scoring actor pid {pid} ({cmd}) at {at}/{len(job.records)} reported", flush=True)
    rc = job.wait(run, row)
    restarted = sorted(run.actor_pids - before)  # Ray may restart an actor in a worker process started earlier
    row.check(f"the run finishes by itself: exit 0 (got {rc})", rc == 0)
    info = run_info(out)
    row.disturbed = (f"kill -9 of actor pid {pid} ({short_name(cmd)}) at {at}/{len(job.records)} reported → exit "
                     f"{rc}; the actor restarted as pid {', '.join(map(str, restarted)) or '— (none seen)'}")
    if info.get("duplicate_rows_dropped"):
        row.disturbed += f"; {info['duplicate_rows_dropped']} duplicate rows dropped at consolidation"
    row.kept, row.rescored = "—", "— (no rerun: finished by itself)"
    job.finish(row, out, None, job.work / "reference", job.records, None)


def fault_damaged_parts(job: Job, row: Row) -> None:
    out = job.work / "f4-damaged"
    shutil.copytree(job.work / "reference", out)
    parts = sorted((out / "parts").glob("part-*.parquet"))
    page, flipped, column = parts[1], None, None
    for part in parts[2:]:
        column = flip_bit_in_a_value(part)
        if column:
            flipped = part
            break
    damage_data_page(page)
    if not row.check("a part with a float64 score stored verbatim, to flip a bit in", flipped is not None):
        row.disturbed = "no float64 score found verbatim in any part"
        return
    verify = job.verify("4-verify", out)
    rc_verify = job.wait(verify, row)
    named = page.name in verify.log and flipped.name in verify.log
    row.check(f"verify exits 1 (got {rc_verify})", rc_verify == 1)
    row.check("verify names both damaged parts", named)
    kept = kept_on_disk(out, job.records)
    row.kept = kept
    rerun = job.score("4-damaged-rerun", out)
    job.finish(row, out, rerun, job.work / "reference", job.records, kept)
    aside = run_info(out).get("resume", {}).get("parts_set_aside", [])
    both_aside = all((out / "set_aside" / p.name).exists() and not p.exists() for p in (page, flipped))
    row.check(f"both parts set aside ({len(aside)} in run.json, files in set_aside/: {both_aside})",
              len(aside) == 2 and both_aside)
    verify_after = job.verify("4-verify-after", out)
    rc_after = job.wait(verify_after, row)
    row.check(f"verify after the rerun exits 0 (got {rc_after})", rc_after == 0)
    row.disturbed = (f"16 bytes overwritten in {page.name[:13]}…, one bit of {column} flipped in "
                     f"{flipped.name[:13]}… → verify exit {rc_verify}, "
                     f"{'names both' if named else 'does NOT name both'};"
                     f" rerun set aside {len(aside)}; verify after: exit {rc_after}")


def fault_second_run(job: Job, row: Row) -> None:
    out = job.work / "f5-concurrent"
    first = job.score("5-run-a", out)
    if not first.wait_for(lambda: any((out / "parts").glob("part-*.parquet")), job.timeout):
        row.logs[first.name] = first.log_tail()
        raise DrillFailed("run A wrote no part")
    second = job.score("5-run-b", out)
    rc_b = job.wait(second, row)
    b_seconds = time.monotonic() - second.started_at
    a_running = first.proc.poll() is None
    named = f"pid {first.pid}" in second.log
    rc_a = job.wait(first, row)
    row.check(f"A was still running when B ended (B took {b_seconds:.0f} s)", a_running)
    row.check(f"B exits 2 (got {rc_b})", rc_b == 2)
    row.check(f"B's message names A's pid {first.pid}", named)
    row.check(f"A finishes: exit 0 (got {rc_a})", rc_a == 0)
    if a_running or first.ended_at is None:
        row.disturbed = (f"B started once A had a part on disk → B exit {rc_b} after {b_seconds:.0f} s, "
                         f"{'naming' if named else 'NOT naming'} A's pid; A exit {rc_a}")
    else:
        row.disturbed = (f"B NOT refused: A ended {first.ended_at - second.started_at:.0f} s after B started, before B "
                         f"reached the lock; B exit {rc_b} after {b_seconds:.0f} s, scoring "
                         f"{run_info(out).get('samples_scored_this_run')} (A's run was complete); A exit {rc_a}")
        row.logs[second.name] = second.log_tail()
    row.kept, row.rescored = "—", "— (A's result)"
    job.finish(row, out, None, job.work / "reference", job.records, None)


def fault_failed_overwrite(job: Job, row: Row) -> None:
    out = job.work / "f6-overwrite-fails"
    shutil.copytree(job.work / "reference", out)
    before, around = hash_tree(out), beside(out)
    run = job.score("6-overwrite-fails", out, "output.overwrite=true", f"data.path={job.work / 'no-such-corpus.jsonl'}")
    rc = job.wait(run, row)
    same, left = hash_tree(out) == before, [p for p in beside(out) if p not in around]
    row.check(f"exit 2 (got {rc})", rc == 2)
    row.check("the run directory is byte for byte as it was", same)
    row.check(f"nothing left beside it ({left})", not left)
    row.disturbed = (f"overwrite with data.path missing → exit {rc}; run dir "
                     f"{'byte-identical' if same else 'CHANGED'}" + (f"; left beside it: {left}" if left else ""))
    row.kept, row.rescored = "—", "— (nothing to rerun)"
    job.finish(row, out, None, job.work / "reference", job.records, None)


def fault_interrupted_overwrite(job: Job, row: Row) -> None:
    out = job.work / "f6-overwrite-sigint"
    shutil.copytree(job.work / "reference", out)
    before = hash_tree(out)
    run, at, rc = stop_at_half(job, row, "6-overwrite-sigint", out, "int", "output.overwrite=true")
    message = INTERRUPTED.search(run.log)
    run.kill_tree()
    same = hash_tree(out) == before
    staging = sorted(out.parent.glob(f".{out.name}.staging-*"))
    row.check(f"exit 130 (got {rc})", rc == 130)
    row.check("the run directory is byte for byte as it was", same)
    if not row.check(f"one staging directory beside the run ({len(staging)})", len(staging) == 1):
        row.disturbed = f"SIGINT at {at} → exit {rc}; staging directories: {[p.name for p in staging]}"
        return
    row.check("the message names the staging directory", bool(message) and message.group(3) == str(staging[0]))
    kept = kept_on_disk(staging[0], job.records)
    row.kept, row.kept_fraction = kept, kept / len(job.records)
    rerun = job.score("6-overwrite-sigint-rerun", out, "output.overwrite=true")
    job.finish(row, out, rerun, job.work / "reference", job.records, kept)
    info = run_info(out)
    row.check("the rerun resumed the staged overwrite (run.json resume.staged_overwrite)",
              info.get("resume", {}).get("staged_overwrite") is True)
    left = beside(out)
    row.check(f"no staging or replaced directory left after it ({left})", not left)
    row.disturbed = (f"overwrite, SIGINT at {at}/{len(job.records)} reported → exit {rc}; run dir "
                     f"{'byte-identical' if same else 'CHANGED'}; rerun resumed from "
                     f"{staging[0].name[:len(out.name) + 10]}…")


def fault_edited_corpus(job: Job, row: Row) -> None:
    out = job.work / "f7-edited"
    shutil.copytree(job.work / "reference", out)
    rng = random.Random(7)
    picked = rng.sample(range(len(job.source)), 20)
    removed, changed, templates = set(picked[:10]), set(picked[10:15]), picked[15:]
    edited = []
    for i, record in enumerate(job.source):
        if i in removed:
            continue
        edited.append({**record, "response": record["response"] + " (Edited.)"} if i in changed else record)
    for k, i in enumerate(templates):
        r = job.source[i]
        edited.append({**r, "id": f"new-{k}", "instruction": f"In one sentence: {r['instruction']}",
                       "response": r["response"].split(". ")[0].rstrip(".") + "."})
    original = job.corpus.read_bytes()
    try:
        job.write_corpus(edited)
        records = job.fingerprints()
        fresh_dir = job.work / "f7-edited-fresh"
        fresh = job.score("7-edited-fresh", fresh_dir)
        rc_fresh = job.wait(fresh, row)
        row.check(f"the undisturbed run on the edited corpus exits 0 (got {rc_fresh})", rc_fresh == 0)
        kept = kept_on_disk(out, records)
        row.kept = kept
        row.check(f"kept = the {len(job.source) - 15} unchanged records ({kept})", kept == len(job.source) - 15)
        rerun = job.score("7-edited-rerun", out)
        job.finish(row, out, rerun, fresh_dir, records, kept)
        resume = run_info(out).get("resume", {})
        row.check(f"scored again: 10 (got {row.rescored})", row.rescored == 10)
        row.check(f"run.json resume: changed 5 / removed 10 (got {resume.get('changed_rescored')} / "
                  f"{resume.get('removed_dropped')})", resume.get("changed_rescored") == 5
                  and resume.get("removed_dropped") == 10)
        row.disturbed = (f"corpus edited: −10, +5, 5 responses changed → rerun exit "
                         f"{rerun.proc.returncode}, resume: changed {resume.get('changed_rescored')} / removed "
                         f"{resume.get('removed_dropped')}; compared with a fresh run on the edited corpus "
                         f"(exit {rc_fresh})")
    finally:
        job.corpus.write_bytes(original)


def fault_node_loss(job: Job, row: Row) -> None:
    """A head without CPUs and two worker nodes (4 logical CPUs each) on 127.0.0.1; one actor per node (3.5 CPUs
    each, so two cannot share a node); at half, one worker node vanishes (its raylet, object store and actor get
    SIGKILL). The run must finish by itself on the node that is left, with no rerun."""
    from tests.cluster_sim import simulated_cluster

    out = job.work / "f8-node"
    with simulated_cluster() as sim:
        run = job.score("8-node-loss", out, f"ray.address={sim.address}", "ray.num_actors=2",
                        "ray.num_cpus_per_actor=3.5", env=sim.env)
        at = job.at_half(run, row)
        lost, remaining = sim.workers
        sim.remove_worker(lost, wait_until_dead=False)
        print(f"  fault 8: removed worker node {lost.node_id[:12]} at {at}/{len(job.records)} reported", flush=True)
        rc = job.wait(run, row)
    row.check(f"the run finishes by itself on the remaining node: exit 0 (got {rc})", rc == 0)
    info = run_info(out)
    per_node = info.get("ray", {}).get("rows_per_node", {})
    after = per_node.get(remaining.node_id, 0)
    row.check(f"both worker nodes scored rows ({len(per_node)} nodes in run.json)", len(per_node) == 2)
    row.disturbed = (f"worker node lost at {at}/{len(job.records)} reported → exit {rc}; rows per node "
                     f"{sorted(per_node.values())} (lost node {per_node.get(lost.node_id, 0)}, remaining {after})")
    row.kept, row.rescored = "—", "— (no rerun: finished by itself)"
    job.finish(row, out, None, job.work / "reference", job.records, None)


PLAN = [
    ("1", "1. SIGINT to the driver at half", fault_sigint),
    ("2", "2. kill -9 of the driver at half", fault_kill_driver),
    ("3", "3. kill -9 of a scoring actor at half", fault_kill_actor),
    ("4", "4. two damaged parts in a complete run", fault_damaged_parts),
    ("5", "5. a second run on the same output.dir", fault_second_run),
    ("6", "6. an overwrite that fails (data file missing)", fault_failed_overwrite),
    ("6", "6. an overwrite interrupted at half (SIGINT)", fault_interrupted_overwrite),
    ("7", "7. a corpus edited between runs", fault_edited_corpus),
    ("8", "8. loss of a worker node (simulated cluster)", fault_node_loss),
]


# ------------------------------------------------------------------------------------------------ report


def cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.1e}"
    return str(value)


def table(rows: list[Row]) -> str:
    lines = ["| fault | disturbed run (exit code / what happened) | samples expected | kept on disk before the rerun "
             "| scored again | duplicates | missing | max \\|Δ\\| vs undisturbed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        missing = cell(r.missing) + (f" (+{r.stray} not in the corpus)" if r.stray else "")
        lines.append(f"| {r.fault} | {r.disturbed.replace('|', '/')} | {cell(r.expected)} | {cell(r.kept)} | "
                     f"{cell(r.rescored)} | {cell(r.duplicates)} | {missing} | {cell(r.max_delta)} |")
    return "\n".join(lines)


def goals(rows: list[Row]) -> list[tuple[str, bool | None, str]]:
    """(goal, pass / fail / None where no row measures it, the figures)."""
    compared = [r for r in rows if r.missing is not None]
    no_figures = [r.fault.split(".")[0] for r in rows if r.missing is None]
    missing = sum(r.missing for r in compared)
    duplicates = sum(r.duplicates for r in compared)
    deltas = [r.max_delta for r in compared]
    halves = [r for r in rows if r.kept_fraction is not None]
    figures = ", ".join(f"{r.fault.split('. ', 1)[1]}: {r.kept_fraction:.0%}" for r in halves)
    absent = f"; no figures for row(s) {', '.join(no_figures)}" if no_figures else ""
    n_checks = sum(len(r.checks) for r in rows)
    failed = [f"{r.fault.split('.')[0]}: {what}" for r in rows for what, ok in r.checks if not ok]
    return [
        ("nothing missing", missing == 0 and not no_figures, f"{missing} missing over {len(compared)} rows{absent}"),
        ("no duplicate", duplicates == 0 and not no_figures, f"{duplicates} duplicate sample_id rows"),
        (f"max |Δ| <= {GOAL_DELTA:g}", bool(deltas) and max(deltas) <= GOAL_DELTA and not no_figures,
         f"max {max(deltas) if deltas else float('nan'):.2e} over every float score column"),
        (f"kept on disk after a stop at half >= {GOAL_KEPT_AT_HALF:.0%}",
         all(r.kept_fraction >= GOAL_KEPT_AT_HALF for r in halves) if halves else None,
         figures or "no stop at half ran"),
        ("every fault behaves as expected", not failed, f"{n_checks - len(failed)} of {n_checks} checks"
         + ("; failed: " + "; ".join(failed) if failed else "")),
    ]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # the bench's own SIGTERM: clean up the runs it started, then stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Dolly-style JSONL corpus (>= 300 records)")
    parser.add_argument("--model", default="tiny-llama", choices=["tiny-llama", "tiny-qwen3"])
    parser.add_argument("--hidden-size", type=int, default=64, help="model.tiny_hidden_size (64 with 2 layers: "
                        "22-54 s of scoring on 2 CPU cores, depending on other load)")
    parser.add_argument("--layers", type=int, default=2, help="model.tiny_layers")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-actors", type=int, default=2)
    parser.add_argument("--rows-per-call", type=int, default=16, help="rows per actor call: one part per block")
    parser.add_argument("--faults", default=",".join(FAULTS), help="which faults to run, e.g. 1,3 (the undisturbed "
                        "reference always runs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds any one wait may take before the row "
                        "is reported as failed")
    parser.add_argument("--work", type=Path, help="work directory, kept (default: a temporary one, removed unless a "
                        "check failed)")
    parser.add_argument("--out", type=Path, help="write the rows and goals as JSON here")
    args = parser.parse_args()

    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="sqsd-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    chosen = {f.strip() for f in args.faults.split(",") if f.strip()}
    # A shell starts a background job with SIGINT ignored, and children inherit that: a handler here is reset to
    # the default in every run this starts, so the SIGINT of fault 1 reaches Python as Ctrl-C would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    rows: list[Row] = []
    interrupted = False
    try:
        job = Job(args, work)
        print(f"work dir {work}; corpus {len(job.records)} records; {args.model} hidden {args.hidden_size}, "
              f"{args.layers} layers; {args.num_actors} actors × 0.75 CPU; {args.rows_per_call} rows per call; "
              f"{os.cpu_count()} CPUs", flush=True)
        plan = [("0", "0. undisturbed run (reference)", fault_reference)] + [p for p in PLAN if p[0] in chosen]
        for key, title, fault in plan:
            row = Row(title)
            t0 = time.monotonic()
            print(f"{title} ...", flush=True)
            try:
                fault(job, row)
            except DrillFailed as err:
                row.check(str(err), False)
                row.disturbed = (row.disturbed + "; " if row.disturbed else "") + f"FAILED: {err}"
            except Exception as err:  # noqa: BLE001 - a fault that breaks the bench is a failed row, not a crash
                row.check(f"error: {type(err).__name__}: {err}", False)
                row.disturbed = (row.disturbed + "; " if row.disturbed else "") + f"ERROR {type(err).__name__}: {err}"
            except KeyboardInterrupt:
                interrupted = True
                row.check("the bench itself was interrupted", False)
                row.disturbed = (row.disturbed + "; " if row.disturbed else "") + "INTERRUPTED (the bench, Ctrl-C)"
            finally:
                for run in CliRun.started:
                    run.kill_tree()
                CliRun.started.clear()
            row.seconds = time.monotonic() - t0
            rows.append(row)
            status = "ok" if row.ok else "FAILED: " + "; ".join(w for w, ok in row.checks if not ok)
            print(f"  {row.seconds:.0f} s, {status}", flush=True)
            if interrupted:
                break
            if key == "0" and not (work / "reference" / "scores.parquet").exists():
                print("the undisturbed reference run failed: nothing to compare with", flush=True)
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for run in CliRun.started:
            run.kill_tree()
    total = time.monotonic() - started

    print()
    print(table(rows))
    print()
    results = goals(rows)
    for name, ok, figures in results:
        print(f"goal: {name}: {'n/a' if ok is None else 'PASS' if ok else 'FAIL'} ({figures})")
    for r in rows:
        for name, tail in (r.logs.items() if not r.ok else ()):
            print(f"\n--- log tail of {name} ({r.fault}) ---\n{tail}")
    print(f"\nbench time {total / 60:.1f} min ({total:.0f} s)")
    all_ok = all(ok is not False for _, ok, _ in results) and not interrupted
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "total_s": total,
                                        "rows": [asdict(r) for r in rows],
                                        "goals": [{"goal": n, "pass": ok, "figures": f} for n, ok, f in results]},
                                       indent=2, default=str))
    if args.work is None:
        if all_ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (logs in {work / 'logs'})")
    sys.exit(130 if interrupted else 0 if all_ok else 1)


if __name__ == "__main__":
    main()
