"""``output.storage_path``: Ray Train persists a run at a pyarrow.fs URI (here ``file://``, as s3:// or gs:// would be),
while the run directory keeps its usual layout: the checkpoints are copied home when the run ends, so train_log.jsonl,
the adapters and every reader of a run directory work as before. A run directory lost with its head node is rebuilt
from the storage, and a storage holding another job's checkpoints is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest

from sqsd_ray.data.records import DataConfig
from sqsd_ray.models.loading import ModelConfig
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings, training_identity
from sqsd_ray.training.loop import _separate_storage, run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = ["step-000001", "step-000002"]


def _job(tmp_path, shared_data, storage_uri: str, lr: float = 1e-3, run: str = "run", **output) -> TrainJobConfig:
    return TrainJobConfig(
        model=ModelConfig(name_or_path="tiny-llama"),
        data=DataConfig(path=str(shared_data / "benign" / "dolly_387.jsonl"), limit=8, max_length=96),
        train=TrainSettings(lr=lr, batch_size=4, max_steps=2, checkpoint_every=1, lr_schedule="constant"),
        scaling=WorkerScaling(num_workers=1, cpus_per_worker=1, torch_threads=1),
        output=TrainOutput(dir=str(tmp_path / run), storage_path=storage_uri, **output))


def test_ray_train_writes_checkpoints_under_a_file_uri_and_the_run_dir_keeps_its_layout(local_ray, tmp_path,
                                                                                       shared_data):
    stored = tmp_path / "bucket" / "sqsd" / "train"
    job = _job(tmp_path, shared_data, f"file://{tmp_path / 'bucket' / 'sqsd'}")
    run = run_training(job)

    assert sorted(p.name for p in stored.glob("step-*")) == STEPS  # written there by the Ray Train worker
    assert [p.name for p in run.checkpoints] == STEPS and run.dir == tmp_path / "run"
    for step in STEPS:
        ours = (tmp_path / "run" / "train" / step / "adapter" / "adapter_model.safetensors").read_bytes()
        assert ours == (stored / step / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()] \
        == [1, 2]
    # Ray Train's own run state stays in the storage; the run directory holds checkpoints only
    assert [p.name for p in stored.iterdir() if not p.name.startswith("step-")]
    assert sorted(p.name for p in (tmp_path / "run" / "train").iterdir()) == STEPS

    # the head node is lost with the run directory: the same command rebuilds it from the storage
    shutil.rmtree(tmp_path / "run")
    again = run_training(job)
    assert [p.name for p in again.checkpoints] == STEPS
    assert [h["loss"] for h in again.history] == [h["loss"] for h in run.history]

    # another job is refused before it trains over these checkpoints, naming the key; overwrite clears the storage
    other = _job(tmp_path, shared_data, job.output.storage_path, lr=2e-3, run="other")
    with pytest.raises(FileExistsError, match=r"output.storage_path file://.* already holds checkpoints "
                                              r"\(train/step-000002\) and they belong to a different job"):
        run_training(other)
    replacing = _job(tmp_path, shared_data, job.output.storage_path, lr=2e-3, run="other", overwrite=True)
    _separate_storage(replacing, tmp_path / "other", training_identity(replacing))
    assert not stored.exists()


def test_restore_on_ray_train_keeps_its_run_record_under_the_storage_uri(local_ray, tmp_path):
    from sqsd_ray.config import load_config
    from sqsd_ray.mitigation.restore_job import RestoreConfig, run_restore
    from tests.ray.test_restore_ray import HARMFUL, TASK, _adapter, _jsonl

    out = run_restore(load_config(RestoreConfig, None, [
        "model.name_or_path=tiny-llama", f"fine_tuned.adapter={_adapter(tmp_path)}",
        f"harmful.path={_jsonl(tmp_path / 'h.jsonl', HARMFUL)}", f"retain.path={_jsonl(tmp_path / 't.jsonl', TASK)}",
        "restore.max_iters=1", "restore.lbfgs_probes=1", "device=cpu", "scaling.use_ray=true",
        "scaling.cpus_per_worker=1", "scaling.torch_threads=1", f"output.dir={tmp_path / 'restored'}",
        f"output.storage_path=file://{tmp_path / 'bucket'}"]))
    assert (tmp_path / "bucket" / "ray_train").is_dir() and not (out / "ray_train").exists()
    assert (out / "restore.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
