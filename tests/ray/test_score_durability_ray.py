"""Scoring on Ray keeps its work: the gpu profile runs (logical GPUs), parts reach disk while the job runs, and
Ctrl-C keeps what was scored, says how to resume, and leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from sqsd_ray.cli import main
from sqsd_ray.config import load_config
from sqsd_ray.data.records import load_samples
from sqsd_ray.scoring.blocks import load_direction, sample_rows, scoring_identity
from sqsd_ray.scoring.job_config import ScoreJobConfig
from sqsd_ray.scoring.ray_pool import ScoringActor, score_with_ray
from sqsd_ray.scoring.store import ScoreStore
from tests.conftest import REPO_ROOT
from tests.ray.conftest import word_records, write_score_job

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_RECORDS = 30
COLUMNS = ["sqsd", "sqsd_raw", "danger_proj", "safety_proj", "loss_danger_state", "loss_safety_state"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return write_score_job(tmp_path_factory.mktemp("durable_ray"), word_records(N_RECORDS, seed=1, prompt_words=10,
                                                                               response_words=25),
                           direction_seeds=(3, 4), ray={"rows_per_call": 3, "num_cpus_per_actor": 1.0,
                                                        "local_num_cpus": 2, "object_store_mb": 150})


def _scores(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path / "scores.parquet").set_index("sample_id")


def _assert_matches_reference(run: Path, job: Path) -> None:
    got, ref = _scores(run), _scores(job / "inproc")
    assert got.index.is_unique and set(got.index) == set(ref.index)
    np.testing.assert_allclose(got.loc[ref.index, COLUMNS].to_numpy(float), ref[COLUMNS].to_numpy(float), atol=1e-6)


def _slow_cli(job: Path, delay: float, *args: str, ray_gpus: float | None = None) -> subprocess.Popen:
    gpus = ["--ray-gpus", str(ray_gpus)] if ray_gpus is not None else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "tests.score_slowly", str(delay), *gpus, "--", "score", "--config",
                             str(job / "score.yaml"), *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_gpu_profile_scores_on_logical_gpus(job, tmp_path):
    # Ray Data refuses batch_size=None for actors that request GPUs: every score job on a GPU cluster failed at once
    out = tmp_path / "gpu"
    proc = _slow_cli(job, 0.0, "--set", f"output.dir={out}", "--set", "ray.profile=gpu", "--set",
                     "ray.num_cpus_per_actor=1", "--set", "batching.device=cpu", ray_gpus=2)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["execution"] == "ray"
    assert "2 actor(s) × (1.0 CPU, 1.0 GPU" in log
    _assert_matches_reference(out, job)


class BlockingActor(ScoringActor):
    """Its third call waits until the test has seen scored parts on disk (or 60 s)."""

    gate: str = ""

    def __call__(self, block):
        if self.calls == 2:
            deadline = time.monotonic() + 60
            while not Path(self.gate).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return super().__call__(block)


def test_scored_blocks_reach_disk_while_the_job_runs(job, local_ray, tmp_path):
    import threading

    from sqsd_ray.scoring.blocks import record_fingerprint

    cfg = load_config(ScoreJobConfig, job / "score.yaml", [f"output.dir={tmp_path / 'out'}"])
    directions = {d: load_direction(getattr(cfg.directions, d), d) for d in ("danger", "safety")}
    samples, _ = load_samples(cfg.data)
    store = ScoreStore(cfg.output.dir)
    store.begin(scoring_identity(cfg, directions), {s.sample_id: record_fingerprint(s) for s in samples},
                overwrite=False, resume=True)
    BlockingActor.gate = str(tmp_path / "gate")
    seen = []

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not seen:
            parts = list(store.parts_dir.glob("part-*.parquet"))
            if parts:
                seen.append(len(parts))
            time.sleep(0.05)
        Path(BlockingActor.gate).touch()

    watcher = threading.Thread(target=watch)
    watcher.start()
    score_with_ray(cfg, store, sample_rows(samples), actor_cls=BlockingActor)
    watcher.join()
    assert seen and 1 <= seen[0] <= 2, "no part reached disk while an actor was still scoring"
    assert len(store.done_ids()) == N_RECORDS


@pytest.mark.slow
def test_ctrl_c_keeps_what_was_scored_and_leaves_no_ray_process(job, tmp_path, local_ray):
    out = tmp_path / "run"
    proc = _slow_cli(job, 1.0, "--set", f"output.dir={out}")
    ps = psutil.Process(proc.pid)
    children: set[int] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        children |= {c.pid for c in ps.children(recursive=True)}
        if len(list((out / "parts").glob("part-*.parquet"))) >= 3:
            break
        time.sleep(0.1)
    children |= {c.pid for c in ps.children(recursive=True)}
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log[-3000:]
    match = re.search(rf"interrupted: (\d+) of {N_RECORDS} samples kept in {out}; rerun the same command to resume",
                      log)
    assert match, log[-3000:]
    kept = int(match.group(1))
    on_disk = sum(pq.read_metadata(p).num_rows for p in (out / "parts").glob("part-*.parquet"))
    assert kept == on_disk >= 9 and kept < N_RECORDS
    assert children, "the run started no process"
    time.sleep(3)
    alive = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes of the interrupted run still alive: {alive}"
    assert main(["score", "--config", str(job / "score.yaml"), "--set", f"output.dir={out}"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resume"]["kept"] == kept and run["samples_scored_this_run"] == N_RECORDS - kept
    _assert_matches_reference(out, job)
