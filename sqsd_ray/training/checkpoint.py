"""Checkpoint layout: ``<output.dir>/train/step-XXXXXX/`` with the weights, AdamW's state and the trainer state.

A checkpoint directory holds ``adapter/`` (peft, safetensors) or ``model/`` (full fine-tuning),
``optimizer.safetensors`` (AdamW's step and moments per trainable tensor, whole even under ZeRO; no pickle) and
``trainer_state.json`` (step, epoch, the metric history so far).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.lora import load_adapter_state, set_lora_factors

CHECKPOINT_DIR = "train"  # checkpoints live in <output.dir>/train/step-XXXXXX


STATE_FILE = "trainer_state.json"


OPTIMIZER_FILE = "optimizer.safetensors"


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


ADAPTER_DIR = "adapter"


MODEL_DIR = "model"  # full fine-tuning checkpoints


def load_weights(model: torch.nn.Module, directory: Path, method: str) -> None:
    """Put a checkpoint's weights into ``model``: the adapter factors (LoRA) or the whole state dict (full)."""
    if method == "lora":
        factors, _ = load_adapter_state(directory / ADAPTER_DIR)
        set_lora_factors(model, factors)
        return
    from safetensors.torch import load_file

    files = sorted((directory / MODEL_DIR).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory / MODEL_DIR} has no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:  # tied lm_head is not saved
        raise ValueError(f"{directory / MODEL_DIR} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run directory (``<dir>/train/step-*`` with a trainer state), oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*")
             if (p / STATE_FILE).is_file() and ((p / ADAPTER_DIR).is_dir() or (p / MODEL_DIR).is_dir())]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))
