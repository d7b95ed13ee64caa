"""A two-worker fine-tune across the nodes of a simulated cluster survives the loss of one node.

Each Ray Train worker reserves a whole worker node (4 CPUs), so rank 0 and rank 1 run on different nodes and a lost
node takes one rank with it. What the product does (``scaling.max_failures``, ``scaling.restart_wait_s``):

- a node is added in the lost one's place: Ray Train restarts the worker group there, it resumes from the last
  checkpoint (AdamW's state included) and the run ends as the undisturbed one would (loss within 1e-5);
- nobody replaces it: the restarted group waits ``restart_wait_s`` for its workers, then the command exits 3 with
  one line naming the kept checkpoint and saying to rerun it; rerun once workers are back, it resumes and ends as
  the undisturbed run would.

The driver is ``sqsd-ray directions build`` (V_danger: a LoRA SFT fine-tune, the longest training a scoring job
waits for) in a subprocess attached to the cluster, its steps slowed down (``tests.train_slowly``) so the node goes
while training is under way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sqsd_ray.data.records import DataConfig
from sqsd_ray.models.loading import ModelConfig
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.checkpoint import list_checkpoints
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings
from sqsd_ray.training.loop import run_training
from tests.cluster_sim import simulated_cluster
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS, RESTART_WAIT_S = 10, 20
SETTINGS = dict(lr=1e-3, batch_size=4, max_steps=STEPS, checkpoint_every=2, lr_schedule="cosine", warmup_ratio=0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with simulated_cluster(tmp_path_factory.mktemp("cluster")) as sim:
        yield sim


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, shared_data):
    """The same job in this process, never interrupted: the losses every disturbed run must reproduce."""
    out = tmp_path_factory.mktemp("undisturbed")
    run = run_training(TrainJobConfig(
        model=ModelConfig(name_or_path="tiny-llama"), data=_data(shared_data), train=TrainSettings(**SETTINGS),
        scaling=WorkerScaling(use_ray=False), output=TrainOutput(dir=str(out / "run"))))
    return [h["loss"] for h in run.history]


def _data(shared_data: Path) -> DataConfig:
    return DataConfig(path=str(shared_data / "benign" / "dolly_387.jsonl"), limit=16, max_length=128)


def _write_job(root: Path, shared_data: Path) -> Path:
    config = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(shared_data / "benign" / "dolly_387.jsonl"), "limit": 16, "max_length": 128},
        "train": SETTINGS,
        "scaling": {"num_workers": 2, "cpus_per_worker": 4, "torch_threads": 1, "max_failures": 1,
                    "restart_wait_s": RESTART_WAIT_S},
        "direction": {"kind": "danger"},
        "output": {"dir": str(root / "run")},
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    return root / "train.yaml"


def _start(job: Path, env: dict, step_delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.train_slowly", str(step_delay), "--", "directions", "build", "--config",
                             str(job)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(int(p.name.split("-")[1]) >= step for p in list_checkpoints(run_dir)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"no checkpoint at step {step} after {timeout:.0f} s")
        time.sleep(0.2)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _assert_continues(run_dir: Path, undisturbed: list[float]) -> None:
    losses = _losses(run_dir)
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, undisturbed)) <= 1e-5, (losses, undisturbed)


def test_a_replacement_node_takes_over_and_the_run_continues(cluster, tmp_path, shared_data, undisturbed):
    job = _write_job(tmp_path, shared_data)
    proc = _start(job, cluster.env, step_delay=1.0)
    _wait_for_checkpoint(tmp_path / "run", 2, proc)
    cluster.remove_worker(cluster.workers[0], wait_until_dead=False)
    cluster.add_worker()
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-5000:]
    assert "RETRY" in out, out[-5000:]  # Ray Train's failure policy restarted the worker group
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == f"step-{STEPS:06d}"
    _assert_continues(tmp_path / "run", undisturbed)


def test_without_a_replacement_the_run_stops_in_time_and_a_rerun_resumes(cluster, tmp_path, shared_data, undisturbed):
    job = _write_job(tmp_path, shared_data)
    proc = _start(job, cluster.env, step_delay=1.0)
    _wait_for_checkpoint(tmp_path / "run", 2, proc)
    cluster.remove_worker(cluster.workers[0], wait_until_dead=False)
    lost = time.monotonic()
    out, _ = proc.communicate(timeout=RESTART_WAIT_S + 240)
    waited = time.monotonic() - lost
    assert proc.returncode == 3, out[-5000:]
    message = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and "restart_wait_s" in message[0] and "rerun the same command" in message[0], out[-3000:]
    kept = list_checkpoints(tmp_path / "run")
    assert kept and kept[-1].name in message[0] and int(kept[-1].name.split("-")[1]) < STEPS
    assert waited <= RESTART_WAIT_S + 90, f"stopped {waited:.0f} s after the node was lost"
    print(f"stopped {waited:.0f} s after the node was lost (restart_wait_s {RESTART_WAIT_S}): {message[0]}")

    cluster.add_worker()  # workers are back: the same command resumes from the kept checkpoint
    rerun = subprocess.run([sys.executable, "-m", "sqsd_ray.cli", "directions", "build", "--config",
                            str(job)], cwd=REPO_ROOT,
                           env=cluster.env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"from {kept[-1].name}" in rerun.stdout + rerun.stderr
    _assert_continues(tmp_path / "run", undisturbed)
