"""Checkpoint layout: ``<output.dir>/train/step-XXXXXX/`` with the weights, AdamW's state and the trainer state.

A checkpoint directory holds ``adapter/`` (peft, safetensors) or ``model/`` (full fine-tuning),
``optimizer.safetensors`` (AdamW's step and moments per trainable tensor, whole even under ZeRO; no pickle) and
``trainer_state.json`` (step, epoch, the metric history so far).

``save_checkpoint`` writes one from a ``Trainer`` and ``load_checkpoint_state`` restores a trainer's step, history
and AdamW state from one; ``Trainer.save`` / ``Trainer.load_state`` call them. Under ZeRO every rank takes part
(the weights and moments are gathered from the partitions, see ``zero``) and only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models.lora import get_lora_factors, load_adapter_state, save_adapter, set_lora_factors
from . import zero

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)

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


def save_checkpoint(trainer: Trainer, directory: Path, identity: str) -> Path | None:
    """Write the weights (adapter or whole model), AdamW's state and the trainer state.

    Called on every rank; returns the directory on rank 0 and None elsewhere.
    """
    from safetensors.torch import save_file

    if trainer.settings.method == "lora":
        factors = _lora_factors(trainer)  # collective under ZeRO-3
        if trainer.rank == 0:
            if any(a.numel() == 0 or b.numel() == 0 for a, b in factors.values()):
                raise RuntimeError("gathered LoRA factors are empty: the adapter would be saved without weights")
            base = trainer.base_model
            save_adapter(factors, trainer.lora, directory / ADAPTER_DIR, base.name_or_path if base else None,
                         base.revision if base else None)
    else:
        state = _full_state_dict(trainer)  # collective under ZeRO-3
        if trainer.rank == 0:
            trainer.model.save_pretrained(str(directory / MODEL_DIR), state_dict=state, safe_serialization=True)
            if trainer.tokenizer is not None:  # so the directory loads with AutoModelForCausalLM + AutoTokenizer
                trainer.tokenizer.save_pretrained(str(directory / MODEL_DIR))
    optimizer = _optimizer_tensors(trainer)  # collective under ZeRO
    if trainer.rank != 0:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    save_file(optimizer, str(directory / OPTIMIZER_FILE))
    state = {"step": trainer.step, "epoch": trainer.step / trainer.steps_per_epoch,
             "total_steps": trainer.total_steps, "steps_per_epoch": trainer.steps_per_epoch, "identity": identity,
             "method": trainer.settings.method, "optimizer_state": True, "history": trainer.history}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))
    return directory


def load_checkpoint_state(trainer: Trainer, directory: Path, identity: str) -> None:
    """Step, metric history and AdamW's state of a checkpoint of the same job. The weights are loaded before
    the trainer is built (``load_weights``), since ZeRO partitions them at construction. The learning-rate
    schedule is a function of the step (``lr_factor``), so restoring the step restores it."""
    from safetensors import safe_open

    state = json.loads((directory / STATE_FILE).read_text())
    if state["identity"] != identity:
        raise ValueError(
            f"checkpoint {directory} belongs to another training job (identity {state['identity']}, this job "
            f"{identity}); use output.overwrite: true or another output.dir"
        )
    if (directory / OPTIMIZER_FILE).is_file():
        with safe_open(str(directory / OPTIMIZER_FILE), framework="pt") as saved:  # read tensor by tensor
            keys = set(saved.keys())  # a new list per call: once, not once per tensor
            missing = [name for name, _ in trainer.named_params if f"{name}::exp_avg" not in keys]
            if missing:
                raise ValueError(f"{directory / OPTIMIZER_FILE} has no AdamW state for {len(missing)} trainable "
                                 f"tensors (first: {missing[0]}): it belongs to another model or adapter")
            if trainer.engine is None:
                _load_optimizer_tensors(trainer, {key: saved.get_tensor(key) for key in keys})
            else:
                _load_zero_optimizer_tensors(trainer, saved)
    else:  # checkpoints written before ZeRO runs saved their moments
        log.warning("resuming %s without optimizer moments (the checkpoint has no %s); AdamW restarts its "
                    "moment estimates", directory.name, OPTIMIZER_FILE)
    trainer.step, trainer.history = int(state["step"]), list(state["history"])


def load_checkpoint(trainer: Trainer, directory: Path, identity: str) -> None:
    """Weights and state of a checkpoint (no ZeRO: the weights can still be written in place)."""
    if trainer.engine is not None:
        raise RuntimeError("with ZeRO, load the weights before building the trainer (load_weights)")
    load_weights(trainer.model, directory, trainer.settings.method)
    load_checkpoint_state(trainer, directory, identity)


def _full_state_dict(trainer: Trainer) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); ZeRO-3 gathers them from every rank."""
    if trainer.engine is not None and trainer.settings.zero_stage == 3:
        return trainer.engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()} if trainer.rank == 0 else None


def _lora_factors(trainer: Trainer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's factors, gathered first under ZeRO-3 (whose partitioned weights read as empty)."""
    if trainer.engine is not None and trainer.settings.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainer.named_params], modifier_rank=None):
            return get_lora_factors(trainer.model)
    return get_lora_factors(trainer.model)


def _optimizer_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """AdamW's state per trainable tensor, ``"<param name>::<key>"`` (step, exp_avg, exp_avg_sq), whole.

    Without ZeRO it is read from the optimizer directly. Under ZeRO-2/3 each rank holds its slice of one flat
    fp32 buffer per group: every parameter's moments are assembled from the partitions (a collective every
    rank joins in the same order), so a checkpoint does not depend on the worker count.
    """
    if trainer.engine is None:
        return {f"{name}::{key}": torch.as_tensor(value).detach().cpu().contiguous()
                for name, param in trainer.named_params for key, value in trainer.optimizer.state[param].items()}
    step = zero.optimizer_step(trainer.engine.optimizer.optimizer)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in trainer.named_params:
        for key in ADAM_MOMENTS:
            whole = zero.full_optimizer_state(param, key)  # every rank joins; only rank 0 keeps a copy
            if trainer.rank == 0:
                tensors[f"{name}::{key}"] = whole.detach().cpu().contiguous()
        if trainer.rank == 0:
            tensors[f"{name}::step"] = torch.tensor(float(step))
    return tensors


def _load_optimizer_tensors(trainer: Trainer, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved AdamW state into the trainer's plain torch optimizer (no ZeRO), parameter by parameter."""
    opt_state = trainer.optimizer.state_dict()
    for i, (name, _) in enumerate(trainer.named_params):
        entries = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
        if entries:
            opt_state["state"][i] = {k: v.to(trainer.device) if k != "step" else v for k, v in entries.items()}
    trainer.optimizer.load_state_dict(opt_state)


def _load_zero_optimizer_tensors(trainer: Trainer, saved) -> None:
    """Put whole-tensor moments (``saved``: an open safetensors file) back into this rank's ZeRO partitions.

    A fresh engine has no AdamW state yet, so it is created first with the saved step (one for every tensor,
    as ZeRO keeps), then each rank fills its own slice of every moment.
    """
    steps = {float(saved.get_tensor(k)) for k in saved.keys() if k.endswith("::step")}
    if len(steps) != 1:
        raise ValueError(f"optimizer state holds {len(steps)} different step counts; expected one")
    zero_optimizer = trainer.engine.optimizer
    zero.create_optimizer_state(zero_optimizer, steps.pop(), ADAM_MOMENTS)
    for name, param in trainer.named_params:
        for key in ADAM_MOMENTS:
            value = saved.get_tensor(f"{name}::{key}").to(trainer.device, torch.float32)
            zero.set_full_optimizer_state(zero_optimizer, param, value, key)
