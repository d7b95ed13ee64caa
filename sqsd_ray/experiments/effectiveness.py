"""``sqsd-ray experiment``: does the ranking predict the harm? (paper §5.3, App. F, G, I; Tables 1–3, Fig. 6)

One DAG serves the four experiments; they differ in their *arms* and in the title of the report:

    score (optional) -> per arm: partition S1…Sn -> n fine-tunes -> evaluate every fine-tuned model -> report

* effectiveness (Table 1): arms = scoring methods / danger directions, each its own score file or column, and
  ``column: random`` (a seeded random ranking) as the chance row;
* transfer (Table 2): score under config A, fine-tune under config B: arms override the fine-tune's model,
  method (LoRA -> full) or scale through ``train_overrides``;
* ablation (Table 3): arms = columns of one score file (``sqsd``, ``sqsd_raw`` = w/o norm, ``danger_proj`` =
  danger only, ``neg_safety_proj`` = safety only) or a score file made at an insensitive init state;
* lr-sweep (App. F, Fig. 6): arms override ``train.lr``.

The report (``report.md``, ``table.csv``, ``results.parquet``, ``bands.png``) has one row per arm: the metric
per band S1…Sn, Δ = S1 − Sn and Mono (✓ when the metric does not increase from S1 to Sn, the paper's
criterion for ASR). Every fine-tune resumes or is skipped when already finished, so a re-run only redoes what
is missing.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..config import ConfigError, apply_overrides, from_dict, help_field, to_dict
from ..data.records import DataConfig
from ..evaluation.generate import EvalSettings, GenerationSettings, check_generation
from ..evaluation.job import EvalJobConfig, EvalWorkers, run_evaluate
from ..evaluation.judges import JudgeSettings
from ..scoring.job import run_score
from ..scoring.job_config import ScoreJobConfig
from ..tracking import Tracker, TrackingConfig, TrackingTarget, child_tracking, open_tracker, tracking_run
from ..training.checkpoint import ADAPTER_DIR, MODEL_DIR
from ..training.config import TrainJobConfig, TrainOutput
from ..training.loop import run_training
from .partition import PartitionConfig, PartitionSettings, band_paths, run_partition

log = logging.getLogger(__name__)

DERIVED_COLUMNS = {"neg_safety_proj": ("safety_proj", -1.0)}  # "safety only": risk = −safety projection
RANDOM_COLUMN = "random"  # a seeded random ranking (partition.seed) of the arm's score file: the chance baseline


@dataclass
class Arm:
    name: str = help_field("", help="row label in the report, e.g. 'SQSD (Beaver)', 'w/o norm', 'lr=1e-5'")
    scores: str | None = help_field(None, help="score file of this arm; default the experiment's")
    column: str = help_field(
        "sqsd", help="score column to rank by (neg_safety_proj = −safety_proj; random = a seeded random ranking of "
        "the same samples, the chance row)"
    )
    higher_is_riskier: bool = help_field(True, help="rank descending")
    train_overrides: list[str] = help_field(
        [], help="--set style overrides of the fine-tune for this arm, e.g. ['train.lr=1e-5'], "
        "['train.method=full', 'train.lr=5e-6'], ['model.name_or_path=Qwen/Qwen3-14B']"
    )


@dataclass
class ExperimentEval:
    benchmarks: list[EvalSettings] = help_field([EvalSettings()], help="prompt sets (paper: CatQA by default)")
    judges: dict[str, JudgeSettings] = help_field({"keyword": JudgeSettings()}, help="name -> judge")
    metric: str = help_field("keyword_asr", help="report metric: <judge>_asr or <judge>_safety_score")
    benchmark: str | None = help_field(None, help="benchmark of the report table; default the first")
    include_base: bool = help_field(True, help="evaluate θ0 too, as the reference row")
    workers: EvalWorkers = field(default_factory=EvalWorkers)
    generation: GenerationSettings = help_field(
        default_factory=GenerationSettings, help="engine (hf | vllm) and sampling of the responses",
        identity_if_set=True,
    )


@dataclass
class ExperimentConfig:
    kind: Literal["effectiveness", "transfer", "ablation", "lr-sweep"] = help_field(
        "effectiveness", help="which paper table the report reproduces (the DAG is the same)"
    )
    score: ScoreJobConfig | None = help_field(None, help="score the corpus first (resumes; output = scores)")
    scores: str = help_field("", help="default score file of the arms (set automatically when score is given)")
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionSettings = field(default_factory=lambda: PartitionSettings(subset_size=1000))
    finetune: TrainJobConfig = field(default_factory=TrainJobConfig)
    arms: list[Arm] = help_field([Arm(name="SQSD")], help="rows of the table (see the module doc)")
    evaluation: ExperimentEval = field(default_factory=ExperimentEval)
    max_concurrent_finetunes: int = help_field(
        1, help="fine-tunes run at the same time (each a Ray Train run; as many as the cluster has room for)"
    )
    output_dir: str = help_field("runs/experiment", help="run directory")
    tracking: TrackingConfig = help_field(
        default_factory=TrackingConfig, help="TensorBoard / MLflow: each band's safety metrics per arm, and every "
        "fine-tune's (and the score run's) curves under this run, unless finetune.tracking / score.tracking name "
        "their own"
    )

    def __post_init__(self) -> None:
        if not self.arms:
            raise ConfigError("arms: at least one arm")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"arms need distinct, non-empty names, got {names}")
        if self.max_concurrent_finetunes < 1:
            raise ConfigError("max_concurrent_finetunes must be >= 1")
        # before the fine-tunes, not hours later at their evaluation
        check_generation(self.evaluation.generation, self.finetune.model, self.evaluation.workers.use_ray,
                         "evaluation.workers")


def arm_dir_name(arm_name: str) -> str:
    """The arm's folder under the experiment's output: its name with every character but letters, digits and ``-_.``
    made ``_`` and outer ``_`` stripped (``arm`` if nothing is left)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in arm_name).strip("_") or "arm"


def with_random_ranking(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The scored samples (status ok) with a seeded uniform ``random`` column: the chance ranking."""
    frame = frame[frame["status"] == "ok"].copy() if "status" in frame else frame.copy()
    frame[RANDOM_COLUMN] = np.random.default_rng(seed).random(len(frame))
    return frame


def score_column(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column of a score table, or a derived one (``DERIVED_COLUMNS``, e.g. neg_safety_proj = −safety_proj)."""
    if column in DERIVED_COLUMNS:
        source, sign = DERIVED_COLUMNS[column]
        return sign * frame[source]
    return frame[column]


def arm_scores(cfg: ExperimentConfig, arm: Arm, out: Path) -> tuple[str, str]:
    """(score file, column) for partitioning, writing a derived column (e.g. −safety_proj) when asked."""
    path = arm.scores or cfg.scores
    if not path:
        raise ConfigError(f"arm {arm.name!r}: no score file (set scores, arm.scores or score)")
    if arm.column not in DERIVED_COLUMNS and arm.column != RANDOM_COLUMN:
        return path, arm.column
    frame = pd.read_parquet(path)
    if arm.column == RANDOM_COLUMN:  # the chance row: a seeded random ranking of the same scored samples
        frame = with_random_ranking(frame, cfg.partition.seed)
    else:
        frame[arm.column] = score_column(frame, arm.column)
    derived = out / f"scores_{arm.column}.parquet"
    frame.to_parquet(derived, index=False)
    return str(derived), arm.column


def _finetune_jobs(cfg: ExperimentConfig, out: Path,
                   tracking: TrackingTarget | None = None) -> dict[tuple[str, str], TrainJobConfig]:
    jobs = {}
    for arm in cfg.arms:
        arm_dir = out / arm_dir_name(arm.name)
        scores, column = arm_scores(cfg, arm, out)
        settings = replace(cfg.partition, column=column, higher_is_riskier=arm.higher_is_riskier)
        run_partition(PartitionConfig(scores=scores, data=cfg.data, partition=settings,
                                      output_dir=str(arm_dir / "partition")))
        base = apply_overrides(to_dict(cfg.finetune), arm.train_overrides, TrainJobConfig)
        for band, path in band_paths(arm_dir / "partition").items():
            job = from_dict(TrainJobConfig, base)
            job = replace(job, data=replace(job.data, path=str(path), format="jsonl", schema="messages", preset=None,
                                            keep_if={}, limit=None, field_map={}),
                          output=TrainOutput(dir=str(arm_dir / band), overwrite=False, resume=True,
                                             storage_path=job.output.storage_below(arm_dir_name(arm.name), band)),
                          tracking=child_tracking(job.tracking, tracking, f"{arm_dir_name(arm.name)}/{band}"))
            jobs[(arm.name, band)] = job
    return jobs


def final_state(run_dir: Path, method: str) -> str:
    """The state a finished fine-tune leaves for evaluation: its final LoRA adapter, or its full model."""
    from ..training.loop import load_run

    final = load_run(run_dir).final
    return str(final / (ADAPTER_DIR if method == "lora" else MODEL_DIR))


def run_experiment(cfg: ExperimentConfig) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    params = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
    with tracking_run(cfg.tracking, out, params) as tracking, open_tracker(tracking) as tracker:
        return _run_experiment(cfg, out, tracking, tracker)


def _run_experiment(cfg: ExperimentConfig, out: Path, tracking: TrackingTarget | None, tracker: Tracker) -> Path:
    if cfg.score is not None:
        score = replace(cfg.score, tracking=child_tracking(cfg.score.tracking, tracking, "score"))
        cfg = replace(cfg, scores=str(run_score(score)), data=cfg.score.data)
    jobs = _finetune_jobs(cfg, out, tracking)
    log.info("experiment %s: %d arms x %d bands = %d fine-tunes", cfg.kind, len(cfg.arms), cfg.partition.n_bands,
             len(jobs))
    concurrent = cfg.max_concurrent_finetunes
    if concurrent > 1 and not all(job.scaling.use_ray for job in jobs.values()):
        # in-process runs share this process's torch RNG, thread count and process group
        log.warning("max_concurrent_finetunes=%d needs finetune.scaling.use_ray; running them one at a time",
                    concurrent)
        concurrent = 1
    if concurrent > 1:
        from ..runtime import init_ray

        init_ray(next(iter(jobs.values())).scaling)  # once, before the threads (each would race to start it)
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        runs = dict(zip(jobs, pool.map(run_training, jobs.values())))
    states = {f"{arm}/{band}": final_state(run.dir, jobs[(arm, band)].train.method)
              for (arm, band), run in runs.items()}
    if cfg.evaluation.include_base:
        states = {"base": "base", **states}
    bases = {json.dumps([to_dict(job.model), to_dict(job.lora)], sort_keys=True) for job in jobs.values()}
    if len(bases) > 1 or any(job.train.method == "full" for job in jobs.values()):
        # adapters of another base model, or whole models: one evaluation per arm, on its own base
        eval_dirs = _evaluate_per_arm(cfg, jobs, states, out)
    else:
        eval_dirs = [run_evaluate(eval_job(cfg.evaluation, next(iter(jobs.values())), states, out / "evaluation"))]
    metrics = pd.concat([pd.read_csv(d / "metrics.csv") for d in eval_dirs], ignore_index=True)
    log_band_metrics(tracker, cfg, metrics)
    return write_report(cfg, metrics, out)


def eval_job(evaluation: ExperimentEval, job: TrainJobConfig, states: dict[str, str], out: Path) -> EvalJobConfig:
    """The evaluation of an experiment's states (name -> "base" or a state dir) on the fine-tunes' model."""
    return EvalJobConfig(model=job.model, lora=job.lora, states=states, benchmarks=evaluation.benchmarks,
                         judges=evaluation.judges, workers=evaluation.workers, generation=evaluation.generation,
                         output_dir=str(out))


def _evaluate_per_arm(cfg, jobs, states, out) -> list[Path]:
    dirs = []
    for arm in cfg.arms:
        job = next(j for (a, _), j in jobs.items() if a == arm.name)
        arm_states = {k: v for k, v in states.items() if k.startswith(f"{arm.name}/")}
        if cfg.evaluation.include_base:
            arm_states = {f"{arm.name}/base": "base", **arm_states}
        arm_eval_dir = out / arm_dir_name(arm.name) / "evaluation"
        dirs.append(run_evaluate(eval_job(cfg.evaluation, job, arm_states, arm_eval_dir)))
    return dirs


TITLES = {
    "effectiveness": "Effectiveness (Table 1): the metric on each risk band, S1 = riskiest",
    "transfer": "Transferability (Table 2): ranked under the scoring config, fine-tuned under another",
    "ablation": "Ablations (Table 3)",
    "lr-sweep": "Learning-rate sensitivity (App. F, Fig. 6)",
}


def band_table(cfg: ExperimentConfig, metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: metric per band, Δ = S1 − Sn, Mono (non-increasing from S1 to Sn)."""
    metric = cfg.evaluation.metric
    if metric not in metrics.columns:
        raise ConfigError(f"evaluation.metric {metric!r} is not measured; available: "
                          f"{[c for c in metrics.columns if c not in ('state', 'benchmark', 'n')]}")
    benchmark = cfg.evaluation.benchmark or cfg.evaluation.benchmarks[0].label
    rows = metrics[metrics["benchmark"] == benchmark]
    bands = [f"S{i + 1}" for i in range(cfg.partition.n_bands)]
    table = []
    for arm in cfg.arms:
        values = []
        for band in bands:
            hit = rows[rows["state"] == f"{arm.name}/{band}"]
            values.append(float(hit[metric].iloc[0]) if len(hit) else float("nan"))
        # ASR should fall from S1 to Sn; a safety score should rise
        higher_is_worse = not metric.endswith("safety_score")
        steps = np.diff(values)
        mono = bool(np.all(steps <= 1e-9) if higher_is_worse else np.all(steps >= -1e-9))
        complete = bool(np.all(np.isfinite(values)))  # a missing band leaves Mono undecided, not ✗
        table.append({"arm": arm.name, **dict(zip(bands, values)), "delta": values[0] - values[-1],
                      "mono": ("✓" if mono else "✗") if complete else "n/a"})
    base = rows[rows["state"].str.endswith("base")]
    frame = pd.DataFrame(table)
    frame.attrs["base"] = float(base[metric].iloc[0]) if len(base) else None
    frame.attrs["benchmark"], frame.attrs["metric"] = benchmark, metric
    return frame


def log_band_metrics(tracker: Tracker, cfg: ExperimentConfig, metrics: pd.DataFrame) -> None:
    """Every measured metric of every arm's bands, as ``<benchmark>/<metric>/<arm>`` at step = the band's number
    (S1 = 1), so each arm is one curve from the riskiest band to the safest; θ0 at step 0."""
    values = [c for c in metrics.columns if c not in ("state", "benchmark", "n")
              and pd.api.types.is_numeric_dtype(metrics[c])]
    for arm in cfg.arms:
        key = arm_dir_name(arm.name)
        for band in range(cfg.partition.n_bands + 1):
            states = ("base", f"{arm.name}/base") if band == 0 else (f"{arm.name}/S{band}",)
            rows = metrics[metrics["state"].isin(states)].to_dict("records")
            tracker.log_metrics({f"{row['benchmark']}/{column}/{key}": float(row[column])
                                 for row in rows for column in values if pd.notna(row[column])}, step=band)


def write_report(cfg: ExperimentConfig, metrics: pd.DataFrame, out: Path) -> Path:
    table = band_table(cfg, metrics)
    metrics.to_parquet(out / "results.parquet", index=False)
    table.to_csv(out / "table.csv", index=False)
    bands = [c for c in table.columns if c.startswith("S")]
    metric, benchmark, base = table.attrs["metric"], table.attrs["benchmark"], table.attrs["base"]
    lines = [f"# {TITLES[cfg.kind]}", "",
             f"Metric: `{metric}` on {benchmark}; {cfg.partition.n_bands} bands of "
             f"{cfg.partition.subset_size or 'all'} samples ranked by each arm's score. Δ = S1 − S{len(bands)}; "
             f"Mono ✓ when the metric never rises (ASR) or never falls (Safety Score) from S1 to S{len(bands)}.", ""]
    if base is not None:
        lines += [f"Before fine-tuning (θ0): {base:.2f}", ""]
    lines += ["| arm | " + " | ".join(bands) + " | Δ | Mono |", "|---" * (len(bands) + 3) + "|"]
    for _, row in table.iterrows():
        lines.append(f"| {row['arm']} | " + " | ".join(f"{row[b]:.2f}" for b in bands)
                     + f" | {row['delta']:+.2f} | {row['mono']} |")
    lines += ["", "![metric per band](bands.png)", "",
              "Raw numbers: `table.csv` (this table), `results.parquet` (every state, benchmark and judge), "
              "`evaluation/responses.parquet` (every answer and verdict)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot_bands(table, bands, metric, benchmark, base, out / "bands.png")
    log.info("report: %s", out / "report.md")
    return out


def _plot_bands(table: pd.DataFrame, bands: list[str], metric: str, benchmark: str, base, path: Path) -> None:
    from ..scoring.summary import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (_, row) in enumerate(table.iterrows()):  # the first arm (the method under test) drawn on top
        style = dict(lw=2.8, zorder=3) if i == 0 else dict(lw=1.2, alpha=0.75, zorder=2)
        ax.plot(bands, [row[b] for b in bands], marker="o", label=f"{row['arm']} (Δ {row['delta']:+.1f})", **style)
    if base is not None:
        ax.axhline(base, color="grey", ls=":", label="θ0 (before fine-tuning)")
    ax.set_xlabel("risk band (S1 = highest ranked risk)")
    ax.set_ylabel(f"{metric} on {benchmark}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Arm", "ExperimentConfig", "ExperimentEval", "arm_dir_name", "arm_scores", "band_table", "eval_job",
           "final_state", "log_band_metrics", "run_experiment", "write_report"]
