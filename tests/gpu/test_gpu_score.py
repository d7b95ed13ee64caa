"""The scoring pipeline on CUDA (bf16 and fp32). Skipped without a GPU; run where one is lent."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sqsd_ray.cli import main
from tests.conftest import tiny_score_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpujob")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta river mountain quiet bright swift orange window garden".split()
    records = [{"id": f"g{i:03d}", "prompt": " ".join(rng.choice(words, size=rng.integers(3, 20))) + "?",
                "response": " ".join(rng.choice(words, size=rng.integers(1, 60))) + "."} for i in range(64)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tiny_score_config(root, root / "corpus.jsonl", max_length=512, output={"dir": str(root / "cpu")},
                               batching={"device": "cpu"})
    (root / "score.yaml").write_text(yaml.safe_dump(config))
    assert main(["score", "--config", str(root / "score.yaml")]) == 0
    return root


def _scores(path):
    return pd.read_parquet(path / "scores.parquet").set_index("sample_id")


def test_cuda_fp32_matches_cpu(job):
    assert main(["score", "--config", str(job / "score.yaml"), "--set", "batching.device=cuda",
                 "--set", "batching.max_batch_size=16", "--set", f"output.dir={job / 'cuda32'}"]) == 0
    cpu, gpu = _scores(job / "cpu"), _scores(job / "cuda32")
    np.testing.assert_allclose(gpu.loc[cpu.index, "sqsd"], cpu["sqsd"], atol=1e-4)


def test_cuda_bf16_through_ray_ranks_like_fp32(job):
    import ray

    from sqsd_ray.runtime import LOOPBACK, loopback_only

    loopback_only()
    ray.init(num_gpus=1, num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address=LOOPBACK)
    try:
        assert main(["score", "--config", str(job / "score.yaml"), "--set", "ray.enabled=true",
                     "--set", "ray.profile=gpu", "--set", "batching.device=cuda", "--set", "model.dtype=bfloat16",
                     "--set", f"output.dir={job / 'cuda_bf16'}"]) == 0
    finally:
        ray.shutdown()
    cpu, bf16 = _scores(job / "cpu"), _scores(job / "cuda_bf16")
    assert (bf16["status"] == "ok").all() and bf16.index.is_unique and len(bf16) == len(cpu)
    rho = pd.Series(bf16.loc[cpu.index, "sqsd"].to_numpy()).corr(pd.Series(cpu["sqsd"].to_numpy()), method="spearman")
    assert rho > 0.95, rho
    assert torch.cuda.max_memory_allocated() >= 0
