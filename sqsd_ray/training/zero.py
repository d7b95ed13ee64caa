"""DeepSpeed ZeRO-2/3 for the ``Trainer``: the engine (its config, merged with a user's file), and AdamW's state
moved into and out of ZeRO's partitions.

Under ZeRO each rank holds its slice of one flat fp32 buffer per parameter group, and the optimizer creates
those buffers' AdamW state on its first ``step()`` only. Checkpoints keep every tensor's state whole
(``checkpoint``), so a run can resume on another worker count; the helpers here assemble and split it.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ConfigError, deep_merge

if TYPE_CHECKING:  # config reads a user's DeepSpeed file through this module
    from .config import TrainSettings

log = logging.getLogger(__name__)

# Keys derived from train.batch_size, micro_batch_size, the worker count and zero_stage. The loop's batching, its
# loss normalisation (Σ NLL / global tokens) and its checkpoints rely on them, so a user's file cannot change them.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "zero_optimization.stage")


def read_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """A user's DeepSpeed JSON file (``train.deepspeed_config``) as a dict; errors name the key and the file."""
    file = Path(path).expanduser()
    if not file.is_file():
        where = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"train.deepspeed_config: file {file}{where} does not exist")
    try:
        loaded = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"train.deepspeed_config: {file} is not valid JSON ({err})") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"train.deepspeed_config: {file} must hold a JSON object (DeepSpeed's config), "
                          f"got {type(loaded).__name__}")
    return loaded


def merge_deepspeed_config(ours: dict[str, Any], user: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``user`` merged into ``ours`` key by key (nested objects merged too): the user's values win, except on
    ``OWNED_KEYS``, which keep ours. Also returns ``"key (file: x, used: y)"`` for each owned key the file set to
    another value."""
    merged = deep_merge(copy.deepcopy(ours), user)
    overridden = []
    for dotted in OWNED_KEYS:
        *parents, leaf = dotted.split(".")
        kept, node, given = ours, merged, user
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"train.deepspeed_config: {part} must be a JSON object, got {given.get(part)!r}")
            kept, node, given = kept[part], node[part], given.get(part, {})
        if leaf in given and given[leaf] != kept[leaf]:
            overridden.append(f"{dotted} (file: {given[leaf]!r}, used: {kept[leaf]!r})")
        node[leaf] = kept[leaf]
    return merged, overridden


def engine_config(settings: TrainSettings, world_size: int, dtype: torch.dtype,
                  log_overrides: bool = True) -> dict[str, Any]:
    """DeepSpeed's config for the trainer's settings: the same global batch, AdamW and clipping as without ZeRO,
    merged with ``settings.deepspeed_config`` if set (``merge_deepspeed_config``); ``log_overrides``: name the
    file's values that were replaced, in one log line.

    Each worker's share of the global batch is split into micro-batches by gradient accumulation, which needs
    the share to be a whole number of micro-batches.
    """
    share = settings.batch_size // world_size
    micro = settings.micro_batch_size or share
    if share % micro:
        raise ConfigError(f"with ZeRO, each worker's {share} samples per step must split into whole micro-batches "
                          f"of train.micro_batch_size {micro}")
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if settings.zero_stage == 3 and settings.stage3_param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = settings.stage3_param_persistence_threshold
    config = {
        "train_batch_size": settings.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": share // micro,
        "optimizer": {"type": "AdamW", "params": {"lr": settings.lr, "weight_decay": settings.weight_decay,
                                                 "torch_adam": not settings.offload_optimizer}},
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
    }
    if settings.max_grad_norm is not None:
        config["gradient_clipping"] = settings.max_grad_norm
    if settings.deepspeed_config is None:
        return config
    merged, overridden = merge_deepspeed_config(config, read_deepspeed_config(settings.deepspeed_config))
    if overridden and log_overrides:
        log.warning("train.deepspeed_config %s: kept sqsd_ray's value of %s; these follow train.batch_size, "
                    "micro_batch_size, zero_stage and the worker count", settings.deepspeed_config,
                    ", ".join(overridden))
    return merged


def build_engine(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], settings: TrainSettings,
                 world_size: int, rank: int = 0):
    """A DeepSpeed engine around ``model`` training ``params``, and its (ZeRO-wrapped) optimizer."""
    import deepspeed

    config = engine_config(settings, world_size, next(model.parameters()).dtype, log_overrides=rank == 0)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=list(params))
    return engine, optimizer


def optimizer_step(inner: torch.optim.Optimizer) -> float:
    """The step count of the optimizer inside a ZeRO engine (the same for every flat fp32 buffer).

    ZeRO keeps no per-parameter step, so a checkpoint records this one for every tensor.
    """
    steps = {float(state["step"]) for state in inner.state.values() if "step" in state}
    if len(steps) != 1:
        raise RuntimeError(f"ZeRO optimizer holds {len(steps)} step counts ({sorted(steps)}); expected one")
    return steps.pop()


def full_optimizer_state(param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """One parameter's whole optimizer-state tensor ``key``, assembled from every rank's partition.

    A collective: every rank must call it for the same parameters in the same order.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    return safe_get_full_optimizer_state(param, key)


def create_optimizer_state(zero_optimizer, step: float, moments: Sequence[str]) -> None:
    """Give this rank's flat fp32 buffers an AdamW state (zero ``moments``, the given step), as ``step()`` would.

    A fresh engine has no state to load moments into until its first step; the parameters' fragments are also
    tied to that state here, which ZeRO-1/2 otherwise does lazily after the first step.
    """
    inner = zero_optimizer.optimizer
    # this rank's flat fp32 buffers (ZeRO-3 lends them to the optimizer's param groups only inside step())
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or \
        zero_optimizer.single_partition_of_fp32_groups
    for flat in flats:
        if not inner.state.get(flat):
            inner.state[flat] = {
                # torch's AdamW keeps the step as a float tensor; DeepSpeed's CPU Adam (offload) as an int
                "step": torch.tensor(step) if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) else int(step),
                **{key: torch.zeros_like(flat, dtype=torch.float32) for key in moments},
            }
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2; ZeRO-3 reads state
    if link is not None:
        zero_optimizer._hp_optimizer_states_linked = False
        link()


def set_full_optimizer_state(zero_optimizer, param: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """Write this rank's slice of one parameter's whole optimizer-state tensor ``value`` into its partition."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        set_zero3_partition(zero_optimizer, param, value, key)
    else:
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(param, value, key)


def set_zero3_partition(zero_optimizer, param: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """This rank's slice of a whole ZeRO-3 optimizer-state tensor. A partition is ``ceil(numel / W)`` long, so
    the last rank's runs past the tensor's end (padding, zero in a real run too): DeepSpeed's own
    ``safe_set_full_optimizer_state`` slices past the end there and fails whenever W does not divide the size."""
    partition, group = zero_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                                     optim_state_key=key)
    flat = value.flatten()
    start = partition.numel() * zero_optimizer._get_param_partition_rank(param)
    count = max(0, min(partition.numel(), flat.numel() - start))
    partition.zero_()
    if count:
        partition.narrow(0, 0, count).copy_(flat.narrow(0, start, count))
    if zero_optimizer._swappable_optimizer_subgroup(group):  # NVMe offload: write the slice back out
        zero_optimizer._optimizer_states_and_gradient_swap_out(group)
