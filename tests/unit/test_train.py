"""The train loop against independent oracles: HF's own causal-LM loss, token-by-token log-probabilities, the
DPO formula, batch-size invariance of gradient accumulation, and exact resumption from a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sqsd_ray.config import ConfigError
from sqsd_ray.data.records import DataConfig, Sample, content_id
from sqsd_ray.data.tokenize import tokenize_sample
from sqsd_ray.models.loading import ModelConfig, load_model_and_tokenizer
from sqsd_ray.models.lora import LoraSettings, apply_lora, get_lora_factors
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.checkpoint import list_checkpoints
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings
from sqsd_ray.training.examples import TrainingExample
from sqsd_ray.training.loop import run_training
from sqsd_ray.training.objectives import dpo_loss, sequence_logps, sft_loss
from sqsd_ray.training.trainer import Trainer, lr_factor

PROMPTS = [
    ("Name a colour.", "Blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town\nmorning smells of earth"),
    ("Say hi.", "Hi!"),
    ("List three fruits.", "Apple, pear and plum."),
    ("Translate 'cat' to French.", "Chat."),
    ("Give a synonym for big.", "Large."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet around 1600."),
    ("Count to five.", "One, two, three, four, five."),
    ("What colour is the sky?", "Usually blue during a clear day."),
]


def _sample(prompt: str, response: str) -> Sample:
    messages = ({"role": "user", "content": prompt},)
    return Sample(sample_id=content_id(messages, response), messages=messages, response=response, source="test")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    return model, tokenizer


def _examples(tokenizer, pairs=PROMPTS, rejected: bool = False):
    out = []
    for prompt, response in pairs:
        chosen = tokenize_sample(_sample(prompt, response), tokenizer, 256)
        other = tokenize_sample(_sample(prompt, "I cannot help with that."), tokenizer, 256) if rejected else None
        out.append(TrainingExample(chosen, other))
    return out


def _peft(tiny, seed: int = 0):
    import copy

    torch.manual_seed(seed)
    model = apply_lora(copy.deepcopy(tiny[0]), LoraSettings())
    # a non-zero B so that both factors get gradients and a step moves the outputs
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def test_sft_loss_is_hf_token_mean_loss(tiny):
    model, tokenizer = tiny
    from sqsd_ray.data.tokenize import collate

    batch = collate([e.chosen for e in _examples(tokenizer)[:4]], tokenizer.pad_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    ours = sft_loss(out.logits, batch["labels"], tokens)
    assert torch.allclose(ours, out.loss, rtol=1e-6, atol=1e-6)


def test_sequence_logps_match_token_by_token_sum(tiny):
    model, tokenizer = tiny
    from sqsd_ray.data.tokenize import collate

    examples = _examples(tokenizer)[:3]
    batch = collate([e.chosen for e in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = sequence_logps(logits, batch["labels"])
    for row, example in enumerate(examples):
        ids, labels = example.chosen.input_ids, example.chosen.labels
        expected = 0.0
        for t in range(1, len(ids)):
            if labels[t] != -100:
                expected += float(torch.log_softmax(logits[row, t - 1].double(), -1)[ids[t]])
        assert math.isclose(float(ours[row]), expected, rel_tol=1e-5)


def test_dpo_loss_formula_and_start_value():
    pc, pr, rc, rr = (torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0]), torch.tensor([-11.0, -3.5]),
                      torch.tensor([-11.5, -2.5]))
    losses, rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    for i in range(2):
        z = 0.1 * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        assert math.isclose(float(losses[i]), math.log1p(math.exp(-float(z))), rel_tol=1e-6)
    assert torch.allclose(rewards["chosen_reward"], 0.1 * (pc - rc))
    same, _ = dpo_loss(pc, pr, pc, pr, beta=0.1)  # policy == reference: log 2, whatever the log-probs
    assert torch.allclose(same, torch.full_like(same, math.log(2)))


def test_dpo_reference_is_the_base_model_and_training_prefers_chosen(tiny):
    _, tokenizer = tiny
    model = _peft(tiny)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()  # fresh adapter: policy == reference
    trainer = Trainer(model, _examples(tokenizer, rejected=True), TrainSettings(objective="dpo", lr=5e-3,
                          batch_size=4, max_steps=8, lr_schedule="constant", max_grad_norm=None), tokenizer.pad_token_id)
    first = trainer.train_step()
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-5)
    for _ in range(7):
        last = trainer.train_step()
    assert last["loss"] < first["loss"] - 0.05
    assert last["reward_margin"] > 0


def _grads_after_step(tiny, micro: int | None):
    _, tokenizer = tiny
    model = _peft(tiny)
    trainer = Trainer(model, _examples(tokenizer), TrainSettings(lr=1e-3, batch_size=8, micro_batch_size=micro,
                          max_steps=1, max_grad_norm=None), tokenizer.pad_token_id)
    trainer.train_step()
    return {n: p.grad.clone() for n, p in trainer.named_params}


def test_micro_batching_does_not_change_the_gradient(tiny):
    whole, split = _grads_after_step(tiny, None), _grads_after_step(tiny, 3)
    for name in whole:
        assert torch.allclose(whole[name], split[name], rtol=1e-4, atol=1e-7), name


def test_loss_weights_scale_each_sample_and_zero_removes_it(tiny):
    """Curated corpora (weight_field): a weight-0 sample adds nothing, and weights w give the weighted token
    mean Σ w·NLL / Σ w·tokens, checked against HF-free autograd on the kept samples."""
    import dataclasses

    _, tokenizer = tiny
    examples = _examples(tokenizer)[:4]
    weights = [1.0, 0.0, 2.0, 0.5]
    weighted = [TrainingExample(dataclasses.replace(e.chosen, weight=w)) for e, w in zip(examples, weights)]
    model = _peft(tiny)
    trainer = Trainer(model, weighted, TrainSettings(lr=1e-3, batch_size=4, max_steps=1, max_grad_norm=None),
                      tokenizer.pad_token_id)
    trainer.optimizer.step = lambda *a, **k: None  # keep the weights: compare gradients
    trainer.train_step()
    oracle = _peft(tiny)
    total = sum(w * e.chosen.n_response_tokens for e, w in zip(examples, weights))
    loss = 0.0
    for e, w in zip(examples, weights):
        ids = torch.tensor([e.chosen.input_ids])
        logits = oracle(input_ids=ids).logits
        loss = loss + w * sft_loss(logits, torch.tensor([e.chosen.labels]), total)
    loss.backward()
    oracle_grads = {n: p.grad for n, p in oracle.named_parameters() if p.requires_grad}
    for name, p in trainer.named_params:
        assert torch.allclose(p.grad, oracle_grads[name], rtol=1e-4, atol=1e-7), name


def test_batches_cover_each_epoch_and_are_seeded(tiny):
    _, tokenizer = tiny
    settings = TrainSettings(batch_size=4, epochs=2)
    trainer = Trainer(_peft(tiny), _examples(tokenizer), settings, tokenizer.pad_token_id)
    assert trainer.steps_per_epoch == 3 and trainer.total_steps == 6
    epoch0 = [i for s in range(3) for i in trainer.global_batch(s)]
    assert len(epoch0) == 12 and set(epoch0) == set(range(10))  # the last batch is filled from the start
    again = Trainer(_peft(tiny), _examples(tokenizer), settings, tokenizer.pad_token_id)
    assert [again.global_batch(s) for s in range(6)] == [trainer.global_batch(s) for s in range(6)]
    assert trainer.global_batch(3) != trainer.global_batch(0)  # a new order each epoch


def test_resume_from_checkpoint_is_exact(tiny, tmp_path):
    _, tokenizer = tiny
    settings = TrainSettings(lr=2e-3, batch_size=4, max_steps=6, lr_schedule="cosine", warmup_ratio=0.2)
    straight = Trainer(_peft(tiny), _examples(tokenizer), settings, tokenizer.pad_token_id)
    for _ in range(6):
        straight.train_step()
    first = Trainer(_peft(tiny), _examples(tokenizer), settings, tokenizer.pad_token_id)
    for _ in range(3):
        first.train_step()
    first.save(tmp_path / "ckpt", identity="job")
    resumed = Trainer(_peft(tiny, seed=1), _examples(tokenizer), settings, tokenizer.pad_token_id)
    resumed.load(tmp_path / "ckpt", identity="job")
    assert resumed.step == 3 and len(resumed.history) == 3
    for _ in range(3):
        resumed.train_step()
    a, b = get_lora_factors(straight.model), get_lora_factors(resumed.model)
    for name in a:
        assert torch.allclose(a[name][0], b[name][0], atol=1e-7) and torch.allclose(a[name][1], b[name][1], atol=1e-7)
    with pytest.raises(ValueError, match="another training job"):
        resumed.load(tmp_path / "ckpt", identity="other")


def test_lr_schedules():
    assert lr_factor(0, 10, 0, "constant") == 1.0
    assert lr_factor(0, 10, 0, "cosine") == 1.0 and math.isclose(lr_factor(5, 10, 0, "cosine"), 0.5)
    assert math.isclose(lr_factor(5, 10, 0, "linear"), 0.5)
    assert lr_factor(0, 10, 4, "cosine") == pytest.approx(1 / 5)  # warm-up from near 0


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="train.lr"):
        TrainSettings(lr=0)
    with pytest.raises(ConfigError, match="use_ray"):
        WorkerScaling(use_ray=False, num_workers=2)


def _write_jsonl(path, pairs):
    with path.open("w") as f:
        for prompt, response in pairs:
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def test_run_training_in_process_writes_checkpoints_and_resumes(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", PROMPTS)
    cfg = TrainJobConfig(
        model=ModelConfig(name_or_path="tiny-llama"),
        data=DataConfig(path=str(data), max_length=128),
        train=TrainSettings(lr=1e-3, batch_size=4, max_steps=5, checkpoint_every=2, log_every=1),
        scaling=WorkerScaling(use_ray=False),
        output=TrainOutput(dir=str(tmp_path / "run")),
    )
    run = run_training(cfg)
    assert [p.name for p in run.checkpoints] == ["step-000002", "step-000004", "step-000005"]
    assert len(run.history) == 5 and [h["step"] for h in run.history] == [1, 2, 3, 4, 5]
    for name in ("checkpoints.json", "train_log.jsonl", "train_loss.png", "train_config.yaml"):
        assert (tmp_path / "run" / name).is_file(), name
    adapter = run.final / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not list(adapter.glob("*.bin"))
    again = run_training(cfg)  # the same finished job: nothing to do, same checkpoints
    assert [p.name for p in again.checkpoints] == [p.name for p in run.checkpoints]
    cfg.train.micro_batch_size = 2  # how the work is laid out is not part of the job: still the same run
    assert [p.name for p in run_training(cfg).checkpoints] == [p.name for p in run.checkpoints]
    cfg.train.micro_batch_size = None
    _write_jsonl(data, PROMPTS[:9])  # same path, new content: another job, refused rather than silently reused
    with pytest.raises(FileExistsError, match="different job"):
        run_training(cfg)
    _write_jsonl(data, PROMPTS)
    cfg.train.lr = 2e-3  # another job in the same directory is refused
    with pytest.raises(FileExistsError, match="different job"):
        run_training(cfg)
    assert len(list_checkpoints(tmp_path / "run")) == 3


def test_cli_names_what_is_missing(tmp_path, capsys):
    from sqsd_ray.cli import main

    code = main(["init", "select", "--set", f"validate_dir={tmp_path}", "--set", f"trajectory_dir={tmp_path}"])
    assert code == 2 and "sensitivity_linear.csv is missing" in capsys.readouterr().err
    assert main(["directions", "build", "--set", "train.lr=-1"]) == 2
    assert "train.lr must be a positive number" in capsys.readouterr().err
    assert main(["trajectory", "--help-config"]) == 0 and "checkpoint_every" in capsys.readouterr().out


@pytest.mark.parametrize("method,stage", [("lora", 0), ("lora", 2), ("lora", 3), ("full", 2), ("full", 3)])
def test_a_resumed_run_continues_the_uninterrupted_one(tmp_path, method, stage):
    """Resume from step 2 of 5 in a fresh directory: AdamW's step and moments (and with them the schedule) come
    back, under DDP and under ZeRO-2/3 alike, so the loss curve and the weights continue the straight run's."""
    import shutil

    from sqsd_ray.models.loading import load_model
    from sqsd_ray.training.checkpoint import load_weights

    data = _write_jsonl(tmp_path / "d.jsonl", PROMPTS)

    def job(name: str) -> TrainJobConfig:
        return TrainJobConfig(
            model=ModelConfig(name_or_path="tiny-llama"), data=DataConfig(path=str(data), max_length=128),
            train=TrainSettings(method=method, lr=2e-3 if method == "lora" else 3e-4, batch_size=4, max_steps=5,
                                checkpoint_every=2, lr_schedule="cosine", warmup_ratio=0.2, zero_stage=stage,
                                stage3_param_persistence_threshold=0 if stage == 3 else None),
            scaling=WorkerScaling(use_ray=False), output=TrainOutput(dir=str(tmp_path / name)))

    straight = run_training(job("straight"))
    (tmp_path / "resumed" / "train").mkdir(parents=True)
    shutil.copytree(straight.checkpoint(2), tmp_path / "resumed" / "train" / "step-000002")
    resumed = run_training(job("resumed"))
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5]
    for a, b in zip(straight.history[2:], resumed.history[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["lr"] == b["lr"], (a, b)
    state = json.loads((resumed.final / "trainer_state.json").read_text())
    assert state["optimizer_state"] is True
    if method == "lora":
        from sqsd_ray.models.lora import load_adapter_state

        a, b = load_adapter_state(straight.final / "adapter")[0], load_adapter_state(resumed.final / "adapter")[0]
        pairs = [(a[n][i], b[n][i]) for n in a for i in (0, 1)]
    else:
        one, two = load_model(ModelConfig(name_or_path="tiny-llama")), load_model(ModelConfig(name_or_path="tiny-llama"))
        load_weights(one, straight.final, "full")
        load_weights(two, resumed.final, "full")
        pairs = list(zip(one.state_dict().values(), two.state_dict().values()))
    assert max(float((x - y).abs().max()) for x, y in pairs) <= 1e-6


def test_each_worker_restores_from_its_own_copy_of_the_checkpoint(tmp_path, monkeypatch):
    """Workers of one node restoring the same Ray checkpoint: each loads its own local copy, so the first to finish
    (and delete its copy) cannot pull the files from under another (seen as a missing trainer_state.json)."""
    import ray.train

    from sqsd_ray.training.loop import _RaySession

    checkpoint_dir = tmp_path / "checkpoint"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "trainer_state.json").write_text('{"step": 3}')
    shared = ray.train.Checkpoint.from_directory(str(checkpoint_dir))  # every worker is handed the same one (uuid)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: shared)
    sessions = []
    for rank in (0, 1):
        session = object.__new__(_RaySession)  # a worker's session without a running Ray Train group
        session.rank, session.resume_from = rank, None
        sessions.append(session)
    copies = [session.restore_point() for session in sessions]
    assert copies[0] != copies[1] and all((c / "trainer_state.json").is_file() for c in copies)
    sessions[0].release_restore()
    assert not copies[0].exists() and (copies[1] / "trainer_state.json").read_text() == '{"step": 3}'
    sessions[1].release_restore()
    assert not copies[1].exists() and (checkpoint_dir / "trainer_state.json").is_file()  # the original stays
