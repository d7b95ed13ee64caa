"""Baselines inside ``sqsd-ray score``: ``method: self_inf_n | bianchor_grad | bianchor_reps`` swaps the SQSD
scorer of ``scoring.blocks.BlockScorer`` for a baseline scorer, so a baseline runs through the same in-process loop
or Ray Data actor pool, resumes the same way and writes the same kind of Parquet (``sample_id``, the method's
column, ``loss``, lengths, ``status``). ``experiment`` arms then rank by that column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..config import help_field
from ..data.records import DataConfig, load_samples
from ..data.tokenize import collate, tokenize_samples

METHOD_COLUMNS = {"self_inf_n": "self_inf_n", "bianchor_grad": "bianchor_grad", "bianchor_reps": "bianchor_reps",
                  "reward_model": "reward_model", "larf": "larf"}
# The anchor sets of He et al. 2024 by reference name (sqsd_ray.data.reference: the data mirror's anchors/ folder)
ANCHORS = "ref:"


@dataclass
class BaselineSettings:
    """What the baselines need besides the model (paper App. D)."""

    harmful_anchors: str = help_field(
        f"{ANCHORS}pure_bad_10", help="bianchor_reps: the harmful anchor set (messages JSONL, or a ref: name)"
    )
    grad_anchors: dict[str, str] = help_field(
        {"harmful": f"{ANCHORS}illegal_activities_10", "safe1": f"{ANCHORS}illegal_activities_10_anchor1",
         "safe2": f"{ANCHORS}illegal_activities_10_anchor2"},
        help="bianchor_grad: harmful, safe1, safe2 anchor sets (messages JSONL, or ref: names), weights 1, -1, -1",
    )
    gradient: Literal["lora", "full"] = help_field(
        "lora", help="self_inf_n / bianchor_grad: the LoRA gradient (g_A, g_B) or the full gradient of the adapted "
        "modules' dense weights (q,k,v,o,gate,up,down; memory: three anchor means of that size, fine up to ~1B "
        "parameters on one device)"
    )
    lora_state: str = help_field(
        "random", help="gradient baselines: the LoRA state the gradient is taken at: 'random' (A as peft, B ~ "
        "N(0, lora_std²), seeded; a fresh B = 0 would zero g_A; with gradient: full, B = 0, i.e. θ0 exactly) or a "
        "peft adapter dir (e.g. a pilot checkpoint)"
    )
    lora_std: float = help_field(0.02, help="lora_state random: std of B's entries")
    seed: int = help_field(0, help="lora_state random: seed")
    anchor_max_length: int = help_field(1024, help="anchor samples longer than this are truncated")
    reward_model: str = help_field(
        "PKU-Alignment/beaver-7b-unified-cost", help="reward_model: the cost model (Risk = its cost, Eq. 20)"
    )
    reward_dtype: str = help_field("bfloat16", help="reward_model: weights dtype (float32 on CPU)")
    larf_layer: int | None = help_field(
        None, help="larf: the safety-sensitive decoder block (0-based; the paper found 21 for Qwen3-8B, 13 for "
        "Llama-3.1-8B-Instruct, 11 for Llama-2-7B-Chat; baselines.find_safety_layer searches it)"
    )
    larf_unsafe: list[str] = help_field([f"{ANCHORS}pure_bad_10"], help="larf: unsafe reference sets")
    larf_safe: list[str] = help_field(
        [f"{ANCHORS}illegal_activities_10_anchor1", f"{ANCHORS}illegal_activities_10_anchor2"],
        help="larf: safe reference sets",
    )


def _anchor_batches(path: str, tokenizer: Any, settings: BaselineSettings) -> list[dict]:
    samples, report = load_samples(DataConfig(path=path, max_length=settings.anchor_max_length))
    tokenized = tokenize_samples(samples, tokenizer, DataConfig(path=path, max_length=settings.anchor_max_length),
                                 report)
    if not tokenized:
        raise ValueError(f"anchor set {path} has no usable samples ({report.summary()})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [collate([t], pad) for t in tokenized]  # one per batch: anchors are few, and no padding to reason about


def _lora_model(model: torch.nn.Module, cfg: Any, device: torch.device) -> torch.nn.Module:
    from ..models.lora import apply_lora, get_lora_factors, load_adapter_state, set_lora_factors

    settings = cfg.baseline
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: seed it, without side effects
        torch.manual_seed(settings.seed)
        peft_model = apply_lora(model, cfg.lora)
    if settings.lora_state == "random":
        generator = torch.Generator().manual_seed(settings.seed)
        std = 0.0 if settings.gradient == "full" else settings.lora_std  # the dense gradient at θ0 needs no B
        factors = {n: (a, torch.randn(b.shape, generator=generator, dtype=torch.float64).to(b.dtype) * std)
                   for n, (a, b) in get_lora_factors(peft_model).items()}
    else:
        factors, _ = load_adapter_state(settings.lora_state)
    set_lora_factors(peft_model, factors)
    return peft_model.to(device).eval()


class _WithStatus:
    """Adds the columns every score file has (lengths, status) around a baseline scorer."""

    def __init__(self, scorer: Any, column: str) -> None:
        self.scorer, self.column = scorer, column

    def score_batch(self, batch: dict) -> dict[str, np.ndarray]:
        out = self.scorer.score_batch(batch)
        out["n_response_tokens"] = (batch["labels"][:, 1:] != -100).sum(1).cpu().numpy()
        out["n_tokens"] = batch["attention_mask"].sum(1).cpu().numpy()
        out["status"] = np.where(np.isfinite(out[self.column]), "ok", "nonfinite")
        return out


class RewardModelScorer:
    """Risk = the cost model's cost of (last user turn, response) in its own template (Eq. 20)."""

    column = "reward_model"

    def __init__(self, settings: BaselineSettings) -> None:
        from ..evaluation.judges import CostModelJudge, JudgeSettings

        self.judge = CostModelJudge(JudgeSettings(kind="cost_model", model=settings.reward_model,
                                                  dtype=settings.reward_dtype))

    def score_batch(self, batch: dict) -> dict[str, np.ndarray]:
        verdicts = self.judge.judge(batch["texts"])
        return {"sample_id": np.asarray(batch["sample_ids"]),
                self.column: np.array([-v.score for v in verdicts], dtype=float)}  # the judge reports −cost


def build_baseline_scorer(model: torch.nn.Module | None, tokenizer: Any, cfg: Any, device: torch.device
                          ) -> _WithStatus:
    from .methods import GradAnchorScorer, RepsScorer, SelfInfNScorer

    settings: BaselineSettings = cfg.baseline
    if cfg.method == "reward_model":
        return _WithStatus(RewardModelScorer(settings), "reward_model")
    if cfg.method == "larf":
        from .methods import LarfScorer

        if settings.larf_layer is None:
            raise ValueError("method larf needs baseline.larf_layer (the safety-sensitive block)")
        unsafe = [b for path in settings.larf_unsafe for b in _anchor_batches(path, tokenizer, settings)]
        safe = [b for path in settings.larf_safe for b in _anchor_batches(path, tokenizer, settings)]
        return _WithStatus(LarfScorer(model.to(device).eval(), settings.larf_layer, unsafe, safe), "larf")
    if cfg.method == "bianchor_reps":
        model = model.to(device).eval()
        scorer = RepsScorer(model, _anchor_batches(settings.harmful_anchors, tokenizer, settings))
    elif cfg.method == "self_inf_n":
        scorer = SelfInfNScorer(_lora_model(model, cfg, device), space=settings.gradient)
    else:
        anchors = {name: _anchor_batches(path, tokenizer, settings) for name, path in settings.grad_anchors.items()}
        scorer = GradAnchorScorer(_lora_model(model, cfg, device), anchors, space=settings.gradient)
    return _WithStatus(scorer, METHOD_COLUMNS[cfg.method])


def baseline_identity(cfg: Any) -> dict[str, Any]:
    """What a baseline score file depends on (resume refuses on any difference)."""
    from ..training.config import data_fingerprint

    settings: BaselineSettings = cfg.baseline
    anchors = {"bianchor_reps": [settings.harmful_anchors], "bianchor_grad": list(settings.grad_anchors.values()),
               "larf": [*settings.larf_unsafe, *settings.larf_safe]}.get(cfg.method, [])
    identity = {f"anchor:{path}": data_fingerprint(DataConfig(path=path)) for path in anchors}
    if cfg.method == "reward_model":
        from ..models.loading import ModelConfig, model_identity

        identity["reward_model"] = model_identity(ModelConfig(name_or_path=settings.reward_model))
    return identity


__all__ = ["BaselineSettings", "METHOD_COLUMNS", "baseline_identity", "build_baseline_scorer"]
