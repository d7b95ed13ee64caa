"""`evaluate` end to end: base, adapter and full-model states through generation and three judges (keyword,
a tiny Llama Guard-class causal LM, a tiny safe-rlhf-class score model, all loaded from directories), in this
process and through Ray Data, with the same responses and verdicts either way."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sqsd_ray.evaluation.generate import EvalSettings
from sqsd_ray.evaluation.generate import state_kind
from sqsd_ray.evaluation.job import EvalJobConfig, EvalWorkers, run_evaluate
from sqsd_ray.evaluation.judges import JudgeSettings
from sqsd_ray.models.loading import ModelConfig, load_model
from sqsd_ray.models.lora import LoraSettings, apply_lora, get_lora_factors, save_adapter
from sqsd_ray.models.tiny import build_tiny_model, build_tiny_tokenizer
from tests.unit.test_judges import _tiny_score_checkpoint

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def states_and_judges(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = build_tiny_tokenizer()
    guard = root / "guard"
    build_tiny_model("llama", seed=3).save_pretrained(guard)
    tokenizer.save_pretrained(guard)
    cost = root / "cost"
    cost.mkdir()
    _tiny_score_checkpoint(cost)
    tokenizer.save_pretrained(cost)
    peft = apply_lora(load_model(ModelConfig(name_or_path="tiny-llama")), LoraSettings())
    generator = torch.Generator().manual_seed(0)
    factors = {n: (a, torch.randn(b.shape, generator=generator) * 0.05) for n, (a, b) in get_lora_factors(peft).items()}
    adapter = save_adapter(factors, LoraSettings(), root / "adapter")
    # the same ΔW = s·B·A saved with α = 32: evaluated under the default α = 16, B must be rescaled
    doubled = save_adapter({n: (a, b / 2) for n, (a, b) in factors.items()}, LoraSettings(alpha=32.0),
                           root / "adapter_alpha32")
    full = root / "full"
    build_tiny_model("llama", seed=9).save_pretrained(full)
    cfg = dict(
        model=ModelConfig(name_or_path="tiny-llama"),
        states={"base": "base", "tuned": str(adapter), "full": str(full), "tuned_alpha32": str(doubled)},
        benchmarks=[EvalSettings(benchmark="catqa", path=str(shared_data / "eval" / "catqa_english.json"), limit=4,
                                 max_new_tokens=6, batch_size=3),
                    EvalSettings(benchmark="advbench", path=str(shared_data / "eval" / "advbench_harmful_behaviors.csv"),
                                 limit=3, max_new_tokens=6)],
        judges={"keyword": JudgeSettings(),
                "guard": JudgeSettings(kind="llamaguard", model=str(guard), dtype="float32", batch_size=4),
                "cost": JudgeSettings(kind="cost_model", model=str(cost), dtype="float32")},
    )
    return root, cfg


def test_state_kinds(states_and_judges):
    _, cfg = states_and_judges
    assert [state_kind(s) for s in cfg["states"].values()] == ["base", "adapter", "full", "adapter"]
    with pytest.raises(FileNotFoundError, match="neither"):
        state_kind("/nonexistent")


def test_evaluate_in_process_and_on_ray_agree(states_and_judges, local_ray, tmp_path):
    _, cfg = states_and_judges
    here = run_evaluate(EvalJobConfig(**cfg, workers=EvalWorkers(use_ray=False), output_dir=str(tmp_path / "here")))
    ray = run_evaluate(EvalJobConfig(**cfg, workers=EvalWorkers(rows_per_call=5), output_dir=str(tmp_path / "ray")))
    a, b = pd.read_parquet(here / "responses.parquet"), pd.read_parquet(ray / "responses.parquet")
    assert len(a) == 4 * (4 + 3) and list(a["response"]) == list(b["response"])
    same = a[a["state"] == "tuned"]["response"].tolist(), a[a["state"] == "tuned_alpha32"]["response"].tolist()
    assert same[0] == same[1]  # the adapter's own scaling is honoured
    assert list(a["guard_status"]) == list(b["guard_status"])
    assert (a["cost_score"] - b["cost_score"]).abs().max() < 1e-4
    # three different states generate three different answers to the same prompt
    first = a[(a["prompt_id"] == a["prompt_id"].iloc[0]) & (a["state"] != "tuned_alpha32")]
    assert first["response"].nunique() == 3
    metrics = pd.read_csv(here / "metrics.csv")
    assert len(metrics) == 8 and {"keyword_asr", "guard_asr", "guard_unparsed", "cost_safety_score"} <= set(metrics)
    row = metrics[(metrics["state"] == "tuned") & (metrics["benchmark"] == "catqa")].iloc[0]
    kw = a[(a["state"] == "tuned") & (a["benchmark"] == "catqa")]["keyword_status"]
    assert row["keyword_asr"] == 100.0 * (kw == "unsafe").mean()
    assert row["guard_unparsed"] == 4  # a random guard answers nothing parseable: counted, not guessed
