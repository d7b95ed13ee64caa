"""``sqsd-ray score``: corpus -> tokenised rows -> ``BlockScorer`` -> Parquet parts -> scores.parquet + summary.

The same ``BlockScorer`` (model, both init-state adapters, both directions, the batched kernel) runs either
in this process or as the actor class of a Ray Data actor pool (``ray_score``); both paths write parts
through ``ScoreStore``, so output, resume and fingerprints are the same. The run directory holds:

    scores.parquet     one row per sample_id; schema metadata carries the fingerprints below
    parts/, manifest.json   the parts as written and the job identity they belong to (resume)
    config.yaml        the resolved config
    run.json           fingerprints, version, timings, throughput, data report, padding fraction
    summary.md         top / bottom samples, score-vs-length correlation
    histogram.png      SQSD and SQSD w/o normalisation, and SQSD against response length
    fidelity.json      (optional) first-order check of Eq. 13, see ``fidelity``
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from . import __version__
from .baseline_run import BaselineSettings
from .config import ConfigError, help_field, stable_hash, to_dict
from .data import (
    DataConfig,
    DataReport,
    Sample,
    collate,
    content_id,
    length_sorted_batches,
    load_samples,
    tokenize_samples,
)
from .directions import Direction, init_state_from_direction
from .models import (
    LoraSettings,
    ModelConfig,
    add_adapter,
    apply_lora,
    load_adapter_state,
    load_model_and_tokenizer,
    lora_module_shapes,
    model_fingerprint,
    model_identity,
    set_lora_factors,
)
from .runtime import RayConfig
from .score import InitState, SqsdScorer, plan_passes
from .score_store import STATUS_SKIPPED, RunInterrupted, ScoreStore, locked_run

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

    CPU default bs 1: for SmolLM2 it was the fastest layout measured and within ~9 % of the best on a
    length-sorted corpus, and it never pays for padding (docs/benchmarks.md). On a GPU batching pays.
    """

    max_batch_size: int | None = help_field(None, help="samples per batch; default 1 on CPU, 16 on CUDA.")
    max_tokens: int | None = help_field(
        None, help="padded tokens per batch (n × longest); default 8192 on CUDA: an 8B model in bf16 keeps "
        "~4.5 MB of activations per token for the backward, so 8192 tokens ≈ 36 GB next to 16 GB of weights."
    )
    padding_side: Literal["right", "left"] = help_field("right", help="scores do not depend on it (tested).")
    device: Literal["auto", "cpu", "cuda"] = help_field("auto", help="auto = cuda when available.")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens"):  # 0 would silently mean "the default"
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"batching.{name} must be >= 1 (or null for the device's default), got {value}")

    def resolve(self) -> tuple[torch.device, int, int]:
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if self.device == "auto" else self.device))
        on_gpu = device.type == "cuda"
        batch_size = self.max_batch_size or (16 if on_gpu else 1)
        max_tokens = self.max_tokens or (8192 if on_gpu else 1 << 30)
        return device, batch_size, max_tokens


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
    ray: RayConfig = field(default_factory=RayConfig)
    method: Literal["sqsd", "self_inf_n", "bianchor_grad", "bianchor_reps", "reward_model", "larf"] = help_field(
        "sqsd", help="sqsd, or a baseline of App. D through the same pipeline: self_inf_n, bianchor_grad, "
        "bianchor_reps, reward_model, larf (the score column is named after the method)"
    )
    baseline: BaselineSettings = field(default_factory=BaselineSettings)

    def __post_init__(self) -> None:
        self.output.dir = self.output.dir.replace("{method}", self.method)
        if self.method != "sqsd":
            return  # the baselines use no directions
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


def scoring_identity(cfg: ScoreJobConfig, directions: dict[str, Direction]) -> dict:
    """What a score file depends on (resume refuses on any difference): not batching, resources or paths out."""
    if cfg.method != "sqsd":
        from .baseline_run import baseline_identity

        return {"sqsd_ray_version": __version__, "method": cfg.method,
                "config": {"model": to_dict(cfg.model), "lora": to_dict(cfg.lora), "data": to_dict(cfg.data),
                           "baseline": to_dict(cfg.baseline)},
                "model": model_identity(cfg.model), **baseline_identity(cfg)}
    return {
        "sqsd_ray_version": __version__,
        "config": {
            "model": to_dict(cfg.model), "lora": to_dict(cfg.lora), "data": to_dict(cfg.data),
            "init_states": to_dict(cfg.init_states), "per_module": cfg.output.per_module,
        },
        "model": model_identity(cfg.model),
        **{f"direction_{d}": directions[d].fingerprint() for d in DIRECTION_NAMES},
    }


def record_fingerprint(sample: Sample) -> str:
    """Hash of what a score is computed from: the prompt turns and the response (not the id or the source)."""
    return content_id(sample.messages, sample.response)


def sample_rows(samples: Sequence[Sample]) -> list[dict]:
    """Samples as plain rows (what travels through Ray Data): id, prompt turns as JSON, response, source."""
    return [{"sample_id": s.sample_id, "messages": json.dumps(list(s.messages)), "response": s.response,
             "source": s.source} for s in samples]


def tokenize_rows(rows, tokenizer, data_cfg: DataConfig):
    """Rows from ``sample_rows`` (a DataFrame) -> token rows; skipped samples keep a row with ``skip_reason``."""
    import pandas as pd

    out = []
    for sid, messages, response, source in zip(rows["sample_id"], rows["messages"], rows["response"], rows["source"]):
        sample = Sample(sample_id=sid, messages=tuple(json.loads(messages)), response=response, source=source)
        report = DataReport(source=source)
        kept = tokenize_samples([sample], tokenizer, data_cfg, report)  # applies on_overlong; may raise
        # the last user turn and the response as text travel along: the reward-model baseline reads text
        texts = {"prompt_text": next((m["content"] for m in reversed(sample.messages) if m["role"] == "user"), ""),
                 "response_text": response}
        if kept:
            t = kept[0]
            out.append({"sample_id": sid, "input_ids": t.input_ids, "labels": t.labels,
                        "n_prompt_tokens": t.n_prompt_tokens, "truncated": t.truncated, "skip_reason": "", **texts})
        else:
            out.append({"sample_id": sid, "input_ids": [], "labels": [], "n_prompt_tokens": 0, "truncated": False,
                        "skip_reason": next(iter(report.skipped)), **texts})
    return pd.DataFrame(out)


class BlockScorer:
    """Scores a block of token rows: the unit of work of the in-process loop and of each Ray Data actor.

    Loads the model once, attaches both init-state adapters, checks the directions against it and keeps the
    kernel ready. A call sorts its rows by length into micro-batches under the device's batching budget and
    returns one row of scalars per sample (never gradients), plus a row with status ``skipped`` for samples
    tokenisation dropped.
    """

    def __init__(self, cfg: ScoreJobConfig):
        self.cfg = cfg
        self.device, self.batch_size, self.max_tokens = cfg.batching.resolve()
        if cfg.method == "reward_model":  # scores text with its own model: the policy is only a tokenizer here
            from .baseline_run import build_baseline_scorer
            from .models import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.model)
            self.weights_fingerprint = f"reward model {cfg.baseline.reward_model}"
            self.directions, self.states = {}, {}
            self.scorer = build_baseline_scorer(None, self.tokenizer, cfg, self.device)
            self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            self.calls = 0
            return
        model, self.tokenizer = load_model_and_tokenizer(cfg.model)
        model.to(self.device)
        self.weights_fingerprint = model_fingerprint(model, cfg.model)
        if cfg.method != "sqsd":
            from .baseline_run import build_baseline_scorer

            self.directions, self.states = {}, {}
            self.scorer = build_baseline_scorer(model, self.tokenizer, cfg, self.device)
        else:
            self.directions = {d: load_direction(getattr(cfg.directions, d), d) for d in DIRECTION_NAMES}
            self.scorer, self.states = build_scorer(model, cfg, self.directions, per_module=cfg.output.per_module)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.calls = 0

    def __call__(self, block):
        import pandas as pd

        from .data import TokenizedSample

        started = time.perf_counter()
        self.calls += 1
        kept = block[block["skip_reason"] == ""]
        skipped = block[block["skip_reason"] != ""]
        samples = [
            TokenizedSample(sid, [int(i) for i in ids], [int(v) for v in labels], int(n_prompt),
                            sum(1 for v in labels if v != -100), bool(trunc))
            for sid, ids, labels, n_prompt, trunc in zip(
                kept["sample_id"], kept["input_ids"], kept["labels"], kept["n_prompt_tokens"], kept["truncated"]
            )
        ]
        texts = dict(zip(kept["sample_id"], zip(kept["prompt_text"], kept["response_text"]))) \
            if "prompt_text" in kept else {}
        frames = []
        for indices in length_sorted_batches(samples, max_batch_size=self.batch_size, max_tokens=self.max_tokens):
            batch = collate([samples[i] for i in indices], self.pad_id, padding_side=self.cfg.batching.padding_side)
            if texts:
                batch["texts"] = [texts[sid] for sid in batch["sample_ids"]]
            scored = pd.DataFrame(self.scorer.score_batch(batch))
            scored["padded_length"] = int(batch["input_ids"].shape[1])
            frames.append(scored)
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if len(out):
            by_id = {s.sample_id: s for s in samples}
            out["n_prompt_tokens"] = [by_id[s].n_prompt_tokens for s in out["sample_id"]]
            out["truncated"] = [by_id[s].truncated for s in out["sample_id"]]
            out["skip_reason"] = ""
        if len(skipped):
            out = pd.concat([out, pd.DataFrame({"sample_id": skipped["sample_id"], "status": STATUS_SKIPPED,
                                                "skip_reason": skipped["skip_reason"]})], ignore_index=True)
            # keep every column one Arrow type: skipped rows have no scores (NaN) and were not truncated
            out["truncated"] = out["truncated"].fillna(False).astype(bool) if "truncated" in out else False
        out["model_weights"] = self.weights_fingerprint
        out["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        elapsed = time.perf_counter() - started
        n_tokens = int(out["n_tokens"].sum()) if "n_tokens" in out else 0
        log.info("scored block %d: %d samples (%d skipped) in %.2f s, %.0f tokens/s", self.calls, len(kept),
                 len(skipped), elapsed, n_tokens / max(elapsed, 1e-9))
        return out


def _score_in_process(cfg: ScoreJobConfig, store: ScoreStore, rows: list[dict]) -> BlockScorer:
    import pandas as pd
    from tqdm.auto import tqdm

    block_scorer = BlockScorer(cfg)
    with tqdm(total=len(rows), desc="scoring", unit="sample") as bar:
        for start in range(0, len(rows), cfg.output.part_rows):
            chunk = pd.DataFrame(rows[start:start + cfg.output.part_rows])
            store.write_part(block_scorer(tokenize_rows(chunk, block_scorer.tokenizer, cfg.data)))
            bar.update(len(chunk))
    return block_scorer


@dataclass
class CheckedJob:
    """What ``preflight`` read and checked before anything in the run directory was touched."""

    samples: list[Sample]
    report: DataReport
    directions: dict[str, Direction]
    identity: dict
    records: dict[str, str]


def _check_init_state_fits(name: str, cfg: InitStateConfig, shapes: dict[str, tuple[int, int]]) -> None:
    if cfg.kind != "adapter":
        return
    factors, _ = load_adapter_state(cfg.path)
    for module, (A, B) in factors.items():
        if module not in shapes:
            raise ConfigError(f"init_states.{name}.path: adapter {cfg.path} has module {module!r}, which is not a "
                              "LoRA module of the model (another base model or other lora.target_modules?)")
        d_out, d_in = shapes[module]
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise ConfigError(f"init_states.{name}.path: adapter {cfg.path} module {module!r} has A {tuple(A.shape)}, "
                              f"B {tuple(B.shape)}; the model's layer is {d_out}×{d_in}")


def preflight(cfg: ScoreJobConfig) -> CheckedJob:
    """Check that the job can run before its run directory is touched (``run_score`` has checked output.dir): corpus
    readable and not empty, model resolvable, directions and init states the model's shape. Errors name the key or file."""
    from .models import load_tokenizer, lora_shapes_without_weights

    for d in DIRECTION_NAMES:  # fail on the driver, not after every actor has loaded the model
        state = getattr(cfg.init_states, d)
        if state.kind == "adapter" and not Path(state.path).exists():
            raise ConfigError(f"init_states.{d}.path: adapter directory {state.path} does not exist "
                              "(on a cluster it must be on storage every node mounts at the same path)")
    sqsd = cfg.method == "sqsd"
    directions = {d: load_direction(getattr(cfg.directions, d), d) for d in DIRECTION_NAMES} if sqsd else {}
    samples, report = load_samples(cfg.data)
    if not samples:
        raise ConfigError(f"data: {report.source} gave no samples to score ({report.records_read} records read, "
                          f"{sum(report.skipped.values())} skipped); check data.path and the selection keys")
    if cfg.method == "reward_model":
        load_tokenizer(cfg.model)  # the policy model is only a tokenizer here
    else:
        shapes = lora_shapes_without_weights(cfg.model, cfg.lora)
        for d, direction in directions.items():
            try:
                direction.check_matches(shapes)
            except ValueError as err:
                raise ConfigError(f"directions.{d} ({getattr(cfg.directions, d)}) does not fit "
                                  f"{cfg.model.name_or_path}: {err}") from None
        if sqsd:
            for d in DIRECTION_NAMES:
                _check_init_state_fits(d, getattr(cfg.init_states, d), shapes)
    if cfg.ray.enabled:  # last: starts (or attaches to) Ray, and checks the pool fits the cluster
        from .ray_score import ray_resources

        ray_resources(cfg)
    records = {s.sample_id: record_fingerprint(s) for s in samples}
    return CheckedJob(samples, report, directions, scoring_identity(cfg, directions), records)


def run_score(cfg: ScoreJobConfig) -> Path:
    """Score the corpus in ``cfg.data`` and write the run directory; returns the Parquet path.

    Checks everything first (``preflight``), then holds the run directory's lock for the whole run. Ctrl-C (or
    SIGTERM) keeps every part written so far and raises ``RunInterrupted`` saying how to resume.
    """
    started = time.time()
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir: {out} is a file, not a directory; choose another output.dir")
    # The lock (a file beside output.dir) comes first, so a second run is refused at once rather than after its
    # own checks and Ray start; nothing inside output.dir is touched before the checks pass.
    with locked_run(cfg.output.dir, break_lock=cfg.output.break_lock), _sigterm_as_interrupt():
        job = preflight(cfg)
        store = ScoreStore(cfg.output.dir)
        plan = store.begin(job.identity, job.records, overwrite=cfg.output.overwrite, resume=cfg.output.resume)
        (store.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        rows = [r for r in sample_rows(job.samples) if r["sample_id"] not in plan.done]
        log.info("%d samples to score (%d kept from an earlier run, %d changed since, %d removed from the corpus)",
                 len(rows), len(plan.done), plan.changed, plan.removed)
        block_scorer = None
        score_started = time.time()
        try:
            if rows and cfg.ray.enabled:
                from .ray_score import score_with_ray

                score_with_ray(cfg, store, rows)
            elif rows:
                block_scorer = _score_in_process(cfg, store, rows)
        except KeyboardInterrupt:
            kept = len(store.done_ids())
            raise RunInterrupted(f"interrupted: {kept} of {len(job.samples)} samples kept in {store.dir}; rerun the "
                                 "same command to resume") from None
        score_seconds = time.time() - score_started
        _finish_run(cfg, store, job, plan, block_scorer, len(rows), started, score_seconds)
        return store.publish() / "scores.parquet"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A preempted node's SIGTERM stops the run the way Ctrl-C does: what was written is kept."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish_run(cfg: ScoreJobConfig, store: ScoreStore, job: CheckedJob, plan, block_scorer, n_scored_now: int,
                started: float, score_seconds: float) -> None:
    """Consolidate the parts into scores.parquet and write summary.md, histogram.png, fidelity.json, run.json."""
    import pandas as pd

    from .summary import plot_histogram, render_summary

    sqsd = cfg.method == "sqsd"
    samples, report, directions, identity = job.samples, job.report, job.directions, job.identity
    fingerprints = {"config": stable_hash(cfg), **{k: v for k, v in identity.items() if k != "config"}}
    meta = {
        "sqsd_ray_version": __version__,
        "fingerprints": fingerprints,
        "method": cfg.method,
        "init_states": {d: to_dict(getattr(cfg.init_states, d)) for d in DIRECTION_NAMES} if sqsd else {},
        "modules": sorted(directions["danger"].modules) if sqsd else [],
    }
    df, facts = store.consolidate(meta)
    meta = facts.pop("metadata")
    rows_per_node = facts.pop("rows_per_node", None)
    report_dict = report.to_dict()
    report_dict["tokenisation_skipped"] = facts.pop("tokenisation_skips")
    report_dict["truncated"] = int(df["truncated"].sum()) if "truncated" in df else 0
    texts = pd.DataFrame(
        {"sample_id": [s.sample_id for s in samples],
         "prompt": [s.messages[-1]["content"] if s.messages else "" for s in samples],
         "response": [s.response for s in samples]}
    )
    data_lines = report.summary().rstrip() + "".join(
        f"\n  skipped at tokenisation ({reason}): {n}" for reason, n in report_dict["tokenisation_skipped"].items()
    ) + f"\n  truncated to max_length: {report_dict['truncated']}"
    if sqsd:
        (store.dir / "summary.md").write_text(render_summary(df, texts, top_k=cfg.output.top_k,
                                                             data_report=data_lines))
        plot_histogram(df, store.dir / "histogram.png")
    else:
        from .summary import render_method_summary

        (store.dir / "summary.md").write_text(render_method_summary(df, texts, cfg.method, cfg.output.top_k,
                                                                    data_lines))
    run_info = {
        **meta,
        "elapsed_s": round(time.time() - started, 3),
        "scoring_s": round(score_seconds, 3),
        "samples_scored_this_run": n_scored_now,
        "samples_per_s": round(n_scored_now / score_seconds, 3) if n_scored_now and score_seconds > 0 else None,
        "execution": "ray" if cfg.ray.enabled else "in_process",
        # where each row of scores.parquet was scored: Ray node id -> rows (rows kept from an earlier run count
        # under the node that scored them then; rows scored without Ray under "in_process")
        **({"ray": {"rows_per_node": rows_per_node}} if rows_per_node is not None else {}),
        "n_rows": len(df),
        "status_counts": df["status"].value_counts().to_dict(),
        "data_report": report_dict,
        "resume": plan.to_dict(),
        **facts,
    }
    if cfg.fidelity.enabled and sqsd:
        from .data import tokenize_sample
        from .fidelity import first_order_fidelity

        block_scorer = block_scorer or BlockScorer(cfg)
        scored_ok = set(df.loc[df["status"] == "ok", "sample_id"])  # tokenisation skips have no gradient to check
        chosen = sorted((s for s in samples if s.sample_id in scored_ok), key=lambda s: s.sample_id)
        tokenized = [tokenize_sample(s, block_scorer.tokenizer, cfg.data.max_length)
                     for s in chosen[: cfg.fidelity.n_samples]]
        fid = first_order_fidelity(block_scorer.scorer, block_scorer.directions[cfg.fidelity.direction],
                                   cfg.fidelity.direction, tokenized, block_scorer.pad_id, cfg.fidelity)
        (store.dir / "fidelity.json").write_text(json.dumps(fid, indent=2))
        run_info["fidelity"] = fid["summary"]
    (store.dir / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
