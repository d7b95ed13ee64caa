"""One block of tokenised rows -> one Parquet part: the unit of work of ``sqsd-ray score``.

``BlockScorer`` holds the model, both init-state adapters, both directions and the batched kernel
(``scoring.scorer``). The driver runs it in its own process (``scoring.job``) or Ray Data runs it as the
actor class of a pool (``scoring.ray_pool``); both paths write parts through ``ScoreStore``, so outputs,
resume and fingerprints are the same.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..config import ConfigError, identity_dict, stable_hash
from ..data.records import DataConfig, DataReport, Sample, content_id
from ..data.tokenize import collate, length_sorted_batches, tokenize_samples
from ..models.directions import Direction, init_state_from_direction
from ..models.loading import load_model_and_tokenizer, model_fingerprint, model_identity
from ..models.lora import (
    LoraSettings,
    add_adapter,
    apply_lora,
    load_adapter_state,
    lora_module_shapes,
    set_lora_factors,
)
from .compiled import CompiledReduction, decide_compile
from .job_config import DIRECTION_NAMES, InitStateConfig, ScoreJobConfig
from .scorer import InitState, SqsdScorer, plan_passes
from .store import STATUS_SKIPPED

log = logging.getLogger(__name__)


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


CALIBRATION_SAMPLES = 16
CALIBRATION_ROUNDS = 2


@dataclass(frozen=True)
class LayoutCandidate:
    """A batch layout: at most ``max_batch_size`` samples and ``max_tokens`` padded tokens per batch."""

    max_batch_size: int
    max_tokens: int

    @property
    def label(self) -> str:
        tokens = "" if self.max_tokens >= 1 << 30 else f", tokens ≤ {self.max_tokens}"
        return f"bs ≤ {self.max_batch_size}{tokens}"


def candidate_layouts(device, max_length: int) -> list[LayoutCandidate]:
    """The layouts ``batching.layout: auto`` times (bench/kernel.py (d)): on CPU batch sizes 1, 4, 8 and a budget
    of 2 × max_length padded tokens; on CUDA 4, 8 and 16 (the fixed default) under the 8192-token budget. None is
    larger than ``CALIBRATION_SAMPLES``, which a larger one would batch like the largest below it."""
    if device.type == "cuda":
        return [LayoutCandidate(bs, 8192) for bs in (4, 8, 16)]
    return [LayoutCandidate(1, 1 << 30), LayoutCandidate(4, 1 << 30), LayoutCandidate(8, 1 << 30),
            LayoutCandidate(CALIBRATION_SAMPLES, 2 * max_length)]


def calibrate_layout(score, samples, device, max_length: int):
    """Time every candidate layout on the same samples and return (the fastest, its outputs, a report).

    ``score(samples, indices)`` scores one batch. The samples timed are the ``CALIBRATION_SAMPLES`` nearest the
    median length of ``samples``, so a candidate pads them about as much as it pads the length-sorted batches of a
    whole block. Untimed warm-up batches come first (first calls allocate, and compile with ``scoring.compile``);
    candidates that batch these samples alike are timed once.
    """
    by_length = sorted(range(len(samples)), key=lambda i: (len(samples[i].input_ids), i))
    middle = max(0, len(samples) // 2 - CALIBRATION_SAMPLES // 2)
    chosen = [samples[i] for i in by_length[middle:middle + CALIBRATION_SAMPLES]]
    # untimed warm-up: a batch of one and one of two, as a compiled reduction has a graph for each
    for warm in ([0], [0, 1])[:len(chosen)]:
        score(chosen, warm)
    candidates = candidate_layouts(device, max_length)
    batchings: dict[str, list[list[int]]] = {}
    for candidate in candidates:
        batches = length_sorted_batches(chosen, candidate.max_batch_size, candidate.max_tokens)
        if not any(b == batches for b in batchings.values()):  # e.g. bs 8 and a budget that batch these alike
            batchings[candidate.label] = batches
    # CALIBRATION_ROUNDS rounds in rotated order, each candidate's fastest round: a one-off stall on a shared
    # machine (seen: 15x on one round) must not decide the layout
    names = list(batchings)
    timings: dict[str, float] = {}
    outputs: dict[str, list] = {}
    for r in range(CALIBRATION_ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            scored = [score(chosen, indices) for indices in batchings[name]]
            timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - started)
            outputs.setdefault(name, scored)
    best = min(timings, key=timings.get)
    lengths = [len(s.input_ids) for s in chosen]
    report = {"chosen": best, "seconds": {k: round(v, 4) for k, v in timings.items()}, "samples": len(chosen),
              "tokens": [min(lengths), max(lengths)], "device": str(device)}
    log.info("batching.layout auto: %s (%s on %d samples of %d-%d tokens)", best,
             ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()), len(chosen), min(lengths), max(lengths))
    return next(c for c in candidates if c.label == best), outputs[best], report


def build_scorer(base_model, cfg: ScoreJobConfig, directions: dict[str, Direction], per_module: bool = False):
    """Peft model with one adapter per init state, directions checked against the model, and the scorer (its
    reduction compiled or not per ``cfg.scoring.compile``)."""
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
    decision = decide_compile(cfg.scoring.compile, next(base_model.parameters()).device)
    reduction = CompiledReduction(decision) if decision.compiled else None
    scorer = SqsdScorer(peft_model, passes, per_module=per_module, reduction=reduction, compile_decision=decision)
    return scorer, states


def scoring_identity(cfg: ScoreJobConfig, directions: dict[str, Direction]) -> dict:
    """What a score file depends on (resume refuses on any difference): not batching, resources or paths out."""
    if cfg.method != "sqsd":
        from ..baselines.job import baseline_identity

        return {"sqsd_ray_version": __version__, "method": cfg.method,
                "config": {"model": identity_dict(cfg.model), "lora": identity_dict(cfg.lora),
                           "data": identity_dict(cfg.data), "baseline": identity_dict(cfg.baseline)},
                "model": model_identity(cfg.model), **baseline_identity(cfg)}
    return {
        "sqsd_ray_version": __version__,
        "config": {
            "model": identity_dict(cfg.model), "lora": identity_dict(cfg.lora), "data": identity_dict(cfg.data),
            "init_states": identity_dict(cfg.init_states), "per_module": cfg.output.per_module,
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
    kernel ready. A call sorts its rows by length into micro-batches of the batch layout (``batching.layout``:
    fixed, or chosen by timing on the first block large enough) and returns one row of scalars per sample (never gradients), plus a row with status ``skipped`` for samples
    tokenisation dropped.
    """

    def __init__(self, cfg: ScoreJobConfig):
        self.cfg = cfg
        self.device, batch_size, max_tokens = cfg.batching.resolve()
        # the layout: fixed (set sizes, or the device's defaults), or chosen by timing on the first block (None
        # until then)
        self.fixed_layout = LayoutCandidate(batch_size, max_tokens)
        self.layout = None if cfg.batching.calibrates else self.fixed_layout
        if cfg.method == "reward_model":  # scores text with its own model: the policy is only a tokenizer here
            from ..baselines.job import build_baseline_scorer
            from ..models.loading import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.model)
            self.weights_fingerprint = f"reward model {cfg.baseline.reward_model}"
            self.directions, self.states = {}, {}
            self.scorer = build_baseline_scorer(None, self.tokenizer, cfg, self.device)
            self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            self.calls = 0
            self.layout = self.fixed_layout  # it batches the texts itself (judge.batch_size): nothing to calibrate
            return
        model, self.tokenizer = load_model_and_tokenizer(cfg.model)
        model.to(self.device)
        self.weights_fingerprint = model_fingerprint(model, cfg.model)
        if cfg.method != "sqsd":
            from ..baselines.job import build_baseline_scorer

            self.directions, self.states = {}, {}
            self.scorer = build_baseline_scorer(model, self.tokenizer, cfg, self.device)
        else:
            self.directions = {d: load_direction(getattr(cfg.directions, d), d) for d in DIRECTION_NAMES}
            self.scorer, self.states = build_scorer(model, cfg, self.directions, per_module=cfg.output.per_module)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.calls = 0

    def _score(self, samples, indices: list[int], texts: dict):
        """One padded batch of ``samples[indices]`` through the scorer: a frame of per-sample scalars."""
        import pandas as pd

        batch = collate([samples[i] for i in indices], self.pad_id, padding_side=self.cfg.batching.padding_side)
        if texts:
            batch["texts"] = [texts[sid] for sid in batch["sample_ids"]]
        scored = pd.DataFrame(self.scorer.score_batch(batch))
        scored["padded_length"] = int(batch["input_ids"].shape[1])
        return scored

    def kernel_label(self) -> str:
        """'compiled (why)' or 'eager (why)': the reduction the last batch ran (a failed compile falls back)."""
        reduction = self.scorer.reduction
        compiled = reduction is not None and reduction.active
        return f"{'compiled' if compiled else 'eager'} ({self.scorer.compile_decision.reason})"

    def __call__(self, block):
        import pandas as pd

        from ..data.tokenize import TokenizedSample

        started = time.perf_counter()
        self.calls += 1
        kept = block[block["skip_reason"] == ""]
        skipped = block[block["skip_reason"] != ""]
        samples = samples_all = [
            TokenizedSample(sid, [int(i) for i in ids], [int(v) for v in labels], int(n_prompt),
                            sum(1 for v in labels if v != -100), bool(trunc))
            for sid, ids, labels, n_prompt, trunc in zip(
                kept["sample_id"], kept["input_ids"], kept["labels"], kept["n_prompt_tokens"], kept["truncated"]
            )
        ]
        texts = dict(zip(kept["sample_id"], zip(kept["prompt_text"], kept["response_text"]))) \
            if "prompt_text" in kept else {}
        frames, calibration = [], None
        # batching.layout: auto, on the first block with enough samples to tell the candidates apart (a smaller
        # one, e.g. the rest of a resumed run, is scored with the fixed layout and the choice waits)
        if self.layout is None and len(samples) >= CALIBRATION_SAMPLES:
            self.layout, frames, calibration = calibrate_layout(
                lambda chosen, indices: self._score(chosen, indices, texts), samples, self.device,
                self.cfg.data.max_length)
            done = {sid for frame in frames for sid in frame["sample_id"]}
            samples = [s for s in samples if s.sample_id not in done]
        layout = self.layout or self.fixed_layout
        for indices in length_sorted_batches(samples, max_batch_size=layout.max_batch_size,
                                             max_tokens=layout.max_tokens):
            frames.append(self._score(samples, indices, texts))
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if len(out):
            by_id = {s.sample_id: s for s in samples_all}
            out["n_prompt_tokens"] = [by_id[s].n_prompt_tokens for s in out["sample_id"]]
            out["truncated"] = [by_id[s].truncated for s in out["sample_id"]]
            out["skip_reason"] = ""
        if len(skipped):
            out = pd.concat([out, pd.DataFrame({"sample_id": skipped["sample_id"], "status": STATUS_SKIPPED,
                                                "skip_reason": skipped["skip_reason"]})], ignore_index=True)
            # keep every column one Arrow type: skipped rows have no scores (NaN) and were not truncated
            out["truncated"] = out["truncated"].fillna(False).astype(bool) if "truncated" in out else False
        out["model_weights"] = self.weights_fingerprint
        out["batch_layout"] = (self.layout or self.fixed_layout).label
        # in every block (empty where none), so every block has one schema whichever block calibrated
        out["layout_calibration"] = json.dumps(calibration) if calibration is not None else ""
        if isinstance(self.scorer, SqsdScorer):  # which reduction ran: run.json counts the rows per kernel
            out["kernel"] = self.kernel_label()
        out["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        elapsed = time.perf_counter() - started
        n_tokens = int(out["n_tokens"].sum()) if "n_tokens" in out else 0
        log.info("scored block %d: %d samples (%d skipped) in %.2f s, %.0f tokens/s", self.calls, len(kept),
                 len(skipped), elapsed, n_tokens / max(elapsed, 1e-9))
        return out
