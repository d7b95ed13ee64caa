"""The ``Trainer``: AdamW over a LoRA adapter or every weight, one deterministic global batch per step.

Batching is deterministic and independent of the worker count: epoch ``e`` visits the samples in a seeded
permutation, a step takes the next ``batch_size`` of them (the epoch's last batch is filled up from the
epoch's start, so every step has a full batch), and worker ``k`` of ``W`` takes every W-th sample of it.
Since the SFT token count of the global batch is known to every worker, each micro-batch contributes
``Σ token NLL / global tokens`` and the summed gradient equals one big batch's, for any W and micro-batch size.

Checkpoint writing and restoring live in ``checkpoint`` (``Trainer.save`` / ``load_state`` / ``load`` call it),
and building the DeepSpeed engine and moving AdamW's state through ZeRO's partitions in ``zero``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data.tokenize import TokenizedSample, collate
from ..models.loading import BaseModelReference, base_model_of
from ..models.lora import LoraSettings
from .checkpoint import load_checkpoint, load_checkpoint_state, save_checkpoint
from .config import TrainSettings
from .examples import TrainingExample
from .objectives import dpo_loss, sequence_logps, sft_loss
from .spf import ProjectionStats, project_gradients
from .zero import build_engine


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at ``step`` (0-based), as in transformers' schedules."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


class Trainer:
    """AdamW on the trainable parameters of ``model`` (a LoRA adapter, or every weight) over ``examples``.

    ``model`` is the unwrapped model (a peft model for LoRA). Without ZeRO, ``train_step`` runs forwards
    through the module it is given (the model itself, or its DistributedDataParallel wrapper); with
    ``settings.zero_stage`` 2 or 3 the trainer builds a DeepSpeed engine around the model and runs through it.
    Every rank calls ``save`` (ZeRO-3 must gather the partitioned weights); only rank 0 writes. ``base_model`` is
    recorded in saved adapters, and ``tokenizer`` is saved beside a full fine-tune's weights, so that a checkpoint
    loads on its own with ``AutoPeftModelForCausalLM`` or ``AutoModelForCausalLM`` + ``AutoTokenizer``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        examples: Sequence[TrainingExample],
        settings: TrainSettings,
        pad_token_id: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        lora: LoraSettings | None = None,
        refusals: Sequence[TrainingExample] | None = None,
        base_model: BaseModelReference | None = None,
        tokenizer: Any = None,
    ) -> None:
        if not examples:
            raise ValueError("no training examples: the data set is empty after filtering and length checks")
        if settings.batch_size % world_size:
            raise ConfigError(f"train.batch_size {settings.batch_size} must be a multiple of the {world_size} workers")
        self.model, self.examples, self.settings, self.lora = model, list(examples), settings, lora
        self.pad_token_id, self.rank, self.world_size = pad_token_id, rank, world_size
        self.base_model, self.tokenizer = base_model, tokenizer
        self.device = torch.device(device)
        self.is_dpo = settings.objective == "dpo"
        if self.is_dpo and any(e.rejected is None for e in self.examples):
            raise ValueError("train.objective=dpo needs preference pairs for every example")
        if settings.method == "lora" and lora is None:
            lora = _lora_settings_of(model)
            self.lora = lora
        self.named_params = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
        if not self.named_params:
            raise ValueError("the model has no trainable parameters (apply a LoRA adapter first)")
        self.steps_per_epoch = math.ceil(len(self.examples) / settings.batch_size)
        self.total_steps = settings.max_steps or settings.epochs * self.steps_per_epoch
        self.warmup_steps = int(settings.warmup_ratio * self.total_steps)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)
        self.refusals = list(refusals or [])
        if settings.spf.enabled and not self.refusals:
            raise ValueError("train.spf is enabled but the trainer got no refusal examples (load_refusal_examples)")
        self._safety_grads: dict[str, torch.Tensor] | None = None
        if settings.gradient_checkpointing:  # before ZeRO-3 partitions the layers
            enable_gradient_checkpointing(model)
        self.engine = None
        if settings.zero_stage:
            self.engine, self.optimizer = build_engine(model, [p for _, p in self.named_params], settings, world_size,
                                                       rank)
        else:
            self.optimizer = torch.optim.AdamW([p for _, p in self.named_params], lr=settings.lr,
                                               weight_decay=settings.weight_decay)

    # -- batching

    def global_batch(self, step: int) -> list[int]:
        """Indices of the examples of optimizer step ``step`` (the same on every worker)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.settings.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.examples), generator=generator), epoch
        size = self.settings.batch_size
        idx = self._perm[j * size:(j + 1) * size].tolist()
        while len(idx) < size:  # the epoch's last batch, filled up from the epoch's start
            idx += self._perm[: size - len(idx)].tolist()
        return idx

    def _micro_batches(self, idx: list[int]) -> list[list[int]]:
        mine = idx[self.rank::self.world_size]
        size = self.settings.micro_batch_size or len(mine)
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def _collate(self, samples: list[TokenizedSample]) -> dict[str, torch.Tensor]:
        batch = collate(samples, self.pad_token_id)
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels")}

    # -- one step

    # Data parallelism (DDP or ZeRO) averages gradients over the W workers, so each worker back-propagates W times
    # its share of the global loss; the metrics are the plain shares, summed over workers afterwards.

    def _backward(self, loss: torch.Tensor, last: bool = False) -> None:
        if self.engine is not None:
            self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalised by the global batch
            if not (last and self.settings.spf.enabled):  # SPF steps after projecting (train_step)
                self.engine.step()  # DeepSpeed updates at the accumulation boundary only
        else:
            loss.backward()

    def _sft_micro_step(self, forward: torch.nn.Module, items: list[TrainingExample], global_tokens: float,
                        last: bool = False) -> float:
        batch = self._collate([e.chosen for e in items])
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        weights = torch.tensor([e.chosen.weight for e in items], dtype=logits.dtype, device=logits.device)
        loss = sft_loss(logits, batch["labels"], global_tokens, weights)
        self._backward(loss * self.world_size, last)
        return float(loss.detach())

    def _dpo_micro_step(self, forward: torch.nn.Module, items: list[TrainingExample]) -> dict[str, float]:
        n = len(items)
        batch = self._collate([e.chosen for e in items] + [e.rejected for e in items])  # type: ignore[misc]
        with torch.no_grad(), self.model.disable_adapter():  # π_ref = the base model θ0
            ref_logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            reference = sequence_logps(ref_logits, batch["labels"])
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        policy = sequence_logps(logits, batch["labels"])
        losses, rewards = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.settings.beta)
        size = self.settings.batch_size
        self._backward(losses.sum() * (self.world_size / size))
        margin = rewards["chosen_reward"] - rewards["rejected_reward"]
        return {"loss": float(losses.detach().sum()) / size, "reward_accuracy": float((margin > 0).sum()) / size,
                "reward_margin": float(margin.sum()) / size}

    def train_step(self, forward: torch.nn.Module | None = None) -> dict[str, float]:
        forward = self.engine or forward or self.model
        idx = self.global_batch(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr * lr_factor(self.step, self.total_steps, self.warmup_steps,
                                                       self.settings.lr_schedule)
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        if self.is_dpo:
            for items in self._micro_batches(idx):
                for k, v in self._dpo_micro_step(forward, [self.examples[i] for i in items]).items():
                    metrics[k] = metrics.get(k, 0.0) + v
        else:
            if self.settings.spf.enabled and (self._safety_grads is None or self.step % self.settings.spf.every == 0):
                self._safety_grads = self._refusal_gradients()
            # weighted samples (curated corpora) count weight x tokens; unweighted ones are the plain token mean
            global_tokens = sum(self.examples[i].chosen.weight * self.examples[i].chosen.n_response_tokens
                                for i in idx)
            if global_tokens <= 0:
                raise ValueError(f"step {self.step + 1}: every sample of the batch has loss weight 0")
            micro = self._micro_batches(idx)
            metrics["loss"] = sum(self._sft_micro_step(forward, [self.examples[i] for i in items], global_tokens,
                                                       last=k == len(micro) - 1)
                                  for k, items in enumerate(micro))
        metrics = _sum_over_workers(metrics, self.world_size, self.device)
        if self.settings.spf.enabled:  # after the all-reduce: every rank projects the same averaged gradient
            stats = self._project_utility_gradients()
            metrics.update(spf_projected=stats.fraction_projected, spf_cosine=stats.mean_cosine)
            if self.engine is not None:
                self.engine.step()  # the one optimizer step of this iteration, on the projected gradient
        if self.engine is not None:  # clipped and stepped inside DeepSpeed
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                metrics["grad_norm"] = float(norm)
        else:
            params = [p for _, p in self.named_params]
            if self.settings.max_grad_norm is not None:
                metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm))
            self.optimizer.step()
        metrics.update(step=self.step + 1, epoch=self.step / self.steps_per_epoch,
                       lr=self.optimizer.param_groups[0]["lr"])
        self.step += 1
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite training metrics at step {self.step}: {metrics}")
        self.history.append(metrics)
        return metrics

    # -- SPF (docs/spf.md)

    def _refusal_gradients(self) -> dict[str, torch.Tensor]:
        """G_s: the gradient of the refusal set's token-mean NLL at the current weights, per trainable tensor.

        Computed with ``torch.autograd.grad`` through the unwrapped model: it leaves ``.grad`` alone and fires
        no DDP / ZeRO reduction hooks (every rank computes the same refusal batch, so nothing needs reducing).
        """
        size = min(self.settings.spf.safety_batch_size, len(self.refusals))
        start = (self.step // self.settings.spf.every * size) % len(self.refusals)
        items = [self.refusals[(start + i) % len(self.refusals)] for i in range(size)]
        batch = self._collate([e.chosen for e in items])
        self.model.eval()  # no dropout: every rank must get the same G_s, or their projections (and weights) drift
        try:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = sft_loss(logits, batch["labels"], sum(e.chosen.n_response_tokens for e in items))
            params = [p for _, p in self.named_params]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            self.model.train()
        return {name: (g if g is not None else torch.zeros_like(p)).detach()
                for (name, p), g in zip(self.named_params, grads)}

    def _project_utility_gradients(self) -> ProjectionStats:
        """Replace each tensor's (all-reduced) utility gradient by its SPF projection, before the one step.

        Under ZeRO-2 the gradient lives in partitions: ``safe_get_full_grad`` assembles it (a collective every
        rank joins in the same order) and ``safe_set_full_grad`` writes a projected one back.
        """
        assert self._safety_grads is not None
        if self.engine is not None:
            from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

            utility = {name: safe_get_full_grad(p) for name, p in self.named_params}
        else:
            utility = {name: p.grad for name, p in self.named_params}
        present = {name: g for name, g in utility.items() if g is not None}
        projected, stats = project_gradients(present, self._safety_grads, self.settings.spf)
        for name, p in self.named_params:
            if name in projected and projected[name] is not present[name]:  # unchanged tensors stay bit for bit
                if self.engine is not None:
                    safe_set_full_grad(p, projected[name])
                else:
                    p.grad.copy_(projected[name])
        return stats

    # -- checkpoints (checkpoint.py)

    def save(self, directory: Path, identity: str) -> Path | None:
        """Write a checkpoint on rank 0 (every rank calls it; under ZeRO the writing is collective)."""
        return save_checkpoint(self, directory, identity)

    def load_state(self, directory: Path, identity: str) -> None:
        """Step, metric history and AdamW's state of a checkpoint of the same job (weights loaded beforehand)."""
        load_checkpoint_state(self, directory, identity)

    def load(self, directory: Path, identity: str) -> None:
        """Weights and state of a checkpoint (no ZeRO)."""
        load_checkpoint(self, directory, identity)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (transformers' activation checkpointing).

    Non-reentrant ``torch.utils.checkpoint``: the reentrant kind back-propagates through a layer only if its
    input requires grad, which the output of a frozen embedding (LoRA) does not, so no adapter inside the layers
    would get a gradient unless ``enable_input_require_grads`` hooked the embedding. The non-reentrant kind needs no
    such hook and works with DDP's gradient hooks (transformers adds the hook anyway; it changes no gradient).
    """
    base = base_model_of(model)
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers 5.x renamed it
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _lora_settings_of(model: torch.nn.Module) -> LoraSettings:
    """The LoraSettings of a peft model's active adapter (what its checkpoints' adapter_config.json records)."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    if config is None:
        raise ValueError("method=lora but the model has no LoRA adapter (apply_lora first)")
    targets = config.target_modules
    return LoraSettings(r=config.r, alpha=float(config.lora_alpha), target_modules=sorted(targets),
                        dropout=float(config.lora_dropout), use_rslora=bool(config.use_rslora))


def _sum_over_workers(metrics: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    """Metrics summed over workers: each worker's values are its share of the global batch."""
    if world_size == 1:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))
