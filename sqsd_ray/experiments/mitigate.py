"""``sqsd-ray experiment mitigate``: act on the scores and verify with the same evaluation.

For each corpus (the riskiest band S1 of a score file, and the whole corpus), fine-tune it in every way the
product offers and measure each result the same way::

    plain            fine-tune on the corpus as it is
    curated          drop the top-q% by the score (``sqsd-ray curate``), then fine-tune
    curated_random   drop q% at random (the chance row of curation)
    curated_longest  drop the q% longest responses (scores correlate with length, App. H: is curation more?)
    curated_by_<c>   drop the top-q% by another score column c (``curate_also_by``: e.g. the danger or safety term
                     alone, or SQSD without normalisation): which part of the score finds the eroding samples
    spf              fine-tune with train.spf (docs/spf.md)
    curated_spf      both
    restore_first_order / restore_curvature
                     restore the plain fine-tune after the fact (docs/restoration.md), first-order ascent or
                     preconditioned by the damped task curvature

Safety: the experiment's judges on harmful prompts (ASR), and the refusal NLL on held-out harmful requests
answered with refusals (its rise over θ0 is the degradation). Utility: held-out task NLL and ROUGE-1/L of
greedy answers against the task's reference responses. One table (``table.csv``, ``report.md``) and a
safety–utility scatter (``mitigate.png``).

One fine-tune's rise carries run-to-run noise of its own (its seed: data order, LoRA init): with
``replicates: N`` every row is fine-tuned N times (seeds train.seed + i; the random curation draws anew), the table
gives each row's mean and spread, and curation by the score is compared with each rival rule run by run
(``curation_contrasts.csv``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ..config import ConfigError, RunOutput, help_field, to_dict
from ..data.records import DataConfig, load_samples
from ..evaluation.generate import EvalPrompt, check_generation, generate_responses
from ..evaluation.job import run_evaluate
from ..mitigation.curate import CurateConfig, CurateOutput, run_curate
from ..mitigation.restore import RestoreSettings, compare_at_equal_task_increase, recovery_path
from ..mitigation.restore_job import FineTuned, RestoreConfig, load_batches, run_restore
from ..models.loading import ModelConfig, load_model_and_tokenizer
from ..models.lora import LoraSettings, apply_lora, load_adapter_state, set_lora_factors
from ..scoring.summary import markdown_table, save_figure
from ..tracking import Tracker, TrackingConfig, TrackingTarget, child_tracking, open_tracker, tracking_run
from ..training.checkpoint import ADAPTER_DIR
from ..training.config import TrainJobConfig, TrainOutput
from ..training.loop import run_training
from ..training.objectives import token_mean_nll
from ..training.spf import SpfSettings
from .effectiveness import DERIVED_COLUMNS, ExperimentEval, eval_job, final_state, score_column, with_random_ranking
from .partition import PartitionConfig, PartitionSettings, band_paths, run_partition

log = logging.getLogger(__name__)

METHODS = ("plain", "curated", "curated_random", "curated_longest", "spf", "curated_spf", "restore_first_order",
           "restore_curvature")
CURATIONS = {"curated": "score", "curated_random": "random", "curated_longest": "longest", "curated_spf": "score"}
BY_RULE = "by_"  # curation rule "by_<column>": the top-q% by a curate_also_by column
CURATED_BY_PREFIX = f"curated_{BY_RULE}"  # its row: "curated_by_<column>"
LENGTH_COLUMN = "n_response_tokens"
NLL_DIGITS = {"refusal_nll": 3, "refusal_nll_rise": 3, "refusal_nll_rise_sd": 3, "task_nll": 3,
              "task_nll_vs_plain": 3, "rouge1": 3, "rougeL": 3}  # report digits; the judge's ASR keeps one


@dataclass
class HeldOut:
    """What the fine-tunes are measured on, none of it seen in training."""

    refusal: DataConfig = help_field(
        default_factory=DataConfig, help="harmful requests answered with refusals: refusal NLL (the safety loss)"
    )
    task: DataConfig = help_field(default_factory=DataConfig, help="task data: task NLL and ROUGE of greedy answers")
    rouge_prompts: int = help_field(32, help="task prompts answered greedily for ROUGE (the first N)")
    max_new_tokens: int = help_field(64, help="answer length for ROUGE")
    micro_batch_size: int = help_field(8, help="samples per forward pass for the losses")


@dataclass
class MitigateRestore:
    settings: RestoreSettings = field(default_factory=RestoreSettings)
    harmful: DataConfig = help_field(
        default_factory=DataConfig, help="D_h: harmful prompts + harmful completions (disjoint from held-out sets)"
    )
    refusal_train: DataConfig | None = help_field(
        None, help="D_r for restore.settings.refusal_weight > 0: harmful prompts answered with refusals"
    )
    retain_samples: int = help_field(64, help="D_t: the first N samples of the fine-tuned corpus")


@dataclass
class MitigateConfig:
    scores: str = help_field("", help="scores.parquet of the corpus (SQSD, or any score column)")
    column: str = help_field("sqsd", help="score column that ranks risk (higher = riskier)")
    data: DataConfig = field(default_factory=DataConfig)
    corpora: list[Literal["S1", "all"]] = help_field(["S1", "all"], help="S1 = the riskiest band; all = the corpus")
    partition: PartitionSettings = field(default_factory=lambda: PartitionSettings(sampling="top"))
    curate_fraction: float = help_field(0.2, help="q: the share of each corpus that curation removes")
    methods: list[str] = help_field(list(METHODS), help=f"rows of the table, from {list(METHODS)}")
    finetune: TrainJobConfig = field(default_factory=TrainJobConfig)
    spf: SpfSettings = field(default_factory=lambda: SpfSettings(enabled=True))
    restore: MitigateRestore = field(default_factory=MitigateRestore)
    heldout: HeldOut = field(default_factory=HeldOut)
    evaluation: ExperimentEval = field(default_factory=ExperimentEval)
    whole_corpus_epochs: int | None = help_field(
        None, help="epochs of the whole-corpus fine-tunes (default finetune.train.epochs; the corpus is n_bands "
        "times the size of S1)"
    )
    curate_also_by: list[str] = help_field(
        [], help="more score columns to curate by, each a row curated_by_<column> that removes the top "
        "curate_fraction by it (as `curated` does by `column`), compared with random and longest curation like "
        "`curated`: e.g. sqsd_raw (w/o norm), danger_proj (danger only), neg_safety_proj (safety only: −safety_proj)"
    )
    seed: int = help_field(0, help="seed of the random curation")
    replicates: int = help_field(
        1, help="fine-tunes per row: run i trains with finetune.train.seed + i (its own data order and LoRA init) "
        "and, for curated_random, removes its own random draw (seed + i). table.csv: each row's mean over its runs "
        "with the spread of the refusal-NLL rise; table_runs.csv: every run. Restorations restore the first plain run"
    )
    output_dir: str = help_field("runs/mitigate", help="run directory (fine-tunes resume or are skipped)")
    tracking: TrackingConfig = help_field(
        default_factory=TrackingConfig, help="TensorBoard / MLflow: the table's safety and utility metrics per row, "
        "and every fine-tune's curves under this run, unless finetune.tracking names its own"
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ConfigError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
        if not 0 < self.curate_fraction < 1:
            raise ConfigError(f"curate_fraction must be in (0, 1), got {self.curate_fraction}")
        if not self.corpora:
            raise ConfigError("corpora: at least one of S1, all")
        repeated = sorted({c for c in self.curate_also_by if self.curate_also_by.count(c) > 1})
        if repeated:
            raise ConfigError(f"curate_also_by: {repeated} named twice")
        if self.column in self.curate_also_by:
            raise ConfigError(f"curate_also_by: {self.column!r} is `column` (the `curated` row already curates by "
                              "it)")
        unnamed = [c for c in self.curate_also_by if not c.strip() or "/" in c]
        if unnamed:
            raise ConfigError(f"curate_also_by: {unnamed} are not column names (empty, or with '/', which row and "
                              "state names use)")
        if self.replicates < 1:
            raise ConfigError(f"replicates must be at least 1 (fine-tunes per row), got {self.replicates}")
        if "restore_curvature" in self.methods and self.restore.settings.preconditioner == "none":
            raise ConfigError("restore.settings.preconditioner is the curvature-aware row's: lbfgs, fisher_diag or "
                              "woodbury (restore_first_order is the 'none' row)")
        check_generation(self.evaluation.generation, self.finetune.model, self.evaluation.workers.use_ray,
                         "evaluation.workers")


# ------------------------------------------------------------------------------------------ corpora


def _corpus_data(cfg: MitigateConfig, corpus: str, out: Path) -> tuple[DataConfig, pd.DataFrame]:
    """The corpus to fine-tune (S1 as a partition subset, or the configured data) and its scores."""
    scores = pd.read_parquet(cfg.scores)
    if corpus == "all":
        return cfg.data, scores
    settings = replace(cfg.partition, column=cfg.column, higher_is_riskier=True)
    partition_dir = out / "S1" / "partition"
    run_partition(PartitionConfig(scores=cfg.scores, data=cfg.data, partition=settings, output_dir=str(partition_dir)))
    path = band_paths(partition_dir)["S1"]
    data = DataConfig(path=str(path), format="jsonl", schema="messages", max_length=cfg.data.max_length,
                      system_prompt=cfg.data.system_prompt, on_overlong=cfg.data.on_overlong)
    ids = {s.sample_id for s in load_samples(data)[0]}
    return data, scores[scores["sample_id"].isin(ids)]


def _state_name(corpus: str, method: str, run: int = 0) -> str:
    """The evaluation's name of a fine-tune: "S1/plain", run i ≥ 1 "S1/plain/run<i>"."""
    return f"{corpus}/{method}" + (f"/run{run}" if run else "")


def _run_suffix(run: int) -> str:
    """Run 0 keeps the plain names (a one-run experiment's layout); run i ≥ 1 adds ".run<i>"."""
    return f".run{run}" if run else ""


def _rows(cfg: MitigateConfig) -> list[str]:
    """The table's rows: the configured methods, then a curated_by_<column> row per ``curate_also_by`` column."""
    return [*cfg.methods, *(CURATED_BY_PREFIX + column for column in cfg.curate_also_by)]


def _curation_rule(method: str) -> str | None:
    """How a row's corpus is curated: score / random / longest, by_<column>, or None (not curated)."""
    return method.removeprefix("curated_") if method.startswith(CURATED_BY_PREFIX) else CURATIONS.get(method)


def _check_score_columns(cfg: MitigateConfig) -> None:
    """Every column the experiment ranks by is in the score file: one clear error before the first fine-tune."""
    import pyarrow.parquet as pq

    if not Path(cfg.scores).is_file():
        raise ConfigError(f"scores: no score file at {cfg.scores!r}")
    present = set(pq.read_schema(cfg.scores).names)
    rules = {CURATIONS.get(m) for m in cfg.methods}
    missing = []
    if cfg.column not in present and ("S1" in cfg.corpora or "score" in rules):  # S1's partition reads it as is
        missing.append(f"column: {cfg.column!r}")
    if LENGTH_COLUMN not in present and "longest" in rules:
        missing.append(f"{LENGTH_COLUMN!r} (curated_longest)")
    missing += [f"curate_also_by: {c!r}" for c in cfg.curate_also_by if DERIVED_COLUMNS.get(c, (c,))[0] not in present]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not in {cfg.scores} (columns: {sorted(present)}; derived: "
                          f"{sorted(DERIVED_COLUMNS)})")


def _curated(cfg: MitigateConfig, data: DataConfig, scores: pd.DataFrame, rule: str, out: Path,
             run: int = 0) -> DataConfig:
    """The corpus without its top-q% by score (or by another column: rule by_<column>), a random q% (run i: draw
    seed + i), or its q% longest responses."""
    column = rule.removeprefix(BY_RULE) if rule.startswith(BY_RULE) else {
        "score": cfg.column, "random": "random", "longest": LENGTH_COLUMN}[rule]
    frame = scores[scores["status"] == "ok"].copy() if "status" in scores else scores.copy()
    if rule == "random":
        frame = with_random_ranking(frame, cfg.seed + run)
    if column in DERIVED_COLUMNS:
        frame[column] = score_column(frame, column)
    if column not in frame:
        raise ConfigError(f"curation by {rule} needs column {column!r} in {cfg.scores}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scores_{rule}{_run_suffix(run)}.parquet"
    frame.to_parquet(path, index=False)
    curate_dir = run_curate(CurateConfig(scores=str(path), column=column, data=data, mode="drop_top_fraction",
                                         fraction=cfg.curate_fraction, unread_records="drop",
                                         output=CurateOutput(dir=str(out / f"curate_{rule}{_run_suffix(run)}"),
                                                             overwrite=True)))
    manifest = json.loads((Path(curate_dir) / "manifest.json").read_text())
    return replace(data, path=manifest["corpus"]["output"], format=manifest["corpus"]["output_format"], preset=None,
                   limit=None, keep_if={})


def _finetune(cfg: MitigateConfig, corpus: str, data: DataConfig, spf: bool, out: Path, run: int = 0,
              tracking: TrackingTarget | None = None) -> Path:
    train = replace(cfg.finetune.train, spf=replace(cfg.spf, enabled=True) if spf else SpfSettings(),
                    seed=cfg.finetune.train.seed + run)
    if corpus == "all" and cfg.whole_corpus_epochs:
        train = replace(train, epochs=cfg.whole_corpus_epochs, max_steps=None)
    name = Path(out).resolve().relative_to(Path(cfg.output_dir).resolve()).as_posix()  # e.g. S1/curated.run1
    output = TrainOutput(dir=str(out), overwrite=False, resume=True, storage_path=cfg.finetune.output.storage_below(name))
    job = replace(cfg.finetune, data=data, train=train, output=output,
                  tracking=child_tracking(cfg.finetune.tracking, tracking, name))
    return Path(final_state(run_training(job).dir, job.train.method))


def _restore(cfg: MitigateConfig, data: DataConfig, adapter: Path, preconditioner: str, out: Path) -> Path:
    if cfg.finetune.train.method != "lora":
        fine_tuned = FineTuned(full_model=str(adapter))
    else:
        fine_tuned = FineTuned(adapter=str(adapter))
    settings = replace(cfg.restore.settings, preconditioner=preconditioner)
    job = RestoreConfig(model=cfg.finetune.model, fine_tuned=fine_tuned, harmful=cfg.restore.harmful,
                        retain=replace(data, limit=cfg.restore.retain_samples), refusal=cfg.heldout.refusal,
                        refusal_train=cfg.restore.refusal_train,
                        restore=settings, output=RunOutput(dir=str(out), overwrite=True),
                        # the fine-tunes' placement (a GPU worker on a cluster), one worker: the loop is sequential
                        scaling=replace(cfg.finetune.scaling, num_workers=1))
    return run_restore(job) / ADAPTER_DIR


# ------------------------------------------------------------------------------------------ measuring


ROUGE_TYPES = ("rouge1", "rougeL")  # the table's utility columns, F1 of each


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # Porter stemming on, as in the SPF / shallow-alignment utility evaluation this table is compared with
    # (RougeScorer(["rouge1"], use_stemmer=True)) and in most published ROUGE since ROUGE-1.5.5's -m
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_f1(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F1 of ``candidate`` against ``reference``, by rouge-score (Google's reimplementation of
    ROUGE-1.5.5): lower-cased, split at every character outside [a-z0-9], words longer than three letters
    Porter-stemmed, so "Garden?" matches "gardens". A text without such a word (empty, punctuation only, or a
    non-Latin script, which this tokenizer drops) scores 0 against anything."""
    scores = _rouge_scorer().score(reference, candidate)  # rouge-score's order: (target, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def measure_states(model_cfg: ModelConfig, lora: LoraSettings, states: dict[str, str],
                   heldout: HeldOut) -> pd.DataFrame:
    """Refusal NLL, task NLL and ROUGE per state ("base" or a LoRA adapter dir), in this process: one model load,
    the adapter's factors swapped per state (as ``evaluation.job`` does), θ0 with the adapter off."""
    from contextlib import nullcontext

    model, tokenizer = load_model_and_tokenizer(model_cfg)
    model = apply_lora(model, replace(lora, dropout=0.0)).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    refusal, _ = load_batches(heldout.refusal, tokenizer, "held-out refusal", heldout.micro_batch_size)
    task, _ = load_batches(heldout.task, tokenizer, "held-out task", heldout.micro_batch_size)
    task_samples = load_samples(heldout.task)[0][:heldout.rouge_prompts]
    prompts = [EvalPrompt(prompt_id=s.sample_id, prompt=s.messages[-1]["content"], category="task")
               for s in task_samples]
    rows = []
    for name, state in states.items():
        if state != "base":
            set_lora_factors(model, load_adapter_state(Path(state))[0])
        with model.disable_adapter() if state == "base" else nullcontext():
            answers = generate_responses(model, tokenizer, prompts, max_new_tokens=heldout.max_new_tokens,
                                         system_prompt=heldout.task.system_prompt)
            rouge = [rouge_f1(a, s.response) for a, s in zip(answers, task_samples)]
            rows.append({"state": name, "refusal_nll": token_mean_nll(model, refusal),
                         "task_nll": token_mean_nll(model, task),
                         **{kind: float(np.mean([r[kind] for r in rouge])) for kind in ROUGE_TYPES}})
        log.info("measured %s: %s", name, {k: round(v, 4) for k, v in rows[-1].items() if k != "state"})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ the DAG


def run_mitigate(cfg: MitigateConfig) -> Path:
    if cfg.finetune.train.method != "lora":
        raise ConfigError("experiment mitigate measures LoRA fine-tunes (finetune.train.method: lora); restore a "
                          "full fine-tune with `sqsd-ray restore` (fine_tuned.full_model)")
    _check_score_columns(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    params = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
    with tracking_run(cfg.tracking, out, params) as tracking, open_tracker(tracking) as tracker:
        return _run_mitigate(cfg, out, tracking, tracker)


def _run_mitigate(cfg: MitigateConfig, out: Path, tracking: TrackingTarget | None, tracker: Tracker) -> Path:
    states: dict[str, str] = {}
    for corpus in cfg.corpora:
        corpus_dir = out / corpus
        data, scores = _corpus_data(cfg, corpus, out)
        rules = {_curation_rule(m) for m in _rows(cfg)} - {None}
        curated = {rule: _curated(cfg, data, scores, rule, corpus_dir) for rule in rules}
        for run in range(cfg.replicates):
            if run and "random" in rules:  # only the random rule's removal changes from run to run
                curated["random"] = _curated(cfg, data, scores, "random", corpus_dir, run)
            for method in _rows(cfg):
                if method.startswith("restore_"):
                    continue
                rule = _curation_rule(method)
                source = curated[rule] if rule else data
                states[_state_name(corpus, method, run)] = str(_finetune(
                    cfg, corpus, source, method in ("spf", "curated_spf"), corpus_dir / f"{method}{_run_suffix(run)}",
                    run, tracking))
        if any(m.startswith("restore_") for m in cfg.methods):
            plain = Path(states.get(_state_name(corpus, "plain"))
                         or _finetune(cfg, corpus, data, False, corpus_dir / "plain", tracking=tracking))
        for method, preconditioner in (("restore_first_order", "none"),
                                       ("restore_curvature", cfg.restore.settings.preconditioner)):
            if method in cfg.methods:
                states[_state_name(corpus, method)] = str(_restore(cfg, data, plain, preconditioner,
                                                                   corpus_dir / method))
    all_states = {"base": "base", **states}
    judged = run_evaluate(eval_job(cfg.evaluation, cfg.finetune, all_states, out / "evaluation"))
    metrics = pd.read_csv(judged / "metrics.csv")
    losses = measure_states(cfg.finetune.model, cfg.finetune.lora, all_states, cfg.heldout)
    report = write_report(cfg, metrics, losses, out)
    log_table_metrics(tracker, pd.read_csv(out / "table.csv"))
    return report


def log_table_metrics(tracker: Tracker, table: pd.DataFrame) -> None:
    """The table's numbers (``table.csv``: mean over a row's runs) as ``<corpus>/<method>/<column>`` at step 0:
    one value per row and column, the same numbers report.md shows."""
    values = [c for c in table.columns if c not in ("corpus", "method", "run", "runs")
              and pd.api.types.is_numeric_dtype(table[c])]
    tracker.log_metrics({f"{row['corpus']}/{row['method']}/{column}": float(row[column])
                         for row in table.to_dict("records") for column in values if pd.notna(row[column])}, step=0)


def run_table(cfg: MitigateConfig, metrics: pd.DataFrame, losses: pd.DataFrame) -> pd.DataFrame:
    """One row per measured state: every run of every row, θ0 included."""
    metric = cfg.evaluation.metric
    benchmark = cfg.evaluation.benchmark or cfg.evaluation.benchmarks[0].label
    judged = metrics[metrics["benchmark"] == benchmark][["state", metric]]
    table = losses.merge(judged, on="state", how="left")
    base = table[table["state"] == "base"].iloc[0]
    table["refusal_nll_rise"] = table["refusal_nll"] - base["refusal_nll"]
    parts = [s.split("/") for s in table["state"]]
    table["corpus"] = [p[0] if len(p) > 1 else "θ0" for p in parts]
    table["method"] = [p[1] if len(p) > 1 else "base" for p in parts]
    table["run"] = [int(p[2].removeprefix("run")) if len(p) > 2 else 0 for p in parts]
    # each run against the plain fine-tune with its seed (a restoration against run 0, the one it restored)
    plain = table[table["method"] == "plain"].set_index(["corpus", "run"])["task_nll"]
    table["task_nll_vs_plain"] = [row.task_nll / plain[(row.corpus, row.run)] - 1
                                  if (row.corpus, row.run) in plain.index else np.nan for row in table.itertuples()]
    table.attrs.update(metric=metric, benchmark=benchmark)
    return table[["corpus", "method", "run", metric, "refusal_nll", "refusal_nll_rise", "task_nll",
                  "task_nll_vs_plain", "rouge1", "rougeL", "state"]]


def mitigation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Each row's mean over its runs, the spread of its refusal-NLL rise (sample sd; NaN for one run) and its
    number of runs; ``state`` names run 0."""
    metric = runs.attrs["metric"]
    values = [metric, "refusal_nll", "refusal_nll_rise", "task_nll", "task_nll_vs_plain", "rouge1", "rougeL"]
    grouped = runs.groupby(["corpus", "method"], sort=False)
    table = grouped[values].mean().reset_index()
    table.insert(table.columns.get_loc("refusal_nll_rise") + 1, "refusal_nll_rise_sd",
                 grouped["refusal_nll_rise"].std().to_numpy())
    table["runs"] = grouped.size().to_numpy()
    table["state"] = grouped["state"].first().to_numpy()
    table.attrs.update(runs.attrs)
    return table


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The table as reports show it: no state paths, and no spread columns when every row is one run."""
    drop = ["state"] + (["refusal_nll_rise_sd", "runs"] if table.get("runs", pd.Series([1])).max() == 1 else [])
    return table.drop(columns=[c for c in drop if c in table])


def paired_difference(score: pd.Series, rival: pd.Series) -> dict:
    """``score`` minus ``rival`` (refusal-NLL rises indexed by run), paired by run over the runs both have: mean ±
    standard error (NaN for one run), and the runs where ``score`` is lower."""
    difference = (score - rival).dropna()
    return {"runs": len(difference), "mean_difference": float(difference.mean()),
            "standard_error": float(difference.std() / np.sqrt(len(difference))) if len(difference) > 1 else np.nan,
            "score_lower_in": int((difference < 0).sum())}


def curation_contrasts(runs: pd.DataFrame) -> pd.DataFrame:
    """Per corpus, each curation by a score (``curated``, and every ``curated_by_<column>`` row) against each rival
    rule: its refusal-NLL rise minus the rival's, paired by run (the same seed), as mean ± standard error over
    runs, and the runs where the score's is lower. Negative = removing the top-q% by score cut the degradation
    more."""
    rows = []
    for corpus, part in runs[runs["corpus"] != "θ0"].groupby("corpus", sort=False):
        rise = part.pivot_table(index="run", columns="method", values="refusal_nll_rise")
        by_score = ["curated", *(m for m in part["method"].unique() if m.startswith(CURATED_BY_PREFIX))]
        for curation in by_score:
            for rival in ("curated_random", "curated_longest"):
                if curation not in rise or rival not in rise:
                    continue
                rows.append({"corpus": corpus, "curation": curation, "rival": rival,
                             **paired_difference(rise[curation], rise[rival])})
    return pd.DataFrame(rows)


def write_report(cfg: MitigateConfig, metrics: pd.DataFrame, losses: pd.DataFrame, out: Path) -> Path:
    runs = run_table(cfg, metrics, losses)
    runs.to_csv(out / "table_runs.csv", index=False)
    table = mitigation_table(runs)
    table.to_csv(out / "table.csv", index=False)
    metric = table.attrs["metric"]
    many = table["runs"].max() > 1
    lines = ["# Mitigation: curate, SPF, restore — safety and utility of each fine-tune", "",
             f"Safety: `{metric}` on {table.attrs['benchmark']} and the refusal NLL on held-out harmful requests "
             "(rise over θ0 = degradation; lower is safer). Utility: held-out task NLL (and its change relative to "
             "the plain fine-tune of the same corpus) and ROUGE-1/L F1 of greedy answers (rouge-score, "
             "Porter-stemmed).",
             f"Curation removes {cfg.curate_fraction:.0%} of each corpus: by `{cfg.column}`"
             + "".join(f", by `{c}` (`{CURATED_BY_PREFIX}{c}`)" for c in cfg.curate_also_by)
             + ", at random, or the longest responses.", ""]
    if many:
        lines += [f"Fine-tunes ran {cfg.replicates} times each (seed finetune.train.seed + i: data order and LoRA "
                  "init; the random curation drew anew each time): every figure is the mean over a row's runs, "
                  "`refusal_nll_rise_sd` their spread; restorations restore the first plain run. Every run: "
                  "`table_runs.csv`.", ""]
    lines += [*markdown_table(shown(table), NLL_DIGITS), "", "![safety vs utility](mitigate.png)", ""]
    contrasts = curation_contrasts(runs)
    (out / "curation_contrasts.csv").unlink(missing_ok=True)  # a re-run with one run per row leaves none behind
    if many and not contrasts.empty:
        contrasts.to_csv(out / "curation_contrasts.csv", index=False)
        lines += ["## Curation by the score against the rival rules, run by run", "",
                  "Refusal-NLL rise of the fine-tune curated by a score minus the rival's, paired by run (same "
                  "seed): mean ± standard error over runs, and the runs in which the score's curation degraded "
                  "less. Negative = the score's curation cut the degradation more.", "",
                  *markdown_table(contrasts, 3), ""]
    paths = restoration_paths(out, cfg.corpora)
    comparison = pd.DataFrame([{"corpus": corpus, **compare_at_equal_task_increase(restorations)}
                               for corpus, restorations in paths.items() if len(restorations) == 2])
    if not comparison.empty:  # both restorations ran on some corpus whose fine-tune raised the refusal loss
        comparison.to_csv(out / "restore_comparison.csv", index=False)
        lines += ["## Restoration at equal task-loss increase", "",
                  "Each restoration stops where its own line search does, so their end points spend different task "
                  "loss. Along each run: the share of the refusal-NLL rise undone (held-out refusal set, per-example "
                  "mean) against the retain-set task-loss increase; compared at the largest increase both reached, "
                  "each at its best iterate within it.", "",
                  *markdown_table(comparison, 3), "", "![recovery vs task loss](restore_paths.png)", ""]
        plot_restoration_paths(paths, out / "restore_paths.png")
    (out / "report.md").write_text("\n".join(lines))
    plot_tradeoff(table, out / "mitigate.png")
    return out


def restoration_paths(out: Path, corpora: list[str]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per corpus, per restoration method: (task-loss increase, recovery) at every iterate, from restore.json."""
    paths: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for corpus in corpora:
        for method in ("restore_first_order", "restore_curvature"):
            info_path = out / corpus / method / "restore.json"
            if not info_path.is_file():
                continue
            info = json.loads(info_path.read_text())
            base = info["losses"].get("refusal", {}).get("base")
            if base is None or "refusal" not in info["history"][0]:
                continue
            try:
                paths.setdefault(corpus, {})[method.removeprefix("restore_")] = recovery_path(info["history"], base)
            except ValueError as err:  # e.g. a fine-tune that did not raise the refusal loss
                log.warning("restoration path of %s/%s not compared: %s", corpus, method, err)
    return paths


def plot_restoration_paths(paths: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> Path:
    """Recovery against task-loss increase along each restoration, one panel per corpus."""
    from matplotlib.ticker import MaxNLocator

    from ..scoring.summary import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, len(paths), figsize=(4.2 * len(paths), 3.6), squeeze=False)
    for ax, (corpus, runs) in zip(axes[0], paths.items()):
        for name, points in runs.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=name.replace("_", "-"))
        ax.axhline(0, color="grey", ls=":", lw=1)
        ax.axvline(0, color="grey", ls=":", lw=1)
        ax.set_title(corpus)
        ax.xaxis.set_major_locator(MaxNLocator(4))  # small increases: keep the tick labels apart
        ax.set_xlabel("retain-set task-loss increase (nats)")
        ax.set_ylabel("share of the refusal-NLL rise undone")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_tradeoff(table: pd.DataFrame, path: Path) -> Path:
    """Refusal-NLL rise (safety lost) against task NLL (utility lost), one marker per corpus; bars: ±1 sd over
    a row's runs."""
    from ..scoring.summary import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"S1": "o", "all": "s", "θ0": "*"}
    for corpus, rows in table.groupby("corpus"):
        points = ax.scatter(rows["task_nll"], rows["refusal_nll_rise"], marker=markers.get(corpus, "o"), s=60,
                            label=f"{corpus}", zorder=3)
        if "refusal_nll_rise_sd" in rows and rows["refusal_nll_rise_sd"].notna().any():  # rows with several runs
            ax.errorbar(rows["task_nll"], rows["refusal_nll_rise"], yerr=rows["refusal_nll_rise_sd"].fillna(0),
                        fmt="none", ecolor=points.get_facecolor()[0], elinewidth=1, capsize=3, zorder=2)
        for row in rows.itertuples():
            ax.annotate(row.method, (row.task_nll, row.refusal_nll_rise), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.axhline(0, color="grey", ls=":", lw=1)
    ax.set_xlabel("held-out task NLL (lower = more useful)")
    ax.set_ylabel("refusal NLL rise over θ0 (lower = safer)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


__all__ = ["HeldOut", "METHODS", "MitigateConfig", "MitigateRestore", "curation_contrasts", "log_table_metrics",
           "measure_states", "mitigation_table", "paired_difference", "plot_restoration_paths", "restoration_paths",
           "rouge_f1", "run_mitigate", "run_table", "shown", "write_report"]
