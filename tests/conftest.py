"""Shared fixtures and tolerances. Tiers: tests/unit (torch only), tests/ray (local Ray), tests/gpu (CUDA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tolerances, defined once (STYLE 11).
ORACLE_ATOL = 1e-4  # kernel (fp32) vs real SGD step on a float64 peft model, summed projections
FUNC_RTOL = 1e-5  # per-sample g_A / g_B vs torch.func, float64
INVARIANCE_ATOL = 1e-5  # scores across batch size, padding side, order, neighbours (fp32)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def save_random_directions(root: Path, model: str, seeds: tuple[int, int] = (1, 2)) -> dict[str, Path]:
    """Seeded random rank-8 danger and safety directions for a built-in model, saved as direction files."""
    from sqsd_ray.models.directions import random_direction
    from sqsd_ray.models.loading import ModelConfig, load_model
    from sqsd_ray.models.lora import LoraSettings, lora_module_shapes

    shapes = lora_module_shapes(load_model(ModelConfig(name_or_path=model)), LoraSettings())
    return {kind: random_direction(shapes, rank=8, seed=seed, kind=kind).save(root / f"{kind}.safetensors")
            for kind, seed in zip(("danger", "safety"), seeds)}


def tiny_score_config(root: Path, corpus: Path, max_length: int, **sections) -> dict:
    """A score config of the built-in tiny Llama, in process, with seeded random directions saved under ``root``;
    ``sections`` are added or replace the defaults."""
    save_random_directions(root, "tiny-llama")
    return {"model": {"name_or_path": "tiny-llama"},
            "data": {"path": str(corpus), "max_length": max_length},
            "directions": {kind: str(root / f"{kind}.safetensors") for kind in ("danger", "safety")},
            "ray": {"enabled": False}, **sections}


def interrupt_scoring_after_parts(monkeypatch, parts: int):
    """Make in-process scoring stop with Ctrl-C when it starts part ``parts + 1``; returns a function that undoes it."""
    from sqsd_ray.scoring import blocks

    call = blocks.BlockScorer.__call__

    def interrupt(self, block):
        if self.calls == parts:
            raise KeyboardInterrupt
        return call(self, block)

    monkeypatch.setattr(blocks.BlockScorer, "__call__", interrupt)
    return lambda: monkeypatch.setattr(blocks.BlockScorer, "__call__", call)
