"""train.gradient_checkpointing: the recomputed backward gives the plain one's loss and gradients (fp32), for a LoRA
adapter (frozen embeddings: reentrant checkpointing would pass no gradient back into the layers) and a full
fine-tune, and it is really on (a decoder layer's MLP runs once more per step)."""

from __future__ import annotations

import copy

import pytest
import torch

from sqsd_ray.data.records import DataConfig, Sample, content_id
from sqsd_ray.data.tokenize import tokenize_sample
from sqsd_ray.models.loading import ModelConfig, base_model_of, load_model_and_tokenizer
from sqsd_ray.models.lora import LoraSettings, apply_lora
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings, training_identity
from sqsd_ray.training.examples import TrainingExample
from sqsd_ray.training.trainer import Trainer

GRAD_RTOL = 1e-5  # checkpointed vs plain backward, fp32
GRAD_ATOL = 1e-7  # for gradient entries near zero

PAIRS = [
    ("Name a colour.", "Blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town\nmorning smells of earth"),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet around 1600."),
]


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama", tiny_layers=3))


def _examples(tokenizer, rejected: bool = False) -> list[TrainingExample]:
    def sample(prompt: str, response: str) -> Sample:
        messages = ({"role": "user", "content": prompt},)
        return Sample(sample_id=content_id(messages, response), messages=messages, response=response, source="test")

    return [TrainingExample(tokenize_sample(sample(p, r), tokenizer, 256),
                            tokenize_sample(sample(p, "I cannot help."), tokenizer, 256) if rejected else None)
            for p, r in PAIRS]


def _model(tiny, method: str) -> torch.nn.Module:
    model = copy.deepcopy(tiny[0])
    if method == "full":
        return model.train()
    torch.manual_seed(0)
    model = apply_lora(model, LoraSettings())
    with torch.no_grad():  # a non-zero B, so that lora_A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


def _one_step(tiny, method: str, objective: str, checkpointing: bool):
    """Loss, gradients and the number of times one decoder layer's MLP ran, in one optimizer step."""
    model = _model(tiny, method)
    settings = TrainSettings(objective=objective, method=method, lr=1e-3, batch_size=4, max_steps=2,
                             max_grad_norm=None, gradient_checkpointing=checkpointing)
    trainer = Trainer(model, _examples(tiny[1], rejected=objective == "dpo"), settings, tiny[1].pad_token_id)
    mlp = base_model_of(model).model.layers[1].mlp
    forward, calls = mlp.forward, []
    mlp.forward = lambda *args, **kwargs: (calls.append(1), forward(*args, **kwargs))[1]  # module hooks skip reruns
    metrics = trainer.train_step()
    grads = {name: p.grad.detach().clone() for name, p in trainer.named_params}
    return metrics["loss"], grads, len(calls)


@pytest.mark.parametrize("method,objective", [("lora", "sft"), ("full", "sft"), ("lora", "dpo")])
def test_checkpointing_gives_the_same_loss_and_gradients(tiny, method, objective):
    loss, grads, forwards = _one_step(tiny, method, objective, checkpointing=False)
    loss_ckpt, grads_ckpt, forwards_ckpt = _one_step(tiny, method, objective, checkpointing=True)
    assert forwards_ckpt == forwards + 1  # checkpointing is on: the layer reruns once, in the backward pass
    assert loss_ckpt == pytest.approx(loss, rel=GRAD_RTOL)
    assert grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"{name}: no gradient reached it"
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


# training_identity of a default tiny-llama job on PRE_FEATURE_DATA at the relative path d.jsonl, as computed before
# gradient_checkpointing and deepspeed_config existed: runs made then must still resume.
PRE_FEATURE_DATA = '{"prompt": "a", "response": "b"}\n'
PRE_FEATURE_IDENTITY = "8b9ccb61086b5c96"


def test_checkpointing_is_not_part_of_the_run_identity(tmp_path, monkeypatch):
    """Checkpointing recomputes the same activations, so a run may resume with it switched on (e.g. after running
    out of memory), and runs made before the setting existed keep their identity."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(PRE_FEATURE_DATA)

    def identity(checkpointing: bool) -> str:
        return training_identity(TrainJobConfig(
            model=ModelConfig(name_or_path="tiny-llama"), data=DataConfig(path="d.jsonl"),
            train=TrainSettings(gradient_checkpointing=checkpointing), scaling=WorkerScaling(use_ray=False),
            output=TrainOutput(dir="run")))

    assert identity(False) == PRE_FEATURE_IDENTITY
    assert identity(True) == PRE_FEATURE_IDENTITY
