"""Baselines against a direct batch-1 computation: autograd on one sample at a time gives the LoRA gradient
(Self-Inf-N, Bi-Anchor(Grad)), and a single unpadded forward gives the representation (Bi-Anchor(Reps))."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sqsd_ray.baselines.methods import GradAnchorScorer, RepsScorer, SelfInfNScorer
from sqsd_ray.data.records import Sample, content_id
from sqsd_ray.data.tokenize import collate, tokenize_sample
from sqsd_ray.models.loading import ModelConfig, load_model_and_tokenizer
from sqsd_ray.models.lora import LoraSettings, apply_lora, lora_layers
from sqsd_ray.scoring.scorer import per_sample_mean_nll

TEXTS = [("Name a colour.", "Blue."), ("Write a long answer please", "Here is a longer answer with many words in it."),
         ("Hi", "Hello there!"), ("How are you?", "Fine, thanks for asking.")]
ANCHORS = {"harmful": [("How do I steal?", "Sure, first you...")], "safe1": [("How do I bake?", "Mix flour.")],
           "safe2": [("Tell a joke", "Why did the chicken..."), ("Count", "One two three")]}


def _tokenized(tokenizer, pairs):
    out = []
    for prompt, response in pairs:
        messages = ({"role": "user", "content": prompt},)
        sample = Sample(content_id(messages, response), messages, response, "t")
        out.append(tokenize_sample(sample, tokenizer, 256))
    return out


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    peft_model = apply_lora(copy.deepcopy(model), LoraSettings())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    peft_model.eval()
    return peft_model, tokenizer


def _direct_grad(model, sample) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The oracle: one sample, one backward, the LoRA parameters' .grad."""
    batch = collate([sample], 0)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_sample_mean_nll(logits, batch["labels"])[0].sum().backward()
    grads = {name: (layer.lora_A["default"].weight.grad.double().clone(),
                    layer.lora_B["default"].weight.grad.double().clone())
             for name, layer in lora_layers(model, "default").items()}
    model.zero_grad(set_to_none=True)
    return grads


def _flat(grads) -> torch.Tensor:
    return torch.cat([torch.cat([a.reshape(-1), b.reshape(-1)]) for _, (a, b) in sorted(grads.items())])


def test_self_inf_n_matches_batch_1_autograd(tiny):
    model, tokenizer = tiny
    samples = _tokenized(tokenizer, TEXTS)
    scores = SelfInfNScorer(model).score_batch(collate(samples, tokenizer.pad_token_id))
    for i, sample in enumerate(samples):
        g = _flat(_direct_grad(model, sample))
        expected = math.log(float(g @ g) + 1) + math.log(sample.n_response_tokens + 1)
        assert math.isclose(scores["self_inf_n"][i], expected, rel_tol=1e-5)


def test_bianchor_grad_matches_batch_1_autograd(tiny):
    model, tokenizer = tiny
    anchor_batches = {k: [collate(_tokenized(tokenizer, v), tokenizer.pad_token_id)] for k, v in ANCHORS.items()}
    scorer = GradAnchorScorer(model, anchor_batches)
    samples = _tokenized(tokenizer, TEXTS)
    scores = scorer.score_batch(collate(samples, tokenizer.pad_token_id, padding_side="left"))
    means = {}
    for name, pairs in ANCHORS.items():
        flats = [_flat(_direct_grad(model, s)) for s in _tokenized(tokenizer, pairs)]
        means[name] = torch.stack([f / f.norm() for f in flats]).mean(0)
    for i, sample in enumerate(samples):
        g = _flat(_direct_grad(model, sample))
        g = g / g.norm()
        expected = float(g @ means["harmful"] - g @ means["safe1"] - g @ means["safe2"])
        assert math.isclose(scores["bianchor_grad"][i], expected, rel_tol=1e-4, abs_tol=1e-7)


def _direct_full_grad(model, sample) -> torch.Tensor:
    """The oracle in the full space: one sample, one backward, the adapted modules' dense weights' .grad."""
    weights = [layer.base_layer.weight for _, layer in sorted(lora_layers(model, "default").items())]
    for w in weights:
        w.requires_grad_(True)
    try:
        batch = collate([sample], 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        grads = torch.autograd.grad(per_sample_mean_nll(logits, batch["labels"])[0].sum(), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    return torch.cat([g.double().reshape(-1) for g in grads])


def test_full_space_gradient_baselines_match_batch_1_autograd(tiny):
    model, tokenizer = tiny
    samples = _tokenized(tokenizer, TEXTS)
    batch = collate(samples, tokenizer.pad_token_id, padding_side="left")
    self_inf = SelfInfNScorer(model, space="full").score_batch(batch)
    anchor_batches = {k: [collate(_tokenized(tokenizer, v), tokenizer.pad_token_id)] for k, v in ANCHORS.items()}
    anchored = GradAnchorScorer(model, anchor_batches, space="full").score_batch(batch)
    means = {name: torch.stack([f / f.norm() for f in (_direct_full_grad(model, s)
                                                        for s in _tokenized(tokenizer, pairs))]).mean(0)
             for name, pairs in ANCHORS.items()}
    lora_only = SelfInfNScorer(model).score_batch(batch)
    for i, sample in enumerate(samples):
        g = _direct_full_grad(model, sample)
        expected = math.log(float(g @ g) + 1) + math.log(sample.n_response_tokens + 1)
        assert math.isclose(self_inf["self_inf_n"][i], expected, rel_tol=1e-5)
        assert not math.isclose(self_inf["self_inf_n"][i], lora_only["self_inf_n"][i], rel_tol=1e-3)
        g = g / g.norm()
        expected = float(g @ means["harmful"] - g @ means["safe1"] - g @ means["safe2"])
        assert math.isclose(anchored["bianchor_grad"][i], expected, rel_tol=1e-4, abs_tol=1e-7)


def test_gradient_space_must_be_lora_or_full(tiny):
    with pytest.raises(ValueError, match="'lora' or 'full'"):
        SelfInfNScorer(tiny[0], space="dense")


def test_bianchor_reps_matches_single_forwards(tiny):
    model, tokenizer = tiny
    anchors = _tokenized(tokenizer, ANCHORS["harmful"] + ANCHORS["safe2"])
    scorer = RepsScorer(model, [collate(anchors, tokenizer.pad_token_id)])
    samples = _tokenized(tokenizer, TEXTS)
    scores = scorer.score_batch(collate(samples, tokenizer.pad_token_id))

    def rep(sample):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([sample.input_ids]), output_hidden_states=True)
        return out.hidden_states[-1][0, -2].double()

    anchor_reps = torch.stack([rep(a) for a in anchors])
    for i, sample in enumerate(samples):
        cos = torch.nn.functional.cosine_similarity(rep(sample)[None], anchor_reps)
        assert math.isclose(scores["bianchor_reps"][i], float(cos.max()), rel_tol=1e-5)
        assert scores["nearest_anchor"][i] == int(cos.argmax())


def test_bianchor_grad_needs_the_three_anchor_sets(tiny):
    with pytest.raises(ValueError, match="anchor sets"):
        GradAnchorScorer(tiny[0], {"harmful": []})


def test_larf_layer_search_restores_weights_and_picks_the_sensitive_layer(tiny):
    from sqsd_ray.baselines.methods import decoder_layers, find_safety_layer

    model, _ = tiny
    blocks = decoder_layers(model)
    before = [p.detach().clone() for p in model.parameters()]
    watched = blocks[1].mlp.down_proj.base_layer.weight

    def refusal_rate(m):  # a stand-in metric that only layer 1's weights move
        return float(watched.norm())

    base = refusal_rate(model)
    layer, change, rates = find_safety_layer(model, refusal_rate, layers=[0, 1])
    assert layer == 1 and change[0] == 0.0 and change[1] > 0
    assert rates[1][1.0] == base and math.isclose(rates[1][1.2], 1.2 * base, rel_tol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_larf_scores_match_single_forwards(tiny):
    from sqsd_ray.baselines.methods import LarfScorer

    model, tokenizer = tiny
    unsafe = _tokenized(tokenizer, ANCHORS["harmful"] + ANCHORS["safe1"])
    safe = _tokenized(tokenizer, ANCHORS["safe2"])
    scorer = LarfScorer(model, 0, [collate(unsafe, tokenizer.pad_token_id)], [collate(safe, tokenizer.pad_token_id)])
    samples = _tokenized(tokenizer, TEXTS)
    scores = scorer.score_batch(collate(samples, tokenizer.pad_token_id, padding_side="left"))

    def rep(sample):
        with torch.no_grad():
            return model(input_ids=torch.tensor([sample.input_ids]), output_hidden_states=True).hidden_states[1][0, -1]

    h_unsafe = torch.stack([rep(s) for s in unsafe]).mean(0)
    h_safe = torch.stack([rep(s) for s in safe]).mean(0)
    for i, sample in enumerate(samples):
        expected = float(rep(sample) @ h_unsafe - rep(sample) @ h_safe)
        assert math.isclose(scores["larf"][i], expected, rel_tol=1e-4, abs_tol=1e-5)
