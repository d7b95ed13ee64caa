"""Scoring and fine-tuning on a simulated multi-node cluster (``tests/cluster_sim.py``): a head without CPUs and two
worker nodes of 4 logical CPUs and 1 logical GPU each, all on 127.0.0.1, driven the way users drive a cluster:
``sqsd-ray`` with RAY_ADDRESS set, and ``ray job submit --runtime-env cluster/runtime_env.yaml``.

When a worker node is lost mid-score, the run finishes on the node that remains; none is added in its place. The
scoring actor that died with the node is restarted on the remaining node once that has room for it (at the latest
when the pool releases its other actors at the end of the input), and its calls in flight are retried there; every
block written before stays written. This rests on ``ray.max_task_retries: -1``, the default: until the GCS declares
the vanished node dead (about 15 s with Ray's default health checks), each call to its actor fails and spends one
retry, and a budget of 3 ran out within seconds and failed the job with ActorUnavailableError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from sqsd_ray.cli import main
from sqsd_ray.models.lora import load_adapter_state
from sqsd_ray.scoring.store import SCORED_ON
from tests.cluster_sim import RAY, SimulatedCluster, is_loopback, simulated_cluster
from tests.conftest import REPO_ROOT, save_random_directions
from tests.ray.conftest import word_records, write_score_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_RECORDS = 24
COLUMNS = ["sqsd", "sqsd_raw", "danger_proj", "safety_proj", "loss_danger_state", "loss_safety_state"]
# 3.5 of a node's 4 CPUs per actor: two actors cannot share a node, and 0.5 CPU per node is left to tokenise
PROFILES = {
    "gpu": ["ray.profile=gpu", "ray.num_cpus_per_actor=3.5", "batching.device=cpu"],
    "cpu": ["ray.num_actors=2", "ray.num_cpus_per_actor=3.5"],
}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    # rows_per_call 2: 12 blocks, so each of the two actors gets several calls
    return write_score_job(tmp_path_factory.mktemp("multinode"), word_records(N_RECORDS, seed=7),
                           direction_seeds=(5, 6), ray={"rows_per_call": 2})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster with the dashboard and token auth, shared by the checks that leave its nodes as they are."""
    with simulated_cluster(tmp_path_factory.mktemp("cluster"), dashboard=True) as sim:
        yield sim


def _score(sim: SimulatedCluster, job: Path, out: Path, *sets: str, delay: float) -> subprocess.Popen:
    """``sqsd-ray score`` as a driver of ``sim``, every scoring call slowed by ``delay`` s (tests/score_slowly.py)."""
    overrides = [arg for s in (f"output.dir={out}", *sets) for arg in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "tests.score_slowly", str(delay), "--", "score", "--config",
                             str(job / "score.yaml"), *overrides], cwd=REPO_ROOT, env=sim.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _tail(log: str, chars: int = 3000) -> str:
    """The end of a driver's log without the raylets' state dumps, which bury the error."""
    return "\n".join(line for line in log.splitlines() if "[state-dump]" not in line)[-chars:]


def _assert_matches_reference(run: Path, reference: Path) -> None:
    got, ref = (pd.read_parquet(p / "scores.parquet") for p in (run, reference))
    assert list(got.columns) == list(ref.columns)  # where rows were scored stays out of scores.parquet
    got, ref = got.set_index("sample_id"), ref.set_index("sample_id")
    assert got.index.is_unique and set(got.index) == set(ref.index)
    np.testing.assert_allclose(got.loc[ref.index, COLUMNS].to_numpy(float), ref[COLUMNS].to_numpy(float), atol=1e-6)


def _scored_on(parts: list[Path]) -> list[str]:
    """The node of every row in ``parts``."""
    return [node for p in parts for node in pq.read_table(p, columns=[SCORED_ON]).column(SCORED_ON).to_pylist()]


def _parts(run: Path) -> list[Path]:
    return sorted((run / "parts").glob("part-*.parquet"))


# ids not "gpu": tests/conftest.py skips tests carrying that keyword on machines without CUDA
@pytest.mark.parametrize("profile", ["cpu", "gpu"], ids=["cpu_profile", "gpu_profile"])
def test_one_actor_per_worker_node_and_a_lost_node_mid_score(sim_cluster, job, tmp_path, profile):
    """Two actors that fit one per worker node both score, the head none; then one node vanishes mid-run and the
    run finishes on the other with every score of the undisturbed in-process run (module docstring)."""
    out = tmp_path / "run"
    # calls slowed: the loss lands mid-run, and the actor that loads its model first cannot score every block alone
    proc = _score(sim_cluster, job, out, *PROFILES[profile], delay=1.5)
    workers = {w.node_id for w in sim_cluster.workers}
    deadline = time.monotonic() + 240
    while set(_scored_on(_parts(out))) != workers:  # both actors have written parts, and 12 blocks leave work for both
        assert proc.poll() is None, _tail(proc.communicate()[0])
        assert time.monotonic() < deadline, f"no parts from both worker nodes in 240 s: {_scored_on(_parts(out))}"
        time.sleep(0.2)
    victim, survivor = sim_cluster.workers
    sim_cluster.remove_worker(victim, wait_until_dead=False)
    before_loss = set(_parts(out))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, _tail(log)
    assert "2 actor(s) × (3.5 CPU" in log
    after_loss = _scored_on([p for p in _parts(out) if p not in before_loss])
    assert survivor.node_id in after_loss, "nothing was scored after the node loss: it was not mid-run"
    rows_per_node = json.loads((out / "run.json").read_text())["ray"]["rows_per_node"]
    assert set(rows_per_node) == workers and sum(rows_per_node.values()) == N_RECORDS, rows_per_node
    _assert_matches_reference(out, job / "inproc")


def test_shutdown_leaves_no_process_no_temp_dir_and_no_environment_change(tmp_path):
    environ = dict(os.environ)
    sim = SimulatedCluster(n_workers=1)
    try:
        task = "import ray; ray.init(); print(ray.get(ray.remote(lambda: 7).remote()))"
        driver = subprocess.run([sys.executable, "-c", task], env=sim.env, capture_output=True, text=True, timeout=120)
        assert driver.stdout.strip().endswith("7"), _tail(driver.stderr)
        pids, root = sim.processes(), sim.root
        assert len(pids) > 5 and root.is_dir()  # host, GCS, raylets, agents, the worker that ran the task
    finally:
        sim.shutdown()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not root.exists() and dict(os.environ) == environ


def _submit(sim: SimulatedCluster, *entrypoint: str) -> subprocess.CompletedProcess:
    """``ray job submit`` from the repository root with the runtime environment users submit with."""
    return subprocess.run([RAY, "job", "submit", "--address", sim.dashboard_url, "--runtime-env",
                           "cluster/runtime_env.yaml", "--", *entrypoint], cwd=REPO_ROOT, env=sim.env,
                          capture_output=True, text=True, timeout=400)


def test_job_submit_scores_with_the_checkout_as_working_dir(cluster, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in word_records(12, seed=3)))
    directions = save_random_directions(tmp_path, "tiny-llama")
    sets = [f"data.path={corpus}", f"directions.danger={directions['danger']}",
            f"directions.safety={directions['safety']}", "fidelity.enabled=false", "ray.rows_per_call=4"]
    args = [arg for s in sets for arg in ("--set", s)]
    assert main(["score", "--config", str(REPO_ROOT / "jobs" / "score_tiny.yaml"), *args, "--set",
                 f"output.dir={tmp_path / 'inproc'}", "--set", "ray.enabled=false"]) == 0
    # a relative --config: it resolves only in the uploaded checkout, where the job's driver starts
    submit = _submit(cluster, sys.executable, "-m", "sqsd_ray.cli", "score", "--config", "jobs/score_tiny.yaml", *args,
                     "--set", f"output.dir={tmp_path / 'out'}")
    assert submit.returncode == 0, _tail(submit.stdout) + _tail(submit.stderr)
    assert "succeeded" in submit.stdout.lower()
    rows_per_node = json.loads((tmp_path / "out" / "run.json").read_text())["ray"]["rows_per_node"]
    assert set(rows_per_node) <= {w.node_id for w in cluster.workers} and sum(rows_per_node.values()) == 12
    _assert_matches_reference(tmp_path / "out", tmp_path / "inproc")
    outward = [s for s in cluster.listening_sockets() if not is_loopback(s[1])]
    assert not outward, f"cluster processes listening beyond loopback: {outward}"


def test_job_submit_fine_tunes_with_a_worker_on_each_node(cluster, tmp_path, shared_data):
    out = tmp_path / "train"
    config = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(shared_data / "benign" / "dolly_387.jsonl"), "limit": 16, "max_length": 128},
        "train": {"objective": "sft", "lr": 1e-3, "batch_size": 4, "max_steps": 3, "checkpoint_every": 0,
                  "lr_schedule": "constant"},
        # 4 CPUs per worker, a whole worker node each: the job can only run with one rank on each node, so the two
        # gloo workers talk across nodes
        "scaling": {"use_ray": True, "num_workers": 2, "cpus_per_worker": 4, "torch_threads": 1},
        "direction": {"kind": "danger"},
        "output": {"dir": str(out)},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    submit = _submit(cluster, sys.executable, "-m", "sqsd_ray.cli", "directions", "build", "--config",
                     str(tmp_path / "train.yaml"))
    assert submit.returncode == 0, _tail(submit.stdout) + _tail(submit.stderr)
    adapter = out / "train" / "step-000003" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    factors, _ = load_adapter_state(adapter)
    assert factors and all(float(B.abs().sum()) > 0 for _, B in factors.values()), "B stayed at its zero init"
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    assert (out / "danger.safetensors").is_file()
