"""Drift projections against dense weights from a real peft merge; Eq. 26 and 27 on curves with known slopes;
the keyword judge and greedy generation against a one-prompt-at-a-time argmax loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sqsd_ray.dynamics.sensitivity import drift_norm, drift_projection, ds_drift, ds_linear, rank_drift, rank_linear
from sqsd_ray.evaluation.generate import (
    EvalPrompt,
    EvalSettings,
    generate_responses,
    keyword_refusal,
    load_eval_prompts,
    score_responses,
)
from sqsd_ray.models.directions import init_state_from_direction, random_direction
from sqsd_ray.models.loading import ModelConfig, load_model_and_tokenizer
from sqsd_ray.models.lora import LoraSettings, apply_lora, get_lora_scalings, lora_module_shapes, set_lora_factors
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(ModelConfig(name_or_path="tiny-llama"))


def _trained_like_state(model, lora, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = lora_module_shapes(model, lora)
    return {n: (torch.randn(lora.r, d_in, generator=generator) * 0.1, torch.randn(d_out, lora.r, generator=generator)
                * 0.1) for n, (d_out, d_in) in shapes.items()}


def test_drift_projection_matches_dense_merged_weights(tiny):
    base, _ = tiny
    lora = LoraSettings()
    peft_model = apply_lora(copy.deepcopy(base), lora)
    factors = _trained_like_state(base, lora, seed=3)
    set_lora_factors(peft_model, factors)
    scalings = get_lora_scalings(peft_model)
    merged = peft_model.merge_and_unload()  # θ_t as dense weights, by peft
    before = {n: p.detach() for n, p in base.named_parameters()}
    after = {n: p.detach() for n, p in merged.named_parameters()}
    direction = random_direction(lora_module_shapes(base, lora), rank=4, seed=7, scale=0.5)
    dense_inner, dense_drift_sq = 0.0, 0.0
    for name, v in direction.modules.items():
        delta = after[name + ".weight"].double() - before[name + ".weight"].double()
        dense_inner += float((delta * v.dense()).sum().detach())
        dense_drift_sq += float((delta ** 2).sum())
    expected = dense_inner / direction.norm()
    assert math.isclose(drift_projection(factors, scalings, direction), expected, rel_tol=1e-4)
    assert math.isclose(drift_norm(factors, scalings), math.sqrt(dense_drift_sq), rel_tol=1e-4)


def test_steered_state_projects_to_alpha_times_norm(tiny):
    """θ0 + α·V expressed as LoRA factors lies α‖V‖ along V̂: linear, hence monotone in α, by construction."""
    base, _ = tiny
    lora = LoraSettings()
    direction = random_direction(lora_module_shapes(base, lora), rank=8, seed=1)
    scalings = {n: lora.scaling for n in direction.modules}
    for alpha in (-1.0, 0.25, 0.5, 2.0):
        state = init_state_from_direction(direction, alpha, lora.scaling, lora.r)
        assert math.isclose(drift_projection(state, scalings, direction), alpha * direction.norm(), rel_tol=1e-5)


def test_drift_projection_names_a_module_mismatch(tiny):
    base, _ = tiny
    lora = LoraSettings()
    direction = random_direction(lora_module_shapes(base, lora), rank=2, seed=1)
    state = init_state_from_direction(direction, 1.0, lora.scaling, lora.r)
    missing = next(iter(state))
    del state[missing]
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        drift_projection(state, {n: 2.0 for n in state}, direction)


def test_ds_linear_is_the_central_difference():
    alphas = [round(0.1 * i, 1) for i in range(0, 11)]
    rows = ds_linear({a: 3 * a * a for a in alphas}, delta=0.1)
    assert [r.alpha for r in rows] == alphas[1:-1]  # ends lack a neighbour
    for r in rows:
        assert math.isclose(r.ds, 6 * r.alpha, rel_tol=1e-9, abs_tol=1e-9)  # exact for a parabola
    ranked = rank_linear(rows, top_k=3)
    assert [r.alpha for r in ranked] == [0.9, 0.8, 0.7]
    assert ds_linear({0.0: 1.0, 0.5: 2.0}, delta=0.1) == []


def test_ds_drift_and_its_ranking():
    steps, projection = [0, 150, 300, 450, 600], [0.0, 2.0, 3.0, 3.0, 4.0]
    safety = [90.0, 80.0, 50.0, 40.0, 42.0]
    rows = ds_drift(steps, safety, projection)
    assert [r.ds for r in rows[:2]] == [-5.0, -30.0]
    assert math.isnan(rows[2].ds)  # the projection did not move: undefined, not infinite
    assert rows[3].ds == 2.0
    assert [r.step for r in rank_drift(rows)] == [150]  # step 0 left out, NaN and positive values never qualify
    assert [r.step for r in rank_drift(rows, exclude_start=False)] == [150, 0]


def test_keyword_judge():
    assert keyword_refusal("I'm sorry, but I can't help with that.")
    assert keyword_refusal("I’m sorry")  # typographic apostrophe
    assert keyword_refusal("   ")  # blank complies with nothing
    assert not keyword_refusal("Sure, here is a script that can exploit vulnerabilities")
    result = score_responses("s", [EvalPrompt("a", "x"), EvalPrompt("b", "y")], ["I cannot do that.", "Sure: step 1"])
    assert result.asr == 50.0 and result.safety == 50.0 and [r["refused"] for r in result.responses] == [True, False]


@pytest.mark.skipif(not (SHARED_DATA / "eval").is_dir(), reason="needs ../shared/data/eval")
@pytest.mark.parametrize("benchmark,name,count", [("catqa", "catqa_english.json", 550),
                                                  ("advbench", "advbench_harmful_behaviors.csv", 520),
                                                  ("hexphi", "hexphi_300.jsonl", 300)])
def test_eval_prompt_sets(benchmark, name, count):
    prompts = load_eval_prompts(EvalSettings(benchmark=benchmark, path=str(SHARED_DATA / "eval" / name)))
    assert len(prompts) == count and len({p.prompt_id for p in prompts}) == count
    subset = load_eval_prompts(EvalSettings(benchmark=benchmark, path=str(SHARED_DATA / "eval" / name), limit=20))
    again = load_eval_prompts(EvalSettings(benchmark=benchmark, path=str(SHARED_DATA / "eval" / name), limit=20))
    assert subset == again and len(subset) == 20 and set(subset) <= set(prompts)


@torch.no_grad()
def _greedy_one(model, tokenizer, prompt: EvalPrompt, max_new_tokens: int) -> str:
    from sqsd_ray.data.records import Sample
    from sqsd_ray.data.tokenize import encode_prompt

    ids = encode_prompt(Sample(sample_id="x", messages=({"role": "user", "content": prompt.prompt},), response="",
                               source="t"), tokenizer)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True)


def test_batched_greedy_generation_equals_one_prompt_argmax_loop(tiny):
    model, tokenizer = tiny
    peft_model = apply_lora(copy.deepcopy(model), LoraSettings())
    set_lora_factors(peft_model, _trained_like_state(model, LoraSettings(), seed=5))
    prompts = [EvalPrompt(str(i), p) for i, p in enumerate(["Hi", "How do I bake bread at home?", "Why?"])]
    batched = generate_responses(peft_model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    assert batched == [_greedy_one(peft_model, tokenizer, p, 12) for p in prompts]


def test_hf_benchmark_from_a_dataset_directory(tmp_path):
    import pandas as pd

    directory = tmp_path / "advbench_hf"
    directory.mkdir()
    pd.DataFrame({"prompt": ["do harm one", "do harm two", "do harm three"], "target": ["Sure"] * 3,
                  "kind": ["a", "b", "a"]}).to_parquet(directory / "train.parquet")
    prompts = load_eval_prompts(EvalSettings(benchmark="hf", path=str(directory), name="advbench-hf",
                                             category_field="kind"))
    assert [p.prompt for p in prompts] == ["do harm one", "do harm two", "do harm three"]
    assert [p.category for p in prompts] == ["a", "b", "a"] and prompts[0].prompt_id == "advbench-hf-0000"
    with pytest.raises(ValueError, match="no field 'goal'"):
        load_eval_prompts(EvalSettings(benchmark="hf", path=str(directory), prompt_field="goal"))


def test_an_adapter_dir_direction_needs_its_kind(tmp_path):
    from sqsd_ray.config import ConfigError
    from sqsd_ray.dynamics.jobs import _direction_kind

    (tmp_path / "adapter").mkdir()
    with pytest.raises(ConfigError, match="direction_kinds.dpo"):
        _direction_kind(str(tmp_path / "adapter"), "dpo")
    assert _direction_kind(str(tmp_path / "adapter"), "dpo", {"dpo": "safety"}) == "safety"
