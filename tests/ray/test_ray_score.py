"""The Ray Data scoring pipeline: same output as in-process, resumable, survives a killed actor."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from sqsd_ray.cli import main
from sqsd_ray.config import ConfigError, load_config
from sqsd_ray.data.records import load_samples
from sqsd_ray.scoring.blocks import load_direction, record_fingerprint, sample_rows, scoring_identity
from sqsd_ray.scoring.job import run_score
from sqsd_ray.scoring.job_config import ScoreJobConfig
from sqsd_ray.scoring.ray_pool import ScoringActor, block_plan, score_with_ray
from sqsd_ray.scoring.store import ScoreStore
from tests.ray.conftest import word_records, write_score_job

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers unpickle KillOnceActor by value

N_RECORDS = 24


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    records = word_records(N_RECORDS, seed=0) + [{"id": "too-long", "prompt": "x" * 400, "response": "y"}]
    return write_score_job(tmp_path_factory.mktemp("rayjob"), records, direction_seeds=(11, 12),
                           ray={"rows_per_call": 5, "num_cpus_per_actor": 1.0})


def _scores(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path / "scores.parquet").set_index("sample_id")


def test_ray_pipeline_equals_in_process(job, local_ray):
    assert main(["score", "--config", str(job / "score.yaml"), "--set", f"output.dir={job / 'ray'}"]) == 0
    ray_df, ref = _scores(job / "ray"), _scores(job / "inproc")
    assert len(ray_df) == N_RECORDS and ray_df.index.is_unique and set(ray_df.index) == set(ref.index)
    assert "too-long" not in ray_df.index
    cols = ["sqsd", "sqsd_raw", "danger_proj", "safety_proj", "loss_danger_state", "n_response_tokens"]
    np.testing.assert_allclose(ray_df.loc[ref.index, cols].to_numpy(float), ref[cols].to_numpy(float), atol=1e-6)
    run = json.loads((job / "ray" / "run.json").read_text())
    assert run["execution"] == "ray" and run["data_report"]["tokenisation_skipped"] == {"prompt_too_long": 1}
    for part in (job / "ray" / "parts").glob("*.parquet"):  # no pickled-object fallback for a skipped row
        assert str(pq.read_schema(part).field("truncated").type) == "bool"
    assert 0.0 <= run["padding_fraction"] < 0.5
    assert run["fingerprints"]["model_weights"] == json.loads((job / "inproc" / "run.json").read_text())["fingerprints"]["model_weights"]
    # the job fixes the layout (a batch size and a token budget); the reduction is eager on CPU
    assert run["batch_layout"] == {"bs ≤ 4, tokens ≤ 2048": N_RECORDS} and "layout_calibration" not in run
    assert run["kernel"] == {"eager (auto: eager on cpu (compiling does not pay there, docs/benchmarks.md))": N_RECORDS}


def test_each_actor_times_the_layouts_on_its_first_block(local_ray, tmp_path):
    n = 70  # blocks of 16 rows (rows_per_call), enough for 4 calls per actor
    root = write_score_job(tmp_path, word_records(n, seed=3), direction_seeds=(11, 12),
                           ray={"rows_per_call": 16, "num_cpus_per_actor": 1.0})
    assert main(["score", "--config", str(root / "score.yaml"), "--set", f"output.dir={tmp_path / 'ray'}",
                 "--set", "batching.max_batch_size=null", "--set", "batching.max_tokens=null"]) == 0  # layout: auto
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    calibrations = run["layout_calibration"]  # one per actor, on its first block
    assert 1 <= len(calibrations) <= 2 and all(c["chosen"] in c["seconds"] and c["samples"] == 16
                                               for c in calibrations)
    assert sum(run["batch_layout"].values()) == n
    ray_df, ref = _scores(tmp_path / "ray"), _scores(root / "inproc")
    np.testing.assert_allclose(ray_df.loc[ref.index, "sqsd"], ref["sqsd"], atol=1e-6)


class KillOnceActor(ScoringActor):
    """Dies (the whole worker process) on its second call, the first time only: a crash mid-run."""

    marker: str = ""

    def __call__(self, block):
        if self.calls == 1 and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os._exit(1)
        return super().__call__(block)


def test_killed_actor_loses_and_doubles_nothing(job, local_ray, tmp_path):
    cfg = load_config(ScoreJobConfig, job / "score.yaml", [f"output.dir={tmp_path / 'out'}"])
    KillOnceActor.marker = str(tmp_path / "killed.marker")
    directions = {d: load_direction(getattr(cfg.directions, d), d) for d in ("danger", "safety")}
    store = ScoreStore(cfg.output.dir)
    samples, _ = load_samples(cfg.data)
    store.begin(scoring_identity(cfg, directions), {s.sample_id: record_fingerprint(s) for s in samples},
                overwrite=False, resume=True)
    score_with_ray(cfg, store, sample_rows(samples), actor_cls=KillOnceActor)
    assert Path(KillOnceActor.marker).exists(), "the actor was never killed: the test proved nothing"
    df, facts = store.consolidate({})
    ref = _scores(job / "inproc")
    got = df.set_index("sample_id")
    assert got.index.is_unique and set(got.index) == set(ref.index)
    np.testing.assert_allclose(got.loc[ref.index, "sqsd"], ref["sqsd"], atol=1e-6)


class LateSecondActor(ScoringActor):
    """Records which process scored each block; the second actor to start is slow to load, and a block takes a
    while, as with a real model on CPU."""

    marks: str = ""

    def __init__(self, cfg_dict):
        marks = Path(self.marks)
        started = len(list(marks.glob("start-*")))
        (marks / f"start-{os.getpid()}").touch()
        if started:  # the second actor
            time.sleep(3.0)
        super().__init__(cfg_dict)

    def __call__(self, block):
        time.sleep(1.0)
        (Path(self.marks) / f"call-{os.getpid()}-{time.monotonic_ns()}").touch()
        return super().__call__(block)


def test_an_actor_that_starts_late_still_gets_blocks(job, local_ray, tmp_path):
    # the pool's first ready actor holds several blocks at once: with one block per actor it took them all
    cfg = load_config(ScoreJobConfig, job / "score.yaml", [f"output.dir={tmp_path / 'out'}", "ray.num_actors=2",
                                                          "ray.num_cpus_per_actor=0.75", "ray.rows_per_call=16"])
    assert block_plan(N_RECORDS + 1, 16, 2) == (4, 7)  # 25 rows: 7 blocks of ≤ 4, where ≤ 16 rows gave 2
    LateSecondActor.marks = str(tmp_path)
    directions = {d: load_direction(getattr(cfg.directions, d), d) for d in ("danger", "safety")}
    store = ScoreStore(cfg.output.dir)
    samples, _ = load_samples(cfg.data)
    store.begin(scoring_identity(cfg, directions), {s.sample_id: record_fingerprint(s) for s in samples},
                overwrite=False, resume=True)
    score_with_ray(cfg, store, sample_rows(samples), actor_cls=LateSecondActor)
    started = {p.name.split("-")[1] for p in tmp_path.glob("start-*")}
    scored_by = [p.name.split("-")[1] for p in tmp_path.glob("call-*")]
    assert len(started) == 2 and len(scored_by) == 7
    assert set(scored_by) == started, f"one actor scored every block: {scored_by}"
    got = store.consolidate({})[0].set_index("sample_id")
    ref = _scores(job / "inproc")
    assert set(got.index) == set(ref.index)
    np.testing.assert_allclose(got.loc[ref.index, "sqsd"], ref["sqsd"], atol=1e-6)


def test_run_score_through_ray_resumes(job, local_ray, tmp_path):
    cfg = load_config(ScoreJobConfig, job / "score.yaml", [f"output.dir={tmp_path}"])
    run_score(cfg)
    parts = sorted((tmp_path / "parts").glob("*.parquet"))
    removed = set(pd.read_parquet(parts[0])["sample_id"])
    parts[0].unlink()
    run_score(cfg)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["samples_scored_this_run"] == len(removed)
    again = _scores(tmp_path)
    assert again.index.is_unique and len(again) == N_RECORDS


def test_a_pool_holding_every_cpu_is_refused_before_it_stalls(job, local_ray, tmp_path):
    # 2 actors × 1 CPU on the 2-CPU test Ray: the tokenise tasks would never get a CPU
    cfg = load_config(ScoreJobConfig, job / "score.yaml", [f"output.dir={tmp_path}", "ray.num_actors=2"])
    with pytest.raises(ConfigError, match=r"2 × 1 leaves 0 of the cluster's 2 CPUs; tokenisation needs 0.5"):
        run_score(cfg)
    assert not list(tmp_path.glob("parts/*.parquet"))
