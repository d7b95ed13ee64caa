"""Local Ray for the ray tier: small (2 CPUs, 150 MB object store, no dashboard), one per session; a simulated
multi-node cluster per test (``sim_cluster``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from sqsd_ray.runtime import LOOPBACK, loopback_only

    if not ray.is_initialized():
        loopback_only()
        ray.init(num_cpus=2, object_store_memory=150_000_000, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, _node_ip_address=LOOPBACK)
    yield ray
    ray.shutdown()


@pytest.fixture
def sim_cluster(tmp_path):
    """A fresh simulated multi-node cluster for one test (``tests/cluster_sim.py``): a head with 0 CPUs and two
    worker nodes of 4 logical CPUs and 1 logical GPU each, all on 127.0.0.1, no dashboard. Drive it from
    subprocesses with ``env=sim_cluster.env`` (the pytest process stays the driver of ``local_ray`` only); the
    test may ``remove_worker`` / ``add_worker``. For ``ray job submit``: ``simulated_cluster(tmp_path,
    dashboard=True)``."""
    from tests.cluster_sim import simulated_cluster

    with simulated_cluster(tmp_path) as sim:
        yield sim


def word_records(n: int, seed: int, prompt_words: int = 12, response_words: int = 30) -> list[dict]:
    """``n`` seeded prompt/response records of varied length (ids r000, r001, ...)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta river mountain quiet bright swift orange window garden".split()
    return [{"id": f"r{i:03d}", "prompt": f"Q{i}: {' '.join(rng.choice(words, size=rng.integers(3, prompt_words)))}?",
             "response": " ".join(rng.choice(words, size=rng.integers(1, response_words))).capitalize() + "."}
            for i in range(n)]


def write_score_job(root, records: list[dict], direction_seeds: tuple[int, int], ray: dict):
    """A tiny-qwen3 score job in ``root``: corpus, two random directions, score.yaml, and its in-process run in
    ``root/inproc`` (the reference the Ray paths are compared with)."""
    import json

    import yaml

    from sqsd_ray.cli import main
    from tests.conftest import save_random_directions

    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_random_directions(root, "tiny-qwen3", seeds=direction_seeds)
    config = {
        "model": {"name_or_path": "tiny-qwen3"},
        "data": {"path": str(root / "corpus.jsonl"), "max_length": 256},
        "directions": {"danger": str(root / "danger.safetensors"), "safety": str(root / "safety.safetensors")},
        "batching": {"max_batch_size": 4, "max_tokens": 2048},
        "output": {"dir": str(root / "inproc")},
        "ray": ray,
    }
    (root / "score.yaml").write_text(yaml.safe_dump(config))
    assert main(["score", "--config", str(root / "score.yaml"), "--set", "ray.enabled=false"]) == 0
    return root
