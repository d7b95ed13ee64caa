"""`ray job submit` end to end: a private head on its own ports and temp dir, a tiny scoring job, Parquet back.

The head runs as `ray start --head --block` in a child process and is stopped by that PID (never `ray stop`,
which would kill every Ray process on the machine). Ray 2.60 job submission needs RAY_AUTH_MODE=token; the
token is generated into a private HOME so the user's ~/.ray is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO_ROOT, save_random_directions

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited early with code {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # up, and asking for the token: good enough
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dashboard at {url} did not come up in {timeout} s")


@pytest.fixture
def ray_head(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = Path("/tmp") / f"sqsdray-{os.getpid()}-{int(time.time())}"  # short: Ray's socket paths have a length limit
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: with --node-ip-address=127.0.0.1, every process of the head listens on
    # loopback (otherwise Ray swaps in the machine's outward address and binds every interface)
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    dash_port = _free_port()
    cmd = [RAY, "start", "--head", "--block", f"--port={_free_port()}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
           f"--temp-dir={temp_dir}", "--num-cpus=2", "--object-store-memory=150000000", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        _wait_for_dashboard(url, proc)
        yield url, env
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` tears down the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_scores_a_corpus(ray_head, tmp_path):
    url, env = ray_head
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer number {i}."}) + "\n" for i in range(12)))
    save_random_directions(tmp_path, "tiny-llama")
    config = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(corpus)},
        "directions": {"danger": str(tmp_path / "danger.safetensors"), "safety": str(tmp_path / "safety.safetensors")},
        "output": {"dir": str(tmp_path / "out")},
        "ray": {"rows_per_call": 4},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--", sys.executable, "-m", "sqsd_ray.cli", "score",
         "--config", str(tmp_path / "job.yaml")],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    df = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert len(df) == 12 and df["sample_id"].is_unique and (df["status"] == "ok").all()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["execution"] == "ray"
