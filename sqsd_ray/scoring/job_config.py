"""The ``sqsd-ray score`` job's typed config: model, data, directions, init states, batching, output, fidelity.

Shared by the driver (``scoring.job``), the per-block worker (``scoring.blocks``) and the Ray pool
(``scoring.ray_pool``), so none of them imports another to read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..baselines.job import BaselineSettings
from ..config import ConfigError, help_field
from ..job_base import ModelDataJob
from ..runtime import RayConfig
from ..tracking import TrackingConfig

DIRECTION_NAMES = ("danger", "safety")


@dataclass
class InitStateConfig:
    """Where the one-step update is taken (paper §4.3, App. E)."""

    kind: Literal["direction", "adapter", "random"] = help_field(
        "direction",
        help="direction: θ0 + α·V (linear path, paper's choice for θ_safety); adapter: a peft adapter dir, e.g. "
        "a pilot fine-tune checkpoint θ_t* (paper's choice for θ_danger); random: Gaussian A0 and B0 (tests).",
    )
    direction: Literal["danger", "safety"] | None = help_field(
        None, help="kind=direction: which direction V; defaults to the direction projected at this state."
    )
    alpha: float = help_field(1.0, help="kind=direction: steering magnitude α (α* from App. E's sensitivity table).")
    path: str | None = help_field(None, help="kind=adapter: peft adapter directory (safetensors).")
    seed: int = help_field(0, help="kind=random: seed.")
    std: float = help_field(0.02, help="kind=random: standard deviation of A0 and B0 entries.")

    def __post_init__(self) -> None:
        if self.kind == "adapter" and not self.path:
            raise ConfigError("init state kind=adapter needs path: a peft adapter directory")
        if not math.isfinite(self.alpha) or not math.isfinite(self.std):
            raise ConfigError(f"init state alpha and std must be finite numbers, got alpha={self.alpha}, std={self.std}")
        if self.kind == "random" and self.std <= 0:
            raise ConfigError(f"init state std must be > 0 for kind=random, got {self.std}")
        if self.kind == "direction" and self.alpha == 0.0:
            raise ConfigError("init state alpha=0 gives B0 = 0 and no safety-sensitive update; use alpha > 0")


@dataclass
class DirectionsConfig:
    danger: str = help_field("", help="V_danger: a direction .safetensors file or a peft adapter dir (LoRA SFT on harmful data).")
    safety: str = help_field("", help="V_safety: a direction .safetensors file or a peft adapter dir (LoRA DPO on preference pairs).")


@dataclass
class InitStatesConfig:
    danger: InitStateConfig = field(default_factory=lambda: InitStateConfig(kind="direction", direction="danger"))
    safety: InitStateConfig = field(default_factory=lambda: InitStateConfig(kind="direction", direction="safety"))


@dataclass
class BatchingConfig:
    """How samples are grouped into padded micro-batches.

    ``layout: auto`` (the default) times the candidate layouts of ``bench/kernel.py`` (d) on the same samples of
    the first block and keeps the fastest (run.json: ``batch_layout``, ``layout_calibration``): which one wins
    depends on the model's width and the device (bs 1 for SmolLM2 on CPU, bs 4 for a narrow model). Layouts
    change scores only by rounding (≤ 1e-6), but a timed choice may differ between runs and workers, so scores
    are then not bit-reproducible; ``fixed`` is. A batch size or token
    budget set here fixes the layout instead, as does ``layout: fixed`` (then the device's defaults: bs 1 on CPU,
    16 samples / 8192 tokens on CUDA).
    """

    layout: Literal["auto", "fixed"] = help_field(
        "auto", help="auto: calibrate on the first block (each candidate layout timed on the same samples; "
        "run.json records the timings and the choice) unless max_batch_size or max_tokens is set; fixed: "
        "max_batch_size / max_tokens, or the device's defaults."
    )
    max_batch_size: int | None = help_field(None, help="samples per batch (fixes the layout); default 1 on CPU, "
                                            "16 on CUDA.")
    max_tokens: int | None = help_field(
        None, help="padded tokens per batch (n × longest; fixes the layout); default 8192 on CUDA: an 8B model in "
        "bf16 keeps ~4.5 MB of activations per token for the backward, so 8192 tokens ≈ 36 GB next to 16 GB of "
        "weights."
    )
    padding_side: Literal["right", "left"] = help_field("right", help="scores do not depend on it (tested).")
    device: Literal["auto", "cpu", "cuda"] = help_field("auto", help="auto = cuda when available.")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens"):  # 0 would silently mean "the default"
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"batching.{name} must be >= 1 (or null for the device's default), got {value}")

    @property
    def calibrates(self) -> bool:
        """Whether the layout is chosen by timing (auto, and neither size fixed)."""
        return self.layout == "auto" and self.max_batch_size is None and self.max_tokens is None

    def resolve(self) -> tuple[torch.device, int, int]:
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if self.device == "auto" else self.device))
        on_gpu = device.type == "cuda"
        batch_size = self.max_batch_size or (16 if on_gpu else 1)
        max_tokens = self.max_tokens or (8192 if on_gpu else 1 << 30)
        return device, batch_size, max_tokens


@dataclass
class KernelConfig:
    """How the per-module reduction of the backward hooks runs (``sqsd_ray.scoring.compiled``)."""

    compile: Literal["auto", "on", "off"] = help_field(
        "auto", help="torch.compile the per-module reduction (Eq. 9-12). auto: on CUDA, eager on CPU, where it does "
        "not pay (bench/kernel.py, docs/benchmarks.md); falls back to eager with one logged line when compiling "
        "fails. on: compile or fail. off: eager. run.json records what ran."
    )


@dataclass
class OutputConfig:
    dir: str = help_field("runs/score", help="run directory (created); '{method}' in it becomes the method, so one "
                          "job file serves every baseline (--set method=...)")
    overwrite: bool = help_field(
        False, help="replace the run in output.dir: the new run is built beside it and swapped in only once it "
        "succeeded, so a failed or interrupted overwrite leaves the earlier run as it was (rerun to resume it).")
    resume: bool = help_field(
        True, help="continue an interrupted run of the same job (same config, model, directions): samples already "
        "scored from their current content are skipped, changed ones scored again, removed ones dropped; a "
        "different job refuses with the differences named."
    )
    part_rows: int = help_field(256, help="in-process runs: rows per part file (the unit of resume).")
    per_module: bool = help_field(False, help="also store per-module projections (list columns).")
    top_k: int = help_field(10, help="samples shown at each end in summary.md.")
    break_lock: bool = help_field(
        False, help="take over the run directory's lock even when its holder ran on another host (only when you "
        "know that run is gone; a holder on this host that is gone is taken over without it)."
    )

    def __post_init__(self) -> None:
        if self.part_rows < 1:
            raise ConfigError(f"output.part_rows must be >= 1, got {self.part_rows}")
        if self.top_k < 0:
            raise ConfigError(f"output.top_k must be >= 0, got {self.top_k}")
        if not self.dir:
            raise ConfigError("output.dir must not be empty")


@dataclass
class FidelityConfig:
    """First-order check of Eq. 13 on a few samples: predicted vs actual loss change along V."""

    enabled: bool = help_field(False, help="run the check and write fidelity.json.")
    n_samples: int = help_field(16, help="samples checked (the first ones in id order).")
    eps: list[float] = help_field([1e-3, 1e-2, 1e-1], help="step sizes along the direction.")
    direction: Literal["danger", "safety"] = help_field("danger", help="which direction to step along.")


@dataclass
class ScoreJobConfig(ModelDataJob):
    """Everything ``sqsd-ray score`` needs; see jobs/*.yaml for annotated examples."""

    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    init_states: InitStatesConfig = field(default_factory=InitStatesConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    scoring: KernelConfig = field(default_factory=KernelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    method: Literal["sqsd", "self_inf_n", "bianchor_grad", "bianchor_reps", "reward_model", "larf"] = help_field(
        "sqsd", help="sqsd, or a baseline of App. D through the same pipeline: self_inf_n, bianchor_grad, "
        "bianchor_reps, reward_model, larf (the score column is named after the method)"
    )
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    # not part of scoring_identity: where the metrics go does not change the scores
    tracking: TrackingConfig = help_field(default_factory=TrackingConfig, help="TensorBoard / MLflow logging of "
                                          "samples/s and tokens/s per block and the run's counts at the end")

    def __post_init__(self) -> None:
        self.output.dir = self.output.dir.replace("{method}", self.method)
        if self.method != "sqsd":
            return  # the baselines use no directions
        for name in DIRECTION_NAMES:
            if not getattr(self.directions, name):
                raise ConfigError(f"directions.{name} is required: a direction file or peft adapter dir")
