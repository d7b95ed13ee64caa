"""train.deepspeed_config: a user's DeepSpeed JSON merged into the engine config (the file wins, except on the keys
the loop derives from its own settings), the one log line naming what was replaced, errors naming the file, and the
run identity."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from sqsd_ray.config import ConfigError
from sqsd_ray.data.records import DataConfig
from sqsd_ray.models.loading import ModelConfig
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings, training_identity
from sqsd_ray.training.zero import engine_config, merge_deepspeed_config, read_deepspeed_config
from tests.unit.test_training_checkpointing import PRE_FEATURE_DATA, PRE_FEATURE_IDENTITY

USER_CONFIG = {
    "train_batch_size": 64,  # owned: replaced by 8
    "gradient_accumulation_steps": 2,  # owned, and equal to ours: nothing replaced
    "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 50_000_000},
    "optimizer": {"params": {"betas": [0.9, 0.95], "weight_decay": 0.1}},
    "gradient_clipping": 0.5,
    "wall_clock_breakdown": True,
}


def _write(path, content) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _settings(tmp_path, user=USER_CONFIG) -> TrainSettings:
    # 8 samples per step over 2 workers in micro-batches of 2: 2 accumulation steps per worker
    return TrainSettings(zero_stage=2, batch_size=8, micro_batch_size=2, lr=1e-4, max_grad_norm=1.0,
                         deepspeed_config=_write(tmp_path / "ds.json", user))


def test_the_file_wins_except_on_the_keys_the_loop_owns(tmp_path):
    merged = engine_config(_settings(tmp_path), world_size=2, dtype=torch.float32)
    assert (merged["train_batch_size"], merged["train_micro_batch_size_per_gpu"],
            merged["gradient_accumulation_steps"]) == (8, 2, 2)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 50_000_000}
    # nested objects merge key by key: our optimizer type and lr stay, the file's betas and decay come in
    assert merged["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1, "torch_adam": True,
                                                               "betas": [0.9, 0.95]}}
    assert merged["gradient_clipping"] == 0.5 and merged["wall_clock_breakdown"] is True
    assert merged["bf16"] == {"enabled": False}  # ours, where the file says nothing


def test_merge_leaves_both_inputs_alone_and_lists_only_changed_owned_keys():
    ours = {"train_batch_size": 8, "gradient_accumulation_steps": 1, "train_micro_batch_size_per_gpu": 8,
            "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    user = {"zero_optimization": {"stage": 3, "offload_optimizer": {"pin_memory": True}},
            "train_micro_batch_size_per_gpu": "auto"}
    before = json.dumps([ours, user])
    merged, overridden = merge_deepspeed_config(ours, user)
    assert json.dumps([ours, user]) == before
    assert merged["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert merged["train_micro_batch_size_per_gpu"] == 8
    assert overridden == ["train_micro_batch_size_per_gpu (file: 'auto', used: 8)"]


def test_one_log_line_names_every_replaced_value(tmp_path, caplog):
    settings = _settings(tmp_path)
    with caplog.at_level(logging.INFO, logger="sqsd_ray.training.zero"):
        engine_config(settings, world_size=2, dtype=torch.float32)
    records = [r for r in caplog.records if r.name == "sqsd_ray.training.zero"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert settings.deepspeed_config in line
    assert "train_batch_size (file: 64, used: 8)" in line and "zero_optimization.stage (file: 3, used: 2)" in line
    assert "gradient_accumulation_steps" not in line  # the file's value was ours already
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sqsd_ray.training.zero"):
        engine_config(settings, world_size=2, dtype=torch.float32, log_overrides=False)  # ranks other than 0
        engine_config(_settings(tmp_path, {"gradient_clipping": 0.5}), world_size=2, dtype=torch.float32)
    assert not [r for r in caplog.records if r.name == "sqsd_ray.training.zero"]


@pytest.mark.parametrize("content,message", [
    (None, r"train.deepspeed_config: file .*missing.json .*does not exist"),
    ('{"train_batch_size": 8,}', r"train.deepspeed_config: .*ds.json is not valid JSON \(.*line 1 column 24"),
    ("[1, 2]", r"train.deepspeed_config: .*ds.json must hold a JSON object .*got list"),
    ('{"zero_optimization": 2}', r"train.deepspeed_config: zero_optimization must be a JSON object, got 2"),
])
def test_errors_name_the_file_and_the_problem(tmp_path, content, message):
    path = str(tmp_path / "missing.json") if content is None else _write(tmp_path / "ds.json", content)
    with pytest.raises(ConfigError, match=message):
        engine_config(TrainSettings(zero_stage=2, deepspeed_config=path), world_size=1, dtype=torch.float32)


def test_the_file_needs_a_zero_stage():
    with pytest.raises(ConfigError, match="train.deepspeed_config .* only with train.zero_stage 2 or 3"):
        TrainSettings(deepspeed_config="ds.json")


def test_the_file_joins_the_identity_only_when_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(PRE_FEATURE_DATA)

    def identity(**train) -> str:
        return training_identity(TrainJobConfig(
            model=ModelConfig(name_or_path="tiny-llama"), data=DataConfig(path="d.jsonl"),
            train=TrainSettings(**train), scaling=WorkerScaling(use_ray=False), output=TrainOutput(dir="run")))

    assert identity(zero_stage=2) == PRE_FEATURE_IDENTITY  # the stage is layout, not identity
    _write(tmp_path / "ds.json", {"gradient_clipping": 0.5})
    with_file = identity(zero_stage=2, deepspeed_config="ds.json")
    assert with_file != PRE_FEATURE_IDENTITY
    _write(tmp_path / "ds.json", {"gradient_clipping": 0.25})  # edited in place: another job
    assert identity(zero_stage=2, deepspeed_config="ds.json") not in (with_file, PRE_FEATURE_IDENTITY)
    with pytest.raises(ConfigError, match="is not valid JSON"):  # before any worker starts
        _write(tmp_path / "ds.json", "{")
        identity(zero_stage=2, deepspeed_config="ds.json")


def test_read_deepspeed_config_returns_the_object(tmp_path):
    assert read_deepspeed_config(_write(tmp_path / "ds.json", USER_CONFIG)) == USER_CONFIG


@pytest.mark.slow
def test_a_zero_run_trains_with_the_merged_config(tmp_path, monkeypatch, caplog):
    """In-process ZeRO-2 run: DeepSpeed gets (and accepts) the merged config; the run ends with its checkpoint."""
    import deepspeed

    from sqsd_ray.training.loop import run_training

    seen = []
    initialize = deepspeed.initialize
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: (seen.append(kwargs["config"]),
                                                                   initialize(**kwargs))[1])
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": f"{w}!"}) + "\n"
                            for w in ("hi", "yes", "no", "blue")))
    ds = _write(tmp_path / "ds.json", {"train_batch_size": 999, "optimizer": {"params": {"weight_decay": 0.01}}})
    cfg = TrainJobConfig(model=ModelConfig(name_or_path="tiny-llama"), data=DataConfig(path=str(data)),
                         train=TrainSettings(zero_stage=2, batch_size=4, max_steps=2, lr=1e-3, deepspeed_config=ds),
                         scaling=WorkerScaling(use_ray=False), output=TrainOutput(dir=str(tmp_path / "run")))
    with caplog.at_level(logging.WARNING, logger="sqsd_ray.training.zero"):
        run = run_training(cfg)
    assert [h["step"] for h in run.history] == [1, 2]
    assert len(seen) == 1 and seen[0]["train_batch_size"] == 4
    assert seen[0]["optimizer"]["params"]["weight_decay"] == 0.01
    assert "train_batch_size (file: 999, used: 4)" in caplog.text
