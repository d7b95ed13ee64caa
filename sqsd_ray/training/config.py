"""The training job's typed config (``sqsd-ray train``, ``directions build``, ``trajectory``, the band fine-tunes) and
the identity a checkpoint is resumed under.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..config import ConfigError, RunOutput, help_field, identity_dict, stable_hash
from ..data.records import DataConfig
from ..data.presets import get_preset
from ..data.reference import resolve_data_path
from ..job_base import ModelDataJob
from ..runtime import WorkerScaling
from ..tracking import TrackingConfig
from .spf import SpfSettings

if TYPE_CHECKING:
    import pyarrow.fs


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
    gradient_checkpointing: bool = help_field(
        False, help="recompute each decoder layer's activations in the backward pass instead of keeping them: less "
        "memory for about one more forward per step; same loss and gradients (docs/training.md)"
    )
    deepspeed_config: str | None = help_field(
        None, help="ZeRO only: a DeepSpeed JSON file merged into the engine config sqsd_ray builds; the file's values "
        "win except train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps and "
        "zero_optimization.stage, which follow train.batch_size / micro_batch_size / zero_stage",
        identity_if_set=True,
    )
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
        if self.deepspeed_config is not None and not self.zero_stage:
            raise ConfigError("train.deepspeed_config configures the DeepSpeed engine, which runs only with "
                              "train.zero_stage 2 or 3; set the stage, or drop the file")
        if self.spf.enabled and self.objective != "sft":
            raise ConfigError("train.spf protects an SFT fine-tune; it does not apply to train.objective=dpo")
        if self.spf.enabled and self.zero_stage == 3:
            raise ConfigError("train.spf does not support ZeRO-3: the safety gradient needs whole parameters on "
                              "every rank; use train.zero_stage 2 (or 0) for SPF runs")


@dataclass
class RayTrainOutput(RunOutput):
    """A run directory plus where Ray Train persists the run (its checkpoints and run state)."""

    storage_path: str | None = help_field(
        None, help="where Ray Train writes (scaling.use_ray): a pyarrow.fs URI (s3://bucket/prefix, gs://bucket/prefix, "
        "file:///abs/path) or a path every node sees; null = the run directory dir itself, which must then be shared "
        "storage on a multi-node cluster. A fine-tune's checkpoints are copied into <dir>/train when it ends"
    )

    def __post_init__(self) -> None:
        if self.storage_path is not None and not self.storage_path.strip():
            raise ConfigError("output.storage_path must be a URI or a path, or null for output.dir; got an empty string")

    def ray_storage_path(self, run_dir: Path) -> str:
        """``RunConfig.storage_path``: the URI as given (Ray Train opens it with pyarrow.fs), or an absolute path,
        since Ray Train's processes run in other working directories."""
        if self.storage_path is not None and "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path or run_dir).expanduser().resolve())

    def ray_storage(self, run_dir: Path) -> tuple[pyarrow.fs.FileSystem, str]:
        """The file system and path of ``ray_storage_path``, for reading what Ray Train wrote there."""
        import pyarrow.fs

        where = self.ray_storage_path(run_dir)
        try:
            return pyarrow.fs.FileSystem.from_uri(where)
        except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
            raise ConfigError(f"output.storage_path {where!r}: pyarrow.fs cannot open it: {err}") from err

    def storage_below(self, *parts: str) -> str | None:
        """``storage_path`` of a sub-run (an experiment's band fine-tune): ``<storage_path>/<parts…>``, or None
        where this output keeps Ray Train's files in its own run directories."""
        if self.storage_path is None:
            return None
        return "/".join([self.storage_path.rstrip("/"), *parts])


@dataclass
class TrainOutput(RayTrainOutput):
    # dir again for its own default: --help-config shows a section's class defaults, not a default_factory's
    dir: str = help_field("runs/train", help="run directory (checkpoints in <dir>/train/step-XXXXXX)")
    resume: bool = help_field(True, help="continue from the newest checkpoint of the same job in dir")


@dataclass
class TrainJobConfig(ModelDataJob):
    train: TrainSettings = field(default_factory=TrainSettings)
    scaling: WorkerScaling = field(default_factory=WorkerScaling)
    output: TrainOutput = field(default_factory=TrainOutput)
    # not part of training_identity: where the metrics go does not change the weights
    tracking: TrackingConfig = help_field(default_factory=TrackingConfig, help="TensorBoard / MLflow logging of "
                                          "loss, learning rate, gradient norm and tokens/s (rank 0)")


def data_fingerprint(data: DataConfig) -> str:
    """Content hash of a local data file (the same path may be rewritten, e.g. S1.jsonl of a new partition), a
    ``ref:`` name's file included (mirror or hub copy); an HF dataset is identified by its name, subset and split
    (and ``data.revision``, which the identity holds through the data config)."""
    # a file preset with no path reads its reference file (presets.resolve); an HF preset keeps its old identity
    reference = get_preset(data.preset).reference if data.preset and not data.path else None
    path = Path(resolve_data_path(data.path or reference or "", data.revision))
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
    sections = {name: identity_dict(getattr(cfg, name)) for name in ("model", "lora", "data", "train")}
    for section, keys in LAYOUT_KEYS.items():
        for key in keys:
            sections[section].pop(key, None)
    sections["data_content"] = data_fingerprint(cfg.data)
    if cfg.train.spf.enabled and cfg.train.spf.safety_path:
        sections["spf_safety_content"] = data_fingerprint(DataConfig(path=cfg.train.spf.safety_path))
    if cfg.train.deepspeed_config is not None:  # the file may be edited in place: its settings, not its path
        from .zero import read_deepspeed_config

        sections["deepspeed_config_content"] = read_deepspeed_config(cfg.train.deepspeed_config)
    return stable_hash(sections)


# Settings that change how a run is laid out or logged, not the weights it produces: a resume may change them
# (e.g. a smaller micro-batch after running out of memory). gradient_checkpointing recomputes the same activations,
# so the loss and gradients agree within float tolerance (tests/unit/test_training_checkpointing.py).
LAYOUT_KEYS = {"train": ("micro_batch_size", "zero_stage", "offload_optimizer", "stage3_param_persistence_threshold",
                         "log_every", "checkpoint_every", "gradient_checkpointing"),
               "model": ("attn_implementation",)}
