"""``sqsd-ray score``: corpus -> tokenised batches -> SqsdScorer -> Parquet + summary, in one process.

The run directory holds everything needed to trust and replay a score file:

    scores.parquet     one row per sample_id; schema metadata carries the hashes below
    config.yaml        the resolved config
    run.json           config / model / direction / init-state fingerprints, version, timings, data report
    summary.md         top / bottom samples, score-vs-length correlation
    histogram.png      SQSD and SQSD w/o normalisation, and SQSD against response length
    fidelity.json      (optional) first-order check of Eq. 13, see ``fidelity``
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from . import __version__
from .config import ConfigError, help_field, stable_hash, to_dict
from .data import DataConfig, collate, length_sorted_batches, load_samples, tokenize_samples
from .directions import Direction, init_state_from_direction
from .models import LoraSettings, ModelConfig, apply_lora, add_adapter, load_adapter_state, load_model_and_tokenizer
from .models import lora_module_shapes, model_fingerprint, set_lora_factors
from .score import InitState, SqsdScorer, plan_passes

log = logging.getLogger(__name__)

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
    """How samples are grouped. On CPU, padding costs more than batching saves (measured: bench/kernel.py)."""

    max_batch_size: int | None = help_field(None, help="samples per batch; default 1 on CPU, 16 on CUDA.")
    max_tokens: int | None = help_field(None, help="padded tokens per batch (n × longest); default 16384 on CUDA.")
    padding_side: Literal["right", "left"] = help_field("right", help="scores do not depend on it (tested).")
    device: Literal["auto", "cpu", "cuda"] = help_field("auto", help="auto = cuda when available.")

    def resolve(self) -> tuple[torch.device, int, int]:
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if self.device == "auto" else self.device))
        on_gpu = device.type == "cuda"
        batch_size = self.max_batch_size or (16 if on_gpu else 1)
        max_tokens = self.max_tokens or (16384 if on_gpu else 1 << 30)
        return device, batch_size, max_tokens


@dataclass
class OutputConfig:
    dir: str = help_field("runs/score", help="run directory (created).")
    overwrite: bool = help_field(False, help="replace an existing scores.parquet.")
    per_module: bool = help_field(False, help="also store per-module projections (list columns).")
    top_k: int = help_field(10, help="samples shown at each end in summary.md.")


@dataclass
class FidelityConfig:
    """First-order check of Eq. 13 on a few samples: predicted vs actual loss change along V."""

    enabled: bool = help_field(False, help="run the check and write fidelity.json.")
    n_samples: int = help_field(16, help="samples checked (the first ones in id order).")
    eps: list[float] = help_field([1e-3, 1e-2, 1e-1], help="step sizes along the direction.")
    direction: Literal["danger", "safety"] = help_field("danger", help="which direction to step along.")


@dataclass
class ScoreJobConfig:
    """Everything ``sqsd-ray score`` needs; see jobs/*.yaml for annotated examples."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    init_states: InitStatesConfig = field(default_factory=InitStatesConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    def __post_init__(self) -> None:
        for name in DIRECTION_NAMES:
            if not getattr(self.directions, name):
                raise ConfigError(f"directions.{name} is required: a direction file or peft adapter dir")


def load_direction(path: str, kind: str) -> Direction:
    p = Path(path)
    if p.is_dir():
        return Direction.from_peft_adapter(p, kind=kind)
    if p.is_file():
        return Direction.load(p)
    raise ConfigError(f"directions.{kind}: {path} is neither a direction file nor a peft adapter directory")


def build_init_state(
    name: str, cfg: InitStateConfig, directions: dict[str, Direction], projected: str, lora: LoraSettings,
    shapes: dict[str, tuple[int, int]],
) -> InitState:
    """An InitState from its config: θ0 + α·V as LoRA factors, an adapter checkpoint, or random factors."""
    if cfg.kind == "direction":
        which = cfg.direction or projected
        factors = init_state_from_direction(directions[which], cfg.alpha, lora.scaling, lora_rank=lora.r)
        desc = f"θ0 + {cfg.alpha}·V_{which} (A0 = A_v, B0 = α·(s_v/s)·B_v)"
        return InitState(name, factors, lora.scaling, desc, stable_hash([which, cfg.alpha, directions[which].fingerprint(), lora.scaling]))
    if cfg.kind == "adapter":
        factors, info = load_adapter_state(cfg.path)
        if not info.uniform_scaling:
            raise ConfigError(f"init state adapter {cfg.path} uses rank_pattern/alpha_pattern (per-module scalings); "
                              "scoring needs one scaling per state: re-save it without patterns")
        scaling = info.scaling
        fp = stable_hash([cfg.path, {m: [float(A.double().sum()), float(B.double().sum())] for m, (A, B) in factors.items()}])
        return InitState(name, factors, float(scaling), f"adapter {cfg.path}", fp)
    gen = torch.Generator().manual_seed(cfg.seed)
    factors = {
        m: (torch.randn(lora.r, d_in, generator=gen) * cfg.std, torch.randn(d_out, lora.r, generator=gen) * cfg.std)
        for m, (d_out, d_in) in shapes.items()
    }
    return InitState(name, factors, lora.scaling, f"random A0, B0 (seed {cfg.seed}, std {cfg.std})",
                     stable_hash(["random", cfg.seed, cfg.std, lora.r]))


def build_scorer(base_model, cfg: ScoreJobConfig, directions: dict[str, Direction], per_module: bool = False):
    """Peft model with one adapter per init state, directions checked against the model, and the scorer."""
    shapes = lora_module_shapes(base_model, cfg.lora)
    for name, direction in directions.items():
        direction.check_matches(shapes)
    states = {
        d: build_init_state(f"sqsd_{d}_state", getattr(cfg.init_states, d), directions, d, cfg.lora, shapes)
        for d in DIRECTION_NAMES
    }
    passes = plan_passes(states["danger"], states["safety"], directions["danger"], directions["safety"])
    peft_model = None
    for p in passes:
        settings = LoraSettings(
            r=p.state.rank, alpha=p.state.scaling * p.state.rank, target_modules=list(cfg.lora.target_modules),
            dropout=0.0,
        )
        if peft_model is None:
            peft_model = apply_lora(base_model, settings, adapter_name=p.state.name)
        else:
            add_adapter(peft_model, settings, adapter_name=p.state.name)
        set_lora_factors(peft_model, p.state.factors, adapter_name=p.state.name)
    peft_model.eval()
    return SqsdScorer(peft_model, passes, per_module=per_module), states


def run_score(cfg: ScoreJobConfig) -> Path:  # noqa: C901 - a readable top-down recipe
    """Score the corpus in ``cfg.data`` and write the run directory; returns the Parquet path."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from .summary import plot_histogram, render_summary

    out_dir = Path(cfg.output.dir)
    out_path = out_dir / "scores.parquet"
    if out_path.exists() and not cfg.output.overwrite:
        raise FileExistsError(f"{out_path} exists; set output.overwrite=true or choose another output.dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    config_hash = stable_hash(cfg)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    started = time.time()

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    device, batch_size, max_tokens = cfg.batching.resolve()
    model.to(device)
    directions = {d: load_direction(getattr(cfg.directions, d), d) for d in DIRECTION_NAMES}
    scorer, states = build_scorer(model, cfg, directions, per_module=cfg.output.per_module)

    samples, report = load_samples(cfg.data)
    tokenized = tokenize_samples(samples, tokenizer, cfg.data, report)
    log.info("data: %s", report.summary())
    batches = length_sorted_batches(tokenized, max_batch_size=batch_size, max_tokens=max_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    parts = []
    with tqdm(total=len(tokenized), desc="scoring", unit="sample") as bar:
        for indices in batches:
            batch = collate([tokenized[i] for i in indices], pad_id, padding_side=cfg.batching.padding_side)
            parts.append(pd.DataFrame(scorer.score_batch(batch)))
            bar.update(len(indices))
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(df):
        by_id = {t.sample_id: t for t in tokenized}
        df["n_prompt_tokens"] = [by_id[s].n_prompt_tokens for s in df["sample_id"]]
        df["truncated"] = [by_id[s].truncated for s in df["sample_id"]]
        df = df.sort_values("sample_id", kind="stable").reset_index(drop=True)

    fingerprints = {
        "config": config_hash,
        "model": model_fingerprint(model, cfg.model),
        **{f"direction_{d}": directions[d].fingerprint() for d in DIRECTION_NAMES},
        **{f"init_state_{d}": states[d].fingerprint for d in DIRECTION_NAMES},
    }
    meta = {
        "sqsd_ray_version": __version__,
        "fingerprints": fingerprints,
        "init_states": {d: states[d].description for d in DIRECTION_NAMES},
        "modules": scorer.modules,
        "n_passes": len(scorer.passes),
    }
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"sqsd_ray": json.dumps(meta).encode()})
    pq.write_table(table, out_path)

    texts = pd.DataFrame(
        {"sample_id": [s.sample_id for s in samples],
         "prompt": [s.messages[-1]["content"] if s.messages else "" for s in samples],
         "response": [s.response for s in samples]}
    )
    if len(df):
        (out_dir / "summary.md").write_text(render_summary(df, texts, top_k=cfg.output.top_k, data_report=report.summary()))
        plot_histogram(df, out_dir / "histogram.png")
    run_info = {
        **meta,
        "elapsed_s": round(time.time() - started, 3),
        "device": str(device),
        "batch_size": batch_size,
        "data_report": report.to_dict(),
        "n_rows": len(df),
    }
    if cfg.fidelity.enabled and len(tokenized):
        from .fidelity import first_order_fidelity

        fid = first_order_fidelity(scorer, directions[cfg.fidelity.direction], cfg.fidelity.direction,
                                   tokenized, pad_id, cfg.fidelity)
        (out_dir / "fidelity.json").write_text(json.dumps(fid, indent=2))
        run_info["fidelity"] = fid["summary"]
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
    return out_path
