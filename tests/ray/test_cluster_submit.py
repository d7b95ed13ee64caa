"""``ray job submit --runtime-env cluster/runtime_env.yaml`` as users run it, against the head of a simulated cluster
(``tests/cluster_sim.py``: token auth, dashboard and every process on 127.0.0.1): the checkout is uploaded as the job's
working dir, so a relative jobs/ path resolves on the cluster; a tiny ``directions build`` trains on the worker node
and Ray Train persists it at a ``file://`` ``output.storage_path``; the job ends SUCCEEDED and its logs say so."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.cluster_sim import RAY, is_loopback, simulated_cluster
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _ray_job(sim, command: str, *args: str, timeout: float = 120) -> str:
    done = subprocess.run([RAY, "job", command, "--address", sim.dashboard_url, *args], cwd=REPO_ROOT, env=sim.env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _wait_for_end(sim, job_id: str, timeout: float = 600) -> str:
    """The job's final JobStatus, from the job submission client (with the cluster's token, in its environment)."""
    ask = ("import sys; from ray.job_submission import JobSubmissionClient; "
           "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run([sys.executable, "-c", ask, sim.dashboard_url, job_id], env=sim.env,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-3000:]
        if status.stdout.strip() in TERMINAL:
            return status.stdout.strip()
        time.sleep(3)
    raise TimeoutError(f"job {job_id} did not end in {timeout:.0f} s:\n{_ray_job(sim, 'logs', job_id)[-3000:]}")


def test_a_verb_submitted_with_the_runtime_env_file_runs_from_the_uploaded_checkout(tmp_path, shared_data):
    storage = tmp_path / "bucket"
    sets = [f"data.path={shared_data / 'eval' / 'advbench_harmful_behaviors.csv'}", "data.limit=16",
            "train.max_steps=2", "train.checkpoint_every=1", f"output.dir={tmp_path / 'danger'}",
            f"output.storage_path=file://{storage}", "scaling.cpus_per_worker=1", "scaling.torch_threads=1"]
    # a relative --config: it resolves only in the uploaded checkout, where the job's driver starts
    entrypoint = [sys.executable, "-m", "sqsd_ray.cli", "directions", "build", "--config",
                  "jobs/directions_tiny_danger.yaml", *[arg for s in sets for arg in ("--set", s)]]
    with simulated_cluster(tmp_path, dashboard=True, n_workers=1) as sim:
        _ray_job(sim, "submit", "--runtime-env", "cluster/runtime_env.yaml", "--submission-id", "tiny-directions",
                 "--no-wait", "--", *entrypoint)
        state = _wait_for_end(sim, "tiny-directions")
        logs = _ray_job(sim, "logs", "tiny-directions")
        outward = [s for s in sim.listening_sockets() if not is_loopback(s[1])]
    assert state == "SUCCEEDED", logs[-3000:]
    assert "trained 2 steps" in logs and f"{tmp_path / 'danger'}" in logs, logs[-3000:]
    assert not outward, f"cluster processes listening beyond loopback: {outward}"
    # Ray Train wrote the checkpoints at the URI; the run directory got its copies and the direction
    assert sorted(p.name for p in (storage / "train").glob("step-*")) == ["step-000001", "step-000002"]
    assert (tmp_path / "danger" / "train" / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "danger" / "danger.safetensors").is_file()
    index = json.loads((tmp_path / "danger" / "checkpoints.json").read_text())
    assert [row["step"] for row in index] == [1, 2]
