"""LoRA fine-tuning (SFT or DPO) as one train loop that runs in this process or on Ray Train workers.

Directions (Eq. 3–4), pilot/benign trajectories (§3.2) and the S1–S5 fine-tunes all train through here::

    run_training(cfg)                    driver: output dir, resume point, Ray Train ``TorchTrainer`` (or none)
      └─ train_worker(config)            per worker: model + LoRA, data shard, ``Trainer``, checkpoints
           └─ Trainer.train_step()       one global batch: micro-batches, loss (``objectives``), AdamW step

Batching is deterministic and independent of the worker count: epoch ``e`` visits the samples in a seeded
permutation, a step takes the next ``batch_size`` of them (the epoch's last batch is filled up from the
epoch's start, so every step has a full batch), and worker ``k`` of ``W`` takes every W-th sample of it.
Since the SFT token count of the global batch is known to every worker, each micro-batch contributes
``Σ token NLL / global tokens`` and the summed gradient equals one big batch's, for any W and micro-batch size.

A checkpoint is a directory ``step-000150/`` with ``adapter/`` (peft, safetensors), ``optimizer.safetensors``
(AdamW's step and moments per trainable tensor, whole even under ZeRO; no pickle) and ``trainer_state.json`` (step, epoch, the metric history so far).
Every ``checkpoint_every`` steps and at the end; a rerun of the same job resumes from the newest one, and a
Ray Train worker restarted after a failure resumes from the last one reported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from .config import ConfigError, from_dict, help_field, stable_hash, to_dict
from .data import (
    DataConfig,
    DataReport,
    Sample,
    TokenizedSample,
    collate,
    load_samples,
    tokenize_samples,
)
from .models import (
    LoraSettings,
    ModelConfig,
    apply_lora,
    get_lora_factors,
    load_adapter_state,
    load_model_and_tokenizer,
    save_adapter,
    set_lora_factors,
    with_absolute_paths,
)
from .objectives import dpo_loss, sequence_logps, sft_loss
from .runtime import WorkerScaling
from .spf import DEFAULT_REFUSAL_PAIR, ProjectionStats, SpfSettings, project_gradients

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "train"  # checkpoints live in <output.dir>/train/step-XXXXXX
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"  # full fine-tuning checkpoints


# ------------------------------------------------------------------------------------------- configs


@dataclass
class TrainSettings:
    """The optimisation (paper §5.1 / App. A: AdamW, batch 8, 10 epochs, lr 5e-6 for directions/trajectories)."""

    objective: Literal["sft", "dpo"] = help_field(
        "sft", help="sft: response-token NLL (V_danger, benign fine-tunes); dpo: sigmoid DPO on chosen/rejected "
        "pairs against the base model as reference (V_safety)."
    )
    method: Literal["lora", "full"] = help_field(
        "lora", help="lora: train a LoRA adapter (checkpoints are peft adapters); full: every weight (checkpoints are "
        "whole models; paper lr 5e-6). DPO needs lora (the reference is the model with the adapter off)."
    )
    zero_stage: Literal[0, 2, 3] = help_field(
        0, help="0: plain data parallel (DDP); 2 or 3: DeepSpeed ZeRO (3 partitions the weights too: for models "
        "that do not fit one device, e.g. full fine-tuning of 14B/32B)"
    )
    offload_optimizer: bool = help_field(False, help="ZeRO only: keep optimizer states in CPU memory")
    stage3_param_persistence_threshold: int | None = help_field(
        None, help="ZeRO-3: parameters smaller than this stay unpartitioned (DeepSpeed default 1e5; 0 partitions all)"
    )
    lr: float = help_field(5e-6, help="peak learning rate (paper: 5e-6 directions and trajectories, 5e-5 S1-S5)")
    batch_size: int = help_field(8, help="global batch: samples (or pairs) per optimizer step, over all workers")
    micro_batch_size: int | None = help_field(
        None, help="samples per forward on one worker (gradient accumulation); default batch_size / workers"
    )
    epochs: int = help_field(10, help="passes over the data (ignored when max_steps is set)")
    max_steps: int | None = help_field(None, help="stop after this many optimizer steps")
    checkpoint_every: int = help_field(
        150, help="save a checkpoint every k steps (paper: 150 for trajectories); 0 = only the final one"
    )
    lr_schedule: Literal["cosine", "linear", "constant"] = help_field("cosine", help="decay after warm-up")
    warmup_ratio: float = help_field(0.0, help="fraction of the steps with a linear warm-up from 0")
    weight_decay: float = help_field(0.0, help="AdamW weight decay")
    max_grad_norm: float | None = help_field(1.0, help="clip the global gradient norm (null = no clipping)")
    beta: float = help_field(0.1, help="DPO β (paper: 0.1)")
    seed: int = help_field(0, help="seed of the data order (and of LoRA's A initialisation)")
    log_every: int = help_field(10, help="report metrics every k steps")
    spf: SpfSettings = field(default_factory=SpfSettings)

    def __post_init__(self) -> None:
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size must be >= 1 or null, got {self.micro_batch_size}")
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.beta <= 0:
            raise ConfigError(f"train.beta must be > 0, got {self.beta}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.objective == "dpo" and self.method == "full":
            raise ConfigError("train.objective=dpo needs train.method=lora (the reference model is the adapter-off model)")
        if self.offload_optimizer and not self.zero_stage:
            raise ConfigError("train.offload_optimizer needs train.zero_stage 2 or 3")
        if self.spf.enabled and self.objective != "sft":
            raise ConfigError("train.spf protects an SFT fine-tune; it does not apply to train.objective=dpo")
        if self.spf.enabled and self.zero_stage == 3:
            raise ConfigError("train.spf does not support ZeRO-3: the safety gradient needs whole parameters on "
                              "every rank; use train.zero_stage 2 (or 0) for SPF runs")


@dataclass
class TrainOutput:
    dir: str = help_field("runs/train", help="run directory (checkpoints in <dir>/train/step-XXXXXX)")
    overwrite: bool = help_field(False, help="delete an existing run directory first")
    resume: bool = help_field(True, help="continue from the newest checkpoint of the same job in dir")


@dataclass
class TrainJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    scaling: WorkerScaling = field(default_factory=WorkerScaling)
    output: TrainOutput = field(default_factory=TrainOutput)


# Settings that change how a run is laid out or logged, not the weights it produces: a resume may change them
# (e.g. a smaller micro-batch after running out of memory).
LAYOUT_KEYS = {"train": ("micro_batch_size", "zero_stage", "offload_optimizer", "stage3_param_persistence_threshold",
                         "log_every", "checkpoint_every"),
               "model": ("attn_implementation",)}


def data_fingerprint(data: DataConfig) -> str:
    """Content hash of a local data file (the same path may be rewritten, e.g. S1.jsonl of a new partition);
    an HF dataset is identified by its name, subset and split."""
    path = Path(data.path)
    if data.format == "hf" or not path.is_file():
        return f"{data.path}|{data.hf_subset}|{data.hf_split}"
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def training_identity(cfg: TrainJobConfig) -> str:
    """Hash of what determines the trained weights: model, LoRA, data (config and file content) and the
    optimisation; not where they are written, how many workers share the work, or how it is logged."""
    sections = {name: to_dict(getattr(cfg, name)) for name in ("model", "lora", "data", "train")}
    for section, keys in LAYOUT_KEYS.items():
        for key in keys:
            sections[section].pop(key, None)
    sections["data_content"] = data_fingerprint(cfg.data)
    if cfg.train.spf.enabled and cfg.train.spf.safety_path:
        sections["spf_safety_content"] = data_fingerprint(DataConfig(path=cfg.train.spf.safety_path))
    return stable_hash(sections)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class TrainingExample:
    """One SFT sample, or one DPO pair (``rejected`` set; same prompt tokens)."""

    chosen: TokenizedSample
    rejected: TokenizedSample | None = None

    @property
    def sample_id(self) -> str:
        return self.chosen.sample_id


def load_training_examples(data: DataConfig, tokenizer: Any, objective: str) -> tuple[list[TrainingExample], DataReport]:
    """Samples (SFT) or preference pairs (DPO) of ``data``, tokenised with response-only labels.

    A DPO pair is kept only if both sides fit ``max_length`` under the data's overlong policy; a dropped
    pair is counted in the report like any other skipped sample.
    """
    samples, report = load_samples(data)
    if objective == "sft":
        return [TrainingExample(t) for t in tokenize_samples(samples, tokenizer, data, report)], report
    missing = [s for s in samples if s.rejected is None]
    if missing:
        raise ConfigError(
            f"train.objective=dpo needs preference pairs (prompt, chosen, rejected), but {missing[0].source} has "
            "no rejected response; use data.schema: preference or a preference preset (e.g. pku_saferlhf_pairs)"
        )
    chosen = {t.sample_id: t for t in tokenize_samples(samples, tokenizer, data, report)}
    rejected_report = DataReport(source=report.source)
    rejected_report.kept = len(samples)
    rejected = {t.sample_id: t for t in tokenize_samples([s.rejected_sample() for s in samples], tokenizer, data,
                                                         rejected_report)}
    examples = [TrainingExample(chosen[s.sample_id], rejected[s.sample_id])
                for s in samples if s.sample_id in chosen and s.sample_id in rejected]
    # a pair whose chosen side fit but whose rejected side did not goes too, counted under the rejected side's
    # reason (rejected_overlong, rejected_prompt_too_long) with its message
    dropped = len(chosen) - len(examples)
    if dropped:
        report.kept -= dropped
        for reason, count in rejected_report.skipped.items():
            report.skipped[f"rejected_{reason}"] = report.skipped.get(f"rejected_{reason}", 0) + count
            report.examples.setdefault(f"rejected_{reason}", []).extend(rejected_report.examples.get(reason, []))
        report.skipped = {k: v for k, v in report.skipped.items() if v}
    report.truncated += rejected_report.truncated
    return examples, report


def load_refusal_examples(spf: SpfSettings, data: DataConfig, tokenizer: Any) -> list[TrainingExample]:
    """SPF's safety set: harmful requests answered with refusals (``spf.safety_path``, or the built-in pair),
    tokenised like the fine-tuning data (same template, system prompt and length limit)."""
    if spf.safety_path is None:
        samples = [Sample(sample_id="spf-default-refusal", messages=tuple(DEFAULT_REFUSAL_PAIR["messages"]),
                          response=DEFAULT_REFUSAL_PAIR["response"], source="built-in refusal pair")]
        report = DataReport(source="built-in refusal pair")
        report.kept = 1
    else:
        safety_data = DataConfig(path=spf.safety_path, system_prompt=data.system_prompt, max_length=data.max_length)
        samples, report = load_samples(safety_data)
    tokenized = tokenize_samples(samples, tokenizer, data, report)
    if not tokenized:
        raise ConfigError(f"train.spf.safety_path {spf.safety_path}: the refusal set is empty (no harmful request "
                          f"+ refusal record left after reading it):\n{report.summary()}")
    return [TrainingExample(t) for t in tokenized]


# ------------------------------------------------------------------------------------------- trainer


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
    Every rank calls ``save`` (ZeRO-3 must gather the partitioned weights); only rank 0 writes.
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
    ) -> None:
        if not examples:
            raise ValueError("no training examples: the data set is empty after filtering and length checks")
        if settings.batch_size % world_size:
            raise ConfigError(f"train.batch_size {settings.batch_size} must be a multiple of the {world_size} workers")
        self.model, self.examples, self.settings, self.lora = model, list(examples), settings, lora
        self.pad_token_id, self.rank, self.world_size, self.device = pad_token_id, rank, world_size, torch.device(device)
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
        self.engine = None
        if settings.zero_stage:
            self.engine, self.optimizer = self._deepspeed_engine()
        else:
            self.optimizer = torch.optim.AdamW([p for _, p in self.named_params], lr=settings.lr,
                                               weight_decay=settings.weight_decay)

    def _deepspeed_engine(self):
        import deepspeed

        share = self.settings.batch_size // self.world_size
        micro = self.settings.micro_batch_size or share
        if share % micro:
            raise ConfigError(f"with ZeRO, each worker's {share} samples per step must split into whole micro-batches "
                              f"of train.micro_batch_size {micro}")
        zero: dict[str, Any] = {"stage": self.settings.zero_stage}
        if self.settings.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if self.settings.zero_stage == 3 and self.settings.stage3_param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = self.settings.stage3_param_persistence_threshold
        config = {
            "train_batch_size": self.settings.batch_size,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": share // micro,
            "optimizer": {"type": "AdamW", "params": {"lr": self.settings.lr, "weight_decay": self.settings.weight_decay,
                                                     "torch_adam": not self.settings.offload_optimizer}},
            "zero_optimization": zero,
            "bf16": {"enabled": next(self.model.parameters()).dtype == torch.bfloat16},
            "steps_per_print": 10**9,
        }
        if self.settings.max_grad_norm is not None:
            config["gradient_clipping"] = self.settings.max_grad_norm
        engine, optimizer, _, _ = deepspeed.initialize(model=self.model, config=config,
                                                       model_parameters=[p for _, p in self.named_params])
        return engine, optimizer

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
        metrics.update(step=self.step + 1, epoch=self.step / self.steps_per_epoch, lr=self.optimizer.param_groups[0]["lr"])
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

    # -- checkpoints

    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None elsewhere); ZeRO-3 gathers them from every rank."""
        if self.engine is not None and self.settings.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.rank == 0 else None

    def _lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter's factors, gathered first under ZeRO-3 (whose partitioned weights read as empty)."""
        if self.engine is not None and self.settings.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in self.named_params], modifier_rank=None):
                return get_lora_factors(self.model)
        return get_lora_factors(self.model)

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW's state per trainable tensor, ``"<param name>::<key>"`` (step, exp_avg, exp_avg_sq), whole.

        Without ZeRO it is read from the optimizer directly. Under ZeRO-2/3 each rank holds its slice of one flat
        fp32 buffer per group: ``safe_get_full_optimizer_state`` assembles every parameter's moments (a
        collective every rank joins in the same order), so a checkpoint does not depend on the worker count.
        """
        if self.engine is None:
            return {f"{name}::{key}": torch.as_tensor(value).detach().cpu().contiguous()
                    for name, param in self.named_params for key, value in self.optimizer.state[param].items()}
        from deepspeed.utils import safe_get_full_optimizer_state

        step = _zero_optimizer_step(self.engine.optimizer.optimizer)
        tensors: dict[str, torch.Tensor] = {}
        for name, param in self.named_params:
            for key in ADAM_MOMENTS:
                whole = safe_get_full_optimizer_state(param, key)  # every rank joins; only rank 0 keeps a copy
                if self.rank == 0:
                    tensors[f"{name}::{key}"] = whole.detach().cpu().contiguous()
            if self.rank == 0:
                tensors[f"{name}::step"] = torch.tensor(float(step))
        return tensors

    def save(self, directory: Path, identity: str) -> Path | None:
        """Write the weights (adapter or whole model), AdamW's state and the trainer state.

        Called on every rank; returns the directory on rank 0 and None elsewhere.
        """
        from safetensors.torch import save_file

        if self.settings.method == "lora":
            factors = self._lora_factors()  # collective under ZeRO-3
            if self.rank == 0:
                if any(a.numel() == 0 or b.numel() == 0 for a, b in factors.values()):
                    raise RuntimeError("gathered LoRA factors are empty: the adapter would be saved without weights")
                save_adapter(factors, self.lora, directory / ADAPTER_DIR)
        else:
            state = self._full_state_dict()  # collective under ZeRO-3
            if self.rank == 0:
                self.model.save_pretrained(str(directory / MODEL_DIR), state_dict=state, safe_serialization=True)
        optimizer = self._optimizer_tensors()  # collective under ZeRO
        if self.rank != 0:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        save_file(optimizer, str(directory / OPTIMIZER_FILE))
        state = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "total_steps": self.total_steps,
                 "steps_per_epoch": self.steps_per_epoch, "identity": identity, "method": self.settings.method,
                 "optimizer_state": True, "history": self.history}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=1))
        return directory

    def load_state(self, directory: Path, identity: str) -> None:
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
                missing = [name for name, _ in self.named_params if f"{name}::exp_avg" not in keys]
                if missing:
                    raise ValueError(f"{directory / OPTIMIZER_FILE} has no AdamW state for {len(missing)} trainable "
                                     f"tensors (first: {missing[0]}): it belongs to another model or adapter")
                if self.engine is None:
                    self._load_optimizer_tensors({key: saved.get_tensor(key) for key in keys})
                else:
                    self._load_zero_optimizer_tensors(saved)
        else:  # checkpoints written before ZeRO runs saved their moments
            log.warning("resuming %s without optimizer moments (the checkpoint has no %s); AdamW restarts its "
                        "moment estimates", directory.name, OPTIMIZER_FILE)
        self.step, self.history = int(state["step"]), list(state["history"])

    def _load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        opt_state = self.optimizer.state_dict()
        for i, (name, _) in enumerate(self.named_params):
            entries = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
            if entries:
                opt_state["state"][i] = {k: v.to(self.device) if k != "step" else v for k, v in entries.items()}
        self.optimizer.load_state_dict(opt_state)

    def _load_zero_optimizer_tensors(self, saved) -> None:
        """Put whole-tensor moments (``saved``: an open safetensors file) back into this rank's ZeRO partitions.

        The flat fp32 buffers get their AdamW state on the first ``step()`` only, so a fresh engine has nowhere to
        put them: create that state here, as the optimizer would have (zeros, the saved step), tie the parameters'
        fragments to it (ZeRO-2 does that lazily after its first step) and fill each rank's own slice.
        """
        from deepspeed.utils import safe_set_full_optimizer_state

        steps = {float(saved.get_tensor(k)) for k in saved.keys() if k.endswith("::step")}
        if len(steps) != 1:
            raise ValueError(f"optimizer state holds {len(steps)} different step counts; expected one")
        zero_optimizer = self.engine.optimizer
        inner = zero_optimizer.optimizer
        step = steps.pop()
        # this rank's flat fp32 buffers (ZeRO-3 lends them to the optimizer's param groups only inside step())
        flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or \
            zero_optimizer.single_partition_of_fp32_groups
        for flat in flats:
            if not inner.state.get(flat):
                inner.state[flat] = {
                    # torch's AdamW keeps the step as a float tensor; DeepSpeed's CPU Adam (offload) as an int
                    "step": torch.tensor(step) if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) else int(step),
                    **{key: torch.zeros_like(flat, dtype=torch.float32) for key in ADAM_MOMENTS},
                }
        link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2; ZeRO-3 reads state
        if link is not None:
            zero_optimizer._hp_optimizer_states_linked = False
            link()
        for name, param in self.named_params:
            for key in ADAM_MOMENTS:
                value = saved.get_tensor(f"{name}::{key}").to(self.device, torch.float32)
                if hasattr(param, "ds_id"):  # ZeRO-3
                    _set_zero3_partition(zero_optimizer, param, value, key)
                else:
                    safe_set_full_optimizer_state(param, value, key)

    def load(self, directory: Path, identity: str) -> None:
        """Weights and state of a checkpoint (no ZeRO: the weights can still be written in place)."""
        if self.engine is not None:
            raise RuntimeError("with ZeRO, load the weights before building the trainer (load_weights)")
        load_weights(self.model, directory, self.settings.method)
        self.load_state(directory, identity)


def _set_zero3_partition(zero_optimizer, param: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
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


def _zero_optimizer_step(inner: torch.optim.Optimizer) -> float:
    """The step count of the optimizer inside a ZeRO engine (the same for every flat fp32 buffer)."""
    steps = {float(state["step"]) for state in inner.state.values() if "step" in state}
    if len(steps) != 1:
        raise RuntimeError(f"ZeRO optimizer holds {len(steps)} step counts ({sorted(steps)}); expected one")
    return steps.pop()


def _lora_settings_of(model: torch.nn.Module) -> LoraSettings:
    """The LoraSettings of a peft model's active adapter (what its checkpoints' adapter_config.json records)."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    if config is None:
        raise ValueError("method=lora but the model has no LoRA adapter (apply_lora first)")
    targets = config.target_modules
    return LoraSettings(r=config.r, alpha=float(config.lora_alpha), target_modules=sorted(targets),
                        dropout=float(config.lora_dropout), use_rslora=bool(config.use_rslora))


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


def _sum_over_workers(metrics: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    """Metrics summed over workers: each worker's values are its share of the global batch."""
    if world_size == 1:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


# -------------------------------------------------------------------------------------------- worker


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


class _LocalSession:
    """Rank 0 of 1 in this process: checkpoints are moved into the run directory as they are saved."""

    rank, world_size = 0, 1

    def __init__(self, run_dir: Path, resume_from: str | None) -> None:
        self.run_dir, self.resume_from = run_dir, resume_from
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def init_deepspeed(self) -> None:
        """DeepSpeed needs a process group even for one process."""
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            self._saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK",
                                                               "WORLD_SIZE")}
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1")
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")

    def close(self) -> None:
        """Undo init_deepspeed: the process group and the environment (runs in this process come and go)."""
        saved = getattr(self, "_saved_env", None)
        if saved is None:
            return
        import deepspeed.comm
        import torch.distributed as dist

        if dist.is_initialized():  # through DeepSpeed, which also drops the groups it cached (a later run's
            deepspeed.comm.destroy_process_group()  # engine would otherwise reach for the destroyed ones)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = None

    def restore_point(self) -> Path | None:
        return Path(self.resume_from) if self.resume_from else None

    def release_restore(self) -> None:
        pass

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, name: str | None) -> None:
        if checkpoint_dir is not None:
            target = self.run_dir / CHECKPOINT_DIR / str(name)
            partial = target.with_name(target.name + ".partial")  # a crash mid-copy leaves no half checkpoint
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(checkpoint_dir, partial)
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)


class _RaySession:
    """A Ray Train worker: DDP wrapping, the restored checkpoint, ``ray.train.report``."""

    def __init__(self, resume_from: str | None) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.resume_from = resume_from

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def init_deepspeed(self) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")  # Ray's group

    def restore_point(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # set after a worker-group restart (fault tolerance)
        if checkpoint is not None:
            self._copy = Path(checkpoint.to_directory())  # a local copy: removed once loaded (release_restore)
            return self._copy
        return Path(self.resume_from) if self.resume_from else None

    def close(self) -> None:
        pass  # Ray Train owns the process group

    def release_restore(self) -> None:
        copy = getattr(self, "_copy", None)
        if copy is not None and self.resume_from != str(copy):
            shutil.rmtree(copy, ignore_errors=True)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, name: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train's ``train_loop_per_worker``; also called directly without Ray)."""
    cfg = from_dict(TrainJobConfig, config["job"])
    session = _RaySession(config.get("resume_from")) if config.get("ray", False) else _LocalSession(
        Path(cfg.output.dir), config.get("resume_from"))
    previous_threads = torch.get_num_threads()
    if session.device.type == "cpu" and (config.get("ray", False) or cfg.scaling.torch_threads):
        # a Ray worker uses its CPU reservation; a run in this process keeps torch's default unless told
        torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    try:
        _train(cfg, config["identity"], session)
    finally:
        session.close()
        torch.set_num_threads(previous_threads)  # in-process runs leave the caller's setting as it was


def _train(cfg: TrainJobConfig, identity: str, session: _LocalSession | _RaySession) -> None:
    torch.manual_seed(cfg.train.seed)  # same LoRA A init on every worker
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    lora = cfg.lora if cfg.train.method == "lora" else None
    if lora is not None:
        model = apply_lora(model, lora)
    model.to(session.device)
    model.train()
    examples, report = load_training_examples(cfg.data, tokenizer, cfg.train.objective)
    if not examples:
        raise ValueError(f"no training examples left in {cfg.data.path}:\n{report.summary()}")
    if session.rank == 0:
        log.info("training on %d %s (%d read, %d skipped: %s)", len(examples),
                 "pairs" if cfg.train.objective == "dpo" else "samples", report.records_read, report.n_skipped,
                 report.skipped or "none")
    restore = session.restore_point()
    if restore is not None:  # weights first: ZeRO partitions them when the trainer is built
        load_weights(model, restore, cfg.train.method)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    refusals = load_refusal_examples(cfg.train.spf, cfg.data, tokenizer) if cfg.train.spf.enabled else None
    if cfg.train.zero_stage:
        session.init_deepspeed()
    trainer = Trainer(model, examples, cfg.train, pad, session.rank, session.world_size, session.device, lora,
                      refusals)
    if restore is not None:
        trainer.load_state(restore, identity)
        session.release_restore()
        log.info("resumed at step %d from %s", trainer.step, restore)
    forward = trainer.engine or session.prepare(model)
    try:
        _loop(cfg, identity, session, trainer, forward)
    finally:
        if trainer.engine is not None:
            trainer.engine.destroy()  # ZeRO-3 hooks and buffers hold memory until released


def _loop(cfg: TrainJobConfig, identity: str, session: _LocalSession | _RaySession, trainer: Trainer,
          forward: torch.nn.Module) -> None:
    every = cfg.train.checkpoint_every
    progress = _progress(trainer, session.rank)
    while trainer.step < trainer.total_steps:
        metrics = trainer.train_step(forward)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        step = trainer.step
        _maybe_fail(cfg, session, step)
        if (every and step % every == 0) or step == trainer.total_steps:
            with tempfile.TemporaryDirectory() as tmp:
                directory = trainer.save(Path(tmp), identity)  # every rank: ZeRO-3 gathers collectively
                session.report(metrics, directory, checkpoint_name(step))
        elif step % cfg.train.log_every == 0:
            session.report(metrics, None, None)
    progress.close()


def _maybe_fail(cfg: TrainJobConfig, session: _LocalSession | _RaySession, step: int) -> None:
    """Fault drill (``scaling.fail_at_step``): rank 0 kills its own process once, at that step."""
    if cfg.scaling.fail_at_step != step or session.rank != 0:
        return
    marker = Path(cfg.output.dir) / ".fault_drill_done"
    if marker.exists():
        return
    marker.write_text(f"killed at step {step}\n")
    log.warning("fault drill: killing training worker rank 0 at step %d", step)
    os.kill(os.getpid(), signal.SIGKILL)


def _progress(trainer: Trainer, rank: int):
    from tqdm.auto import tqdm

    return tqdm(total=trainer.total_steps, initial=trainer.step, desc=f"LoRA {trainer.settings.objective}",
                unit="step", disable=rank != 0, mininterval=2.0)


# -------------------------------------------------------------------------------------------- driver


@dataclass
class TrainRun:
    """What a finished training run left in its directory."""

    dir: Path
    checkpoints: list[Path]
    history: list[dict[str, float]]
    seconds: float

    @property
    def final(self) -> Path:
        return self.checkpoints[-1]

    def checkpoint(self, step: int | None) -> Path:
        """The checkpoint of ``step`` (None = the final one); an error listing the steps that exist."""
        if step is None:
            return self.final
        for path in self.checkpoints:
            if int(path.name.split("-")[1]) == step:
                return path
        steps = [int(p.name.split("-")[1]) for p in self.checkpoints]
        raise ValueError(f"{self.dir}: no checkpoint at step {step}; saved steps: {steps}")


def load_run(run_dir: str | Path) -> TrainRun:
    """A finished run's checkpoints and metric history (from the newest checkpoint's trainer state)."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no checkpoints under {Path(run_dir) / CHECKPOINT_DIR}")
    state = json.loads((checkpoints[-1] / STATE_FILE).read_text())
    return TrainRun(Path(run_dir), checkpoints, state["history"], 0.0)


def _prepare_output(cfg: TrainJobConfig, identity: str) -> Path | None:
    """Create the run directory; return the checkpoint to resume from, if any."""
    out = Path(cfg.output.dir)
    if out.exists() and cfg.output.overwrite:
        shutil.rmtree(out)
    checkpoints = list_checkpoints(out)
    if checkpoints:
        state = json.loads((checkpoints[-1] / STATE_FILE).read_text())
        if not cfg.output.resume or state["identity"] != identity:
            why = "output.resume is false" if not cfg.output.resume else "they belong to a different job"
            raise FileExistsError(
                f"{out} already holds checkpoints and {why}; set output.overwrite: true or choose another output.dir"
            )
        return checkpoints[-1]
    out.mkdir(parents=True, exist_ok=True)
    return None


def run_training(cfg: TrainJobConfig) -> TrainRun:
    """Train ``cfg`` to completion (resuming if possible) and return the run's checkpoints and history."""
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be a multiple of scaling.num_workers "
                          f"{cfg.scaling.num_workers}")
    identity = training_identity(cfg)
    resume = _prepare_output(cfg, identity)
    out = Path(cfg.output.dir).resolve()
    # only the training job's own keys (cfg may be a subclass, e.g. a direction build), as an absolute path
    # since workers may run in another working directory
    cfg_dict = {f.name: to_dict(getattr(cfg, f.name)) for f in fields(TrainJobConfig)}
    cfg_dict["output"]["dir"] = str(out)
    cfg_dict["model"] = to_dict(with_absolute_paths(cfg.model))
    if cfg.data.format != "hf" and Path(cfg.data.path).exists():
        cfg_dict["data"]["path"] = str(Path(cfg.data.path).resolve())
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    if resume is not None and (resume / STATE_FILE).is_file():
        done = json.loads((resume / STATE_FILE).read_text())
        log.info("resuming %s from %s (step %d of %d)", out, resume.name, done["step"], done["total_steps"])
        if done["step"] >= done["total_steps"]:
            return load_run(out)
    config = {"job": cfg_dict, "identity": identity, "resume_from": str(resume) if resume else None}
    start = time.perf_counter()
    if cfg.scaling.use_ray:
        _fit_with_ray_train(cfg, config, out)
    else:
        train_worker({**config, "ray": False})
    run = load_run(out)
    run.seconds = time.perf_counter() - start
    _write_run_files(run, cfg)
    return run


def _fit_with_ray_train(cfg: TrainJobConfig, config: dict[str, Any], out: Path) -> None:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .runtime import fit_on_ray_train, init_ray, train_failure_config

    init_ray(cfg.scaling)
    scaling = ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**config, "ray": True},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(
            name=CHECKPOINT_DIR,
            storage_path=str(out),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # every checkpoint is a trajectory point
            failure_config=train_failure_config(cfg.scaling),
        ),
    )
    result = fit_on_ray_train(trainer, cfg.scaling, lambda: _what_was_kept(out))
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error


def _what_was_kept(out: Path) -> str:
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        return f"no checkpoint was written yet under {out / CHECKPOINT_DIR}; rerun the same command to start again"
    return (f"checkpoints up to {checkpoints[-1].name} are kept in {out / CHECKPOINT_DIR}; rerun the same command "
            "(with workers available) to resume from there")


def _write_run_files(run: TrainRun, cfg: TrainJobConfig) -> None:
    index = [{"step": int(p.name.split("-")[1]), "path": str(p),
              **{k: v for k, v in json.loads((p / STATE_FILE).read_text()).items() if k in ("epoch",)}}
             for p in run.checkpoints]
    (run.dir / "checkpoints.json").write_text(json.dumps(index, indent=1))
    with (run.dir / "train_log.jsonl").open("w") as f:
        for row in run.history:
            f.write(json.dumps(row) + "\n")
    plot_training_curve(run.history, run.dir / "train_loss.png", cfg.train.objective)
    last = run.history[-1] if run.history else {}
    log.info("trained %d steps in %.1f s; final loss %.4f; %d checkpoints in %s", len(run.history), run.seconds,
             last.get("loss", float("nan")), len(run.checkpoints), run.dir / CHECKPOINT_DIR)


def plot_training_curve(history: list[dict[str, float]], path: Path, objective: str) -> Path | None:
    if not history:
        return None
    from .summary import pyplot

    plt = pyplot()

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history], lw=1.2, label=f"{objective} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if objective == "dpo":
        twin = ax.twinx()
        twin.plot(steps, [h["reward_accuracy"] for h in history], color="tab:green", lw=1, alpha=0.7,
                  label="reward accuracy")
        twin.set_ylabel("reward accuracy")
        twin.set_ylim(-0.05, 1.05)
    ax.set_title(f"LoRA {objective.upper()} training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "Trainer",
    "load_weights",
    "TrainJobConfig",
    "TrainOutput",
    "TrainRun",
    "TrainSettings",
    "TrainingExample",
    "list_checkpoints",
    "load_run",
    "load_training_examples",
    "lr_factor",
    "run_training",
    "train_worker",
]
