"""The train loop on Ray Train: DeepSpeed ZeRO-2/3 reach the DDP weights and save real adapters, full
fine-tuning saves whole models, and a killed worker resumes from the last checkpoint without changing the
result."""

from __future__ import annotations

import json

import pytest
import torch

from sqsd_ray.data.records import DataConfig
from sqsd_ray.models.loading import ModelConfig, load_model
from sqsd_ray.models.lora import load_adapter_state
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.checkpoint import load_weights
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings
from sqsd_ray.training.loop import run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _job(tmp_path, shared_data, name, scaling: WorkerScaling, **train) -> TrainJobConfig:
    settings = dict(lr=1e-3, batch_size=4, max_steps=3, checkpoint_every=0, lr_schedule="constant")
    settings.update(train)
    return TrainJobConfig(
        model=ModelConfig(name_or_path="tiny-llama"),
        data=DataConfig(path=str(shared_data / "benign" / "dolly_387.jsonl"), limit=16, max_length=128),
        train=TrainSettings(**settings), scaling=scaling, output=TrainOutput(dir=str(tmp_path / name)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_data):
    """The same LoRA job in this process, no DeepSpeed: the weights every other run must reach."""
    run = run_training(_job(tmp_path_factory.mktemp("ref"), shared_data, "ref", WorkerScaling(use_ray=False)))
    return load_adapter_state(run.final / "adapter")[0], run.history


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_reaches_the_ddp_weights_and_saves_a_real_adapter(local_ray, tmp_path, shared_data, reference, stage):
    run = run_training(_job(tmp_path, shared_data, f"zero{stage}", WorkerScaling(num_workers=2, torch_threads=1),
                            zero_stage=stage, stage3_param_persistence_threshold=0 if stage == 3 else None))
    factors, _ = load_adapter_state(run.final / "adapter")
    expected, history = reference
    assert set(factors) == set(expected) and len(factors) == 14
    for name, (a, b) in expected.items():
        assert factors[name][0].shape == a.shape and factors[name][1].norm() > 0  # not an empty ZeRO-3 save
        assert torch.allclose(factors[name][1], b, rtol=1e-3, atol=1e-6), name
    assert [round(h["loss"], 4) for h in run.history] == [round(h["loss"], 4) for h in history]
    state = json.loads((run.final / "trainer_state.json").read_text())
    assert state["optimizer_state"] is True  # AdamW's moments, assembled whole from the ZeRO partitions


def test_full_fine_tuning_with_zero3_saves_the_whole_model(local_ray, tmp_path, shared_data):
    run = run_training(_job(tmp_path, shared_data, "full", WorkerScaling(num_workers=2, torch_threads=1),
                            method="full", lr=1e-4, zero_stage=3, stage3_param_persistence_threshold=0))
    assert (run.final / "model" / "config.json").is_file() and list((run.final / "model").glob("*.safetensors"))
    base, tuned = load_model(ModelConfig(name_or_path="tiny-llama")), load_model(ModelConfig(name_or_path="tiny-llama"))
    load_weights(tuned, run.final, "full")
    moved = [n for (n, p), (_, q) in zip(base.named_parameters(), tuned.named_parameters()) if not torch.equal(p, q)]
    assert len(moved) > 10  # every layer trained, nothing left empty


@pytest.mark.parametrize("workers,stage", [(1, 0), (3, 3)])
def test_killed_worker_resumes_from_the_last_checkpoint(local_ray, tmp_path, shared_data, workers, stage):
    """Rank 0 dies at step 3; Ray Train restarts the group from step 2. With three ZeRO-3 workers each rank gets
    its slice of AdamW's moments back (3 divides no LoRA tensor here: the last slice is padded), so the run
    continues the uninterrupted one (loss within 1e-5)."""
    run = run_training(_job(tmp_path, shared_data, "drill",
                            WorkerScaling(num_workers=workers, cpus_per_worker=0.5, torch_threads=1, fail_at_step=3,
                                          max_failures=1),
                            batch_size=6, max_steps=5, checkpoint_every=2, zero_stage=stage,
                            stage3_param_persistence_threshold=0 if stage == 3 else None))
    assert (tmp_path / "drill" / ".fault_drill_done").read_text().startswith("killed at step 3")
    assert [h["step"] for h in run.history] == [1, 2, 3, 4, 5]  # steps 1-2 from the checkpoint, 3-5 after
    straight = run_training(_job(tmp_path, shared_data, "straight", WorkerScaling(use_ray=False), batch_size=6,
                                 max_steps=5, checkpoint_every=2))
    for a, b in zip(run.history, straight.history):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    a, _ = load_adapter_state(run.final / "adapter")
    b, _ = load_adapter_state(straight.final / "adapter")
    for name in a:  # moments restored exactly: the interrupted run equals the straight one
        assert torch.allclose(a[name][1], b[name][1], rtol=1e-5, atol=1e-7), name


def test_a_worker_lost_beyond_max_failures_stops_with_what_was_kept(local_ray, tmp_path, shared_data):
    """No restart allowed: the worker that dies at step 3 (SIGKILL, as with a lost node) ends the run with
    WorkersLost naming the checkpoint of step 2 and how to resume, not with Ray's traceback."""
    from sqsd_ray.runtime import WorkersLost

    with pytest.raises(WorkersLost, match=r"training workers \[0\] died .*step-000002 are kept .*rerun the same "
                                          r"command"):
        run_training(_job(tmp_path, shared_data, "lost", WorkerScaling(num_workers=1, torch_threads=1,
                                                                        fail_at_step=3, max_failures=0),
                          max_steps=5, checkpoint_every=2))
