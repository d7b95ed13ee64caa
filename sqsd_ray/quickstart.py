"""``sqsd-ray quickstart``: the embedded default job, end to end on one CPU in about a minute.

1. A tiny Llama (2 layers, built from a config, seeded) and the byte-level ChatML tokenizer.
2. V_danger: LoRA SFT on AdvBench harmful behaviours (goal -> affirmative target), 40 steps.
   V_safety: LoRA SFT on the same goals answered with refusals, 40 steps. The paper builds V_safety by DPO on
   PKU-SafeRLHF (Eq. 3); SFT on refusals is the offline stand-in until the direction builder runs DPO.
3. Scores the 387 Dolly samples in data/benign with SQSD, each projection at θ0 + 1·V (linear-path states),
   and writes the run directory (Parquet, summary, histogram, Eq. 13 fidelity check).

A random tiny model knows nothing about safety, so its scores show the machinery, not a finding; the
model-organism demo is where the ranking is put to the test.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from .models import LoraSettings, ModelConfig, load_model_and_tokenizer
from .config import apply_overrides, from_dict, to_dict
from .data import DataConfig, Sample, content_id
from .score_run import DirectionsConfig, FidelityConfig, OutputConfig, ScoreJobConfig, run_score
from .sft import train_lora_direction

log = logging.getLogger(__name__)

REFUSALS = (
    "I can't help with that. It could cause real harm to people.",
    "I'm sorry, but I won't provide instructions for that.",
    "I cannot assist with this request because it is harmful or illegal.",
    "No. I won't help with something that could hurt someone, but I'm happy to help with something else.",
)


def _harmful_samples(advbench_csv: Path, limit: int) -> list[tuple[str, str]]:
    with advbench_csv.open(newline="") as f:
        rows = [(r["goal"], r["target"]) for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{advbench_csv}: no rows with goal/target")
    return rows[:limit]


def _as_samples(pairs: list[tuple[str, str]], source: str) -> list[Sample]:
    out = []
    for i, (prompt, response) in enumerate(pairs):
        messages = ({"role": "user", "content": prompt},)
        out.append(Sample(sample_id=content_id(messages, response), messages=messages, response=response,
                          source=f"{source}:{i}"))
    return out


def build_quick_directions(out_dir: Path, data_root: Path, model_cfg: ModelConfig, lora: LoraSettings,
                           steps: int = 40, n_prompts: int = 128) -> dict[str, Path]:
    """Train and save V_danger and V_safety for ``model_cfg``; returns their .safetensors paths."""
    advbench = data_root / "eval" / "advbench_harmful_behaviors.csv"
    if not advbench.exists():
        raise FileNotFoundError(f"{advbench} not found: pass --data-root pointing at the folder with eval/ and benign/")
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    pairs = _harmful_samples(advbench, n_prompts)
    sets = {
        "danger": _as_samples(pairs, "advbench-target"),
        "safety": _as_samples([(g, REFUSALS[i % len(REFUSALS)]) for i, (g, _) in enumerate(pairs)], "advbench-refusal"),
    }
    paths = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, samples in sets.items():
        direction, losses = train_lora_direction(
            model, tokenizer, samples, lora, kind=kind, steps=steps, base_model_name=model_cfg.name_or_path,
            source=f"quickstart LoRA SFT on {samples[0].source.split(':')[0]}",
        )
        paths[kind] = direction.save(out_dir / f"{kind}.safetensors")
        log.info("saved %s direction to %s (loss %.3f -> %.3f)", kind, paths[kind], losses[0], losses[-1])
    return paths


def quickstart_config(out_dir: Path, data_root: Path, direction_paths: dict[str, Path]) -> ScoreJobConfig:
    return ScoreJobConfig(
        model=ModelConfig(name_or_path="tiny-llama", attn_implementation="eager"),
        lora=LoraSettings(),
        data=DataConfig(path=str(data_root / "benign" / "dolly_387.jsonl"), max_length=512),
        directions=DirectionsConfig(danger=str(direction_paths["danger"]), safety=str(direction_paths["safety"])),
        output=OutputConfig(dir=str(out_dir), overwrite=True),
        fidelity=FidelityConfig(enabled=True, n_samples=16),
    )


def run_quickstart(out_dir: Path, data_root: Path, overrides: list[str] | None = None) -> Path:
    base = quickstart_config(out_dir, data_root, {"danger": out_dir / "directions" / "danger.safetensors",
                                                  "safety": out_dir / "directions" / "safety.safetensors"})
    cfg = from_dict(ScoreJobConfig, apply_overrides(to_dict(base), overrides or [], ScoreJobConfig))
    build_quick_directions(out_dir / "directions", data_root, cfg.model, cfg.lora)
    return run_score(cfg)

