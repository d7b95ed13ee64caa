"""``sqsd-ray score``: corpus -> tokenised rows -> ``BlockScorer`` -> Parquet parts -> scores.parquet + summary.

The same ``BlockScorer`` (model, both init-state adapters, both directions, the batched kernel) runs either
in this process or as the actor class of a Ray Data actor pool (``scoring.ray_pool``); both paths write parts
through ``ScoreStore``, so output, resume and fingerprints are the same. The run directory holds:

    scores.parquet     one row per sample_id; schema metadata carries the fingerprints below
    parts/, manifest.json   the parts as written and the job identity they belong to (resume)
    config.yaml        the resolved config
    run.json           fingerprints, version, timings, throughput, data report, padding fraction, tracking
    tensorboard/       (tracking.backend: tensorboard) samples/s and tokens/s per block, counts at the end
    summary.md         top / bottom samples, score-vs-length correlation
    histogram.png      SQSD and SQSD w/o normalisation, and SQSD against response length
    fidelity.json      (optional) first-order check of Eq. 13, see ``fidelity``
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import __version__
from ..config import ConfigError, stable_hash, to_dict
from ..data.records import DataReport, Sample, load_samples
from ..models.directions import Direction
from ..models.lora import (
    load_adapter_state,
)
from ..tracking import Tracker, TrackingTarget, open_tracker, tracking_run
from .blocks import BlockScorer, load_direction, record_fingerprint, sample_rows, scoring_identity, tokenize_rows
from .job_config import DIRECTION_NAMES, InitStateConfig, ScoreJobConfig
from .store import RunInterrupted, ScoreStore, locked_run

log = logging.getLogger(__name__)


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
    from ..models.loading import load_tokenizer
    from ..models.lora import lora_shapes_without_weights

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
        from .ray_pool import ray_resources

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
    with locked_run(cfg.output.dir, break_lock=cfg.output.break_lock), _sigterm_as_interrupt(), \
            contextlib.ExitStack() as tracking_stack:
        job = preflight(cfg)
        store = ScoreStore(cfg.output.dir)
        plan = store.begin(job.identity, job.records, overwrite=cfg.output.overwrite, resume=cfg.output.resume)
        (store.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        rows = [r for r in sample_rows(job.samples) if r["sample_id"] not in plan.done]
        log.info("%d samples to score (%d kept from an earlier run, %d changed since, %d removed from the corpus)",
                 len(rows), len(plan.done), plan.changed, plan.removed)
        # in the directory the run writes (a staged overwrite's too), so its files move with it when published
        tracking = tracking_stack.enter_context(tracking_run(
            cfg.tracking, store.dir, params={k: v for k, v in to_dict(cfg).items() if k != "tracking"}))
        tracker = tracking_stack.enter_context(open_tracker(tracking))
        parts = _TrackedParts(store, tracker, kept=len(plan.done))
        block_scorer = None
        score_started = time.time()
        try:
            if rows and cfg.ray.enabled:
                from .ray_pool import score_with_ray

                score_with_ray(cfg, parts, rows)  # type: ignore[arg-type]  (it only writes parts)
            elif rows:
                block_scorer = _score_in_process(cfg, parts, rows)  # type: ignore[arg-type]
        except KeyboardInterrupt:
            kept = len(store.done_ids())
            raise RunInterrupted(f"interrupted: {kept} of {len(job.samples)} samples kept in {store.dir}; rerun the "
                                 "same command to resume") from None
        score_seconds = time.time() - score_started
        _finish_run(cfg, store, job, plan, block_scorer, len(rows), started, score_seconds, parts, tracking)
        tracking_stack.close()  # event files complete, the MLflow run finished, before a staged run is swapped in
        return store.publish() / "scores.parquet"


class _TrackedParts:
    """The store as the scoring paths see it (they only write parts): each part is also counted, and the run's
    rate so far goes to the tracker, at the step of the samples done (kept ones included, so a resumed run's curve
    goes on where the interrupted one stopped)."""

    def __init__(self, store: ScoreStore, tracker: Tracker, kept: int) -> None:
        self.store, self.tracker, self.kept = store, tracker, kept
        self.samples = self.tokens = 0
        self.started = time.time()

    def write_part(self, df):
        path = self.store.write_part(df)
        self.samples += len(df)
        self.tokens += int(df["n_tokens"].fillna(0).sum()) if "n_tokens" in df else 0  # skipped rows have none
        seconds = max(time.time() - self.started, 1e-9)
        self.tracker.log_metrics({"score/samples_per_s": self.samples / seconds,
                                  "score/tokens_per_s": self.tokens / seconds,
                                  "score/samples_scored": self.samples}, step=self.kept + self.samples)
        return path


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
                started: float, score_seconds: float, parts: _TrackedParts,
                tracking: TrackingTarget | None) -> None:
    """Consolidate the parts into scores.parquet and write summary.md, histogram.png, fidelity.json, run.json;
    the run's throughput and counts go to the tracker too."""
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
        "tokens_scored_this_run": parts.tokens,
        "tokens_per_s": round(parts.tokens / score_seconds, 3) if parts.tokens and score_seconds > 0 else None,
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
        from ..data.tokenize import tokenize_sample
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
    if tracking is not None:  # where it will be once a staged overwrite is swapped in
        run_info["tracking"] = tracking.moved(store.dir, store.final_dir).to_dict()
    (store.dir / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
    counts = {"samples_per_s": run_info["samples_per_s"], "tokens_per_s": run_info["tokens_per_s"],
              "rows": run_info["n_rows"], "samples_scored_this_run": n_scored_now,
              "padding_fraction": run_info.get("padding_fraction"),
              **{f"status/{k}": v for k, v in run_info["status_counts"].items()}}
    parts.tracker.log_metrics({f"score/{k}": v for k, v in counts.items() if v is not None},
                              step=parts.kept + parts.samples)
