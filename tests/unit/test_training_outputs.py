"""Checkpoints load on their own: an adapter records its base model (``AutoPeftModelForCausalLM`` finds it), a full
fine-tune's ``model/`` holds its tokenizer (``AutoModelForCausalLM`` + ``AutoTokenizer``), and both give the trained
weights and logits back."""

from __future__ import annotations

import json

import pytest
import torch

from sqsd_ray.data.records import DataConfig
from sqsd_ray.models.loading import (
    BaseModelReference,
    ModelConfig,
    base_model_reference,
    load_model,
    load_model_and_tokenizer,
)
from sqsd_ray.models.lora import apply_lora, get_lora_factors, load_adapter_state, set_lora_factors
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.checkpoint import load_weights
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings
from sqsd_ray.training.loop import run_training

LOGITS_ATOL = 1e-5  # the same weights loaded two ways, fp32

PAIRS = [("Say hi.", "Hi!"), ("Name a colour.", "Blue."), ("Count to three.", "One, two, three."),
         ("Who wrote Hamlet?", "Shakespeare.")]


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A tiny model and its tokenizer saved as a local model directory; the test runs from tmp_path."""
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "base"


def _train(method: str) -> tuple[TrainJobConfig, object]:
    cfg = TrainJobConfig(model=ModelConfig(name_or_path="base"),  # relative: the adapter must record it absolute
                         data=DataConfig(path="d.jsonl", max_length=128),
                         train=TrainSettings(method=method, lr=1e-2 if method == "lora" else 1e-3, batch_size=4,
                                             max_steps=2),
                         scaling=WorkerScaling(use_ray=False), output=TrainOutput(dir=f"run-{method}"))
    return cfg, run_training(cfg)


def _input_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], tokenize=False,
                                         add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_adapter_loads_with_auto_peft_from_its_recorded_base(base_dir):
    from peft import AutoPeftModelForCausalLM

    cfg, run = _train("lora")
    adapter = run.final / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(base_dir.resolve()) and recorded["revision"] is None

    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    factors, _ = load_adapter_state(adapter)
    assert any(b.abs().max() > 0 for _, b in factors.values())  # trained: B moved off its zero init
    for name, (a, b) in get_lora_factors(loaded).items():
        assert torch.equal(a, factors[name][0]) and torch.equal(b, factors[name][1]), name
    ours, tokenizer = load_model_and_tokenizer(cfg.model)
    ours = apply_lora(ours, cfg.lora)
    set_lora_factors(ours, factors)
    ids = _input_ids(tokenizer)
    with torch.no_grad():
        expected, got = ours.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits
        base = load_model(cfg.model)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=LOGITS_ATOL)
    assert (got - base).abs().max() > 100 * LOGITS_ATOL  # the adapter is applied, not just the base


def test_full_model_dir_loads_with_auto_classes_and_its_tokenizer(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, run = _train("full")
    model_dir = run.final / "model"
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trained = load_model(cfg.model)
    load_weights(trained, run.final, "full")
    base = load_model(cfg.model)
    loaded_state, base_state = loaded.state_dict(), base.state_dict()
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded_state[name], value), name
    assert any(not torch.equal(v, base_state[n]) for n, v in trained.state_dict().items())  # it trained
    _, ours = load_model_and_tokenizer(cfg.model)
    assert tokenizer.chat_template == ours.chat_template and tokenizer.pad_token == ours.pad_token
    ids = _input_ids(tokenizer)
    assert torch.equal(ids, _input_ids(ours))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained.eval()(input_ids=ids).logits, rtol=0,
                                   atol=LOGITS_ATOL)


def test_base_model_reference(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"")
    assert base_model_reference(ModelConfig(name_or_path="tiny-llama")) == BaseModelReference("tiny-llama")
    assert base_model_reference(ModelConfig(name_or_path="./local", revision="v1")) == BaseModelReference(
        str(tmp_path / "local"), "v1")
    assert base_model_reference(ModelConfig(name_or_path="m.gguf")).name_or_path == str(tmp_path)
    # a hub id: the configured revision, else the commit of the cached snapshot, else none
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert base_model_reference(ModelConfig(name_or_path="org/tiny")) == BaseModelReference("org/tiny", "0123abcd")
    assert base_model_reference(ModelConfig(name_or_path="org/tiny", revision="main")).revision == "main"
    assert base_model_reference(ModelConfig(name_or_path="org/absent")) == BaseModelReference("org/absent")
