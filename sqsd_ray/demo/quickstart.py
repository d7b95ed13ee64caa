"""``sqsd-ray quickstart``: the embedded default job, end to end on one CPU in about a minute.

1. A tiny Llama (2 layers, built from a config, seeded) and the byte-level ChatML tokenizer.
2. V_danger: LoRA SFT on AdvBench harmful behaviours (goal -> affirmative target), 40 steps.
   V_safety: LoRA DPO (β = 0.1) on the same goals with a refusal preferred over the target, 40 steps.
   Both through the direction builder (``dynamics.run_directions_build``) in this process: the same loop,
   checkpoints and direction files as ``sqsd-ray directions build`` on Ray Train.
3. Scores the 387 Dolly samples of the reference data (``ref:dolly_387``) with SQSD, each projection at θ0 + 1·V (linear-path states),
   and writes the run directory (Parquet, summary, histogram, Eq. 13 fidelity check).

A random tiny model knows nothing about safety, so its scores show the machinery, not a finding; the
model-organism demo is where the ranking is put to the test.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import apply_overrides, from_dict, to_dict
from ..data.records import DataConfig
from ..data.reference import reference_file
from ..dynamics.jobs import DirectionExport, DirectionsBuildConfig, run_directions_build
from ..models.loading import ModelConfig
from ..models.lora import LoraSettings
from ..runtime import WorkerScaling
from ..scoring.job import run_score
from ..scoring.job_config import DirectionsConfig, FidelityConfig, OutputConfig, ScoreJobConfig
from ..training.config import TrainOutput, TrainSettings

log = logging.getLogger(__name__)

DIRECTION_DATA = {  # kind -> (data preset, objective)
    "danger": ("advbench_harmful", "sft"),
    "safety": ("advbench_refusal_pairs", "dpo"),
}


def build_quick_directions(out_dir: Path, data_root: Path | None, model_cfg: ModelConfig, lora: LoraSettings,
                           steps: int = 40, n_prompts: int = 128) -> dict[str, Path]:
    """Train and save V_danger and V_safety for ``model_cfg``; returns their .safetensors paths. AdvBench comes from
    ``data_root`` (None: $SQSD_DATA_DIR or ../shared/data), or the hub (``data.reference``)."""
    advbench = reference_file("advbench", data_root)
    paths = {}
    for kind, (preset, objective) in DIRECTION_DATA.items():
        cfg = DirectionsBuildConfig(
            model=model_cfg, lora=lora,
            data=DataConfig(path=str(advbench), preset=preset, max_length=256, limit=n_prompts),
            train=TrainSettings(objective=objective, lr=1e-3, batch_size=8, max_steps=steps, checkpoint_every=0,
                                lr_schedule="constant"),
            scaling=WorkerScaling(use_ray=False),
            direction=DirectionExport(kind=kind),
            output=TrainOutput(dir=str(out_dir / kind), overwrite=True),
        )
        paths[kind] = run_directions_build(cfg)
    return paths


def quickstart_config(out_dir: Path, data_root: Path | None, direction_paths: dict[str, Path]) -> ScoreJobConfig:
    return ScoreJobConfig(
        model=ModelConfig(name_or_path="tiny-llama", attn_implementation="eager"),
        lora=LoraSettings(),
        data=DataConfig(path=str(reference_file("dolly_387", data_root)), max_length=512),
        directions=DirectionsConfig(danger=str(direction_paths["danger"]), safety=str(direction_paths["safety"])),
        output=OutputConfig(dir=str(out_dir), overwrite=True),
        fidelity=FidelityConfig(enabled=True, n_samples=16),
    )


def run_quickstart(out_dir: Path, data_root: Path | None = None, overrides: list[str] | None = None) -> Path:
    directions = out_dir / "directions"
    base = quickstart_config(out_dir, data_root, {kind: directions / kind / f"{kind}.safetensors"
                                                  for kind in DIRECTION_DATA})
    cfg = from_dict(ScoreJobConfig, apply_overrides(to_dict(base), overrides or [], ScoreJobConfig))
    build_quick_directions(directions, data_root, cfg.model, cfg.lora)
    return run_score(cfg)
