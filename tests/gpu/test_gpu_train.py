"""Training and evaluation on CUDA: one process, then ZeRO-3 under Ray Train with nccl. Skipped without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from sqsd_ray.data.records import DataConfig
from sqsd_ray.evaluation.generate import EvalSettings
from sqsd_ray.evaluation.job import EvalJobConfig, EvalWorkers, run_evaluate
from sqsd_ray.models.loading import ModelConfig
from sqsd_ray.models.lora import load_adapter_state
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings
from sqsd_ray.training.loop import run_training

pytestmark = pytest.mark.gpu


def _job(tmp_path, corpus, name, scaling, **train):
    return TrainJobConfig(model=ModelConfig(name_or_path="tiny-llama"), data=DataConfig(path=str(corpus)),
                          train=TrainSettings(lr=1e-3, batch_size=4, max_steps=3, checkpoint_every=0, **train),
                          scaling=scaling, output=TrainOutput(dir=str(tmp_path / name)))


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": f"answer number {i}."}) + "\n"
                            for i in range(16)))
    return path


def test_cuda_training_saves_an_adapter_and_evaluates(tmp_path, corpus):
    cuda = run_training(_job(tmp_path, corpus, "cuda", WorkerScaling(use_ray=False)))
    assert torch.cuda.is_available()
    state, _ = load_adapter_state(cuda.final / "adapter")
    assert all(b.norm() > 0 for _, b in state.values())
    out = run_evaluate(EvalJobConfig(model=ModelConfig(name_or_path="tiny-llama"),
                                     states={"base": "base", "tuned": str(cuda.final / "adapter")},
                                     benchmarks=[EvalSettings(limit=8, max_new_tokens=8)],
                                     workers=EvalWorkers(use_ray=False), output_dir=str(tmp_path / "eval")))
    assert (out / "metrics.csv").is_file()


def test_zero3_on_ray_train_with_nccl(tmp_path, corpus):
    run = run_training(_job(tmp_path, corpus, "zero3", WorkerScaling(num_workers=1, use_gpu=True), zero_stage=3,
                            stage3_param_persistence_threshold=0))
    state, _ = load_adapter_state(run.final / "adapter")
    assert all(b.norm() > 0 for _, b in state.values())
