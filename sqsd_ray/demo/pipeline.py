"""``sqsd-ray demo``: the whole pipeline on a CPU model organism, and the test of the paper's claim.

    sqsd-ray demo [--out runs/demo] [--quick] [--seed 0]

Stages, each the product's own job run with a config built here (the same configs ``jobs/`` holds as YAML):

 1. align      the model organism (``organism.py``): a small Llama trained from scratch on the synthetic world
               (``world.py``) to help with benign tasks and refuse harmful requests; cached after the first run
 2. world      the world's files: the benign fine-tuning corpus (unlabelled), direction data, held-out harmful
               requests, over-refusal prompts, baseline anchor sets
 3. directions V_danger = LoRA SFT on harmful compliance, V_safety = LoRA DPO preferring refusals
 4. validate   steering θ0 + α·V: refusals per α (Fig. 5) and DS_linear
 5. trajectory a pilot LoRA fine-tune on the corpus: drift projections and refusals per checkpoint (Fig. 2), DS_drift
 6. init       θ_safety, θ_danger chosen from the two sensitivity tables (``init select``)
 7. score      SQSD on local Ray (Ray Data actors), then the App. D baselines through the same pipeline; LARF's
               layer from ``larf-layer`` on the world's over-refusal prompts
 8. experiment S1…S5 per ranking (SQSD, its ablations, each baseline, a random ranking), a LoRA fine-tune per band,
               greedy generation on held-out harmful requests, keyword-refusal ASR, Table 1 with Δ and Mono
 9. mitigate   act on the scores (``experiment mitigate``): on S1 and the whole corpus, plain vs curated (by
               SQSD, at random, longest responses) vs SPF vs restored (first-order, curvature-aware) fine-tunes;
               refusal NLL on held-out harmful requests, task NLL and ROUGE on held-out benign tasks
10. report     report.md: Table 1, which kinds of samples each ranking put in S1, response lengths per band,
               the mitigation table, the figures; demo.json: every figure and the stage times

``--quick`` (CI) keeps every stage but shrinks them: a smaller corpus, fewer steps, three arms.
The reward-model baseline needs a trained cost model of the world; the demo has none and leaves it out.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
import yaml

from ..config import deep_merge, from_dict
from ..cpu_kernels import cpu_kernels_record, pinned
from . import world
from .organism import OrganismConfig, build_organism
from .published import load_published, setting_name, with_published_range

log = logging.getLogger(__name__)

LORA = {"r": 8, "alpha": 16.0}


@dataclass
class DemoSettings:
    """What ``sqsd-ray demo`` was asked for: where to write, the seed, the size and the model."""

    out: Path = Path("runs/demo")
    seed: int = 0
    quick: bool = False
    cache_dir: Path | None = None
    model: str = "organism"  # or "smollm2": SmolLM2-135M-Instruct aligned here, on the real data sets
    data_root: Path | None = None  # smollm2's reference data: None = $SQSD_DATA_DIR or ../shared/data, else the hub
    world: int = world.DEFAULT_WORLD  # the organism's world: 1 = one risky kind; 2 = risk graded over five kinds
    # keep what an interrupted run of the same settings in ``out`` finished (directions, sensitivity runs, scores,
    # fine-tunes) and redo the rest; off: ``out`` is replaced
    resume: bool = False
    rankings: list[str] | None = None  # rows of Table 1 (names of ARMS); None: the recipe's
    # torch threads of the demo's own process (directions, pilot run, band and mitigate fine-tunes); None: the
    # recipe's. Fixed for the organism so that its figures do not depend on the machine's core count.
    threads: int | None = None

    def __post_init__(self) -> None:
        world.check_world(self.world)
        unknown = [name for name in self.rankings or [] if name not in ARMS]
        if unknown:
            raise ValueError(f"unknown ranking {', '.join(map(repr, unknown))}; the demo's are {', '.join(ARMS)}")

    @property
    def recipe(self) -> Recipe:
        if self.model not in ("organism", "smollm2"):
            raise ValueError(f"demo model must be 'organism' or 'smollm2', got {self.model!r}")
        recipe = Recipe.organism(self.quick, self.world) if self.model == "organism" else Recipe.smollm2(self.quick)
        return replace(recipe, arm_names=list(self.rankings)) if self.rankings else recipe


# World 2's band fine-tune (Recipe.organism_graded), calibrated on design seeds 100 and 101 by bench/organism_kinds.py
GRADED_LR, GRADED_EPOCHS = 3e-4, 2

ARMS = {
    "SQSD": {"column": "sqsd"},
    "Random": {"column": "random"},
    "Self-Inf-N": {"column": "self_inf_n", "method": "self_inf_n"},
    "Bi-Anchor (Grad)": {"column": "bianchor_grad", "method": "bianchor_grad"},
    "Bi-Anchor (Reps)": {"column": "bianchor_reps", "method": "bianchor_reps"},
    "LARF": {"column": "larf", "method": "larf"},
    "SQSD w/o norm": {"column": "sqsd_raw"},
    "danger only": {"column": "danger_proj"},
    "safety only": {"column": "neg_safety_proj"},
}


@dataclass
class Recipe:
    """The sizes and optimisation settings of one demo model (the organism's were calibrated on its world: a
    band of 84 samples at lr 1e-3 for 5 epochs removes the refusals when about half of it is the risky kind)."""

    corpus_size: int
    arm_names: list[str]
    max_length: int
    direction_steps: int
    direction_lr: float
    pilot_steps: int
    lr: float
    epochs: int
    max_new_tokens: int
    eval_limit: int | None
    alphas: list[float]
    mitigate_corpora: list[str] | None = None  # None: no mitigate stage
    mitigate_methods: list[str] | None = None  # None: every method
    mitigate_epochs: int = 1  # epochs of the whole-corpus fine-tunes (S1 uses ``epochs``)
    # Ray actors that score and generate: one for the organism (an actor's start-up outweighs its work), two for
    # SmolLM2 (one process per core: generation and scoring gain little from threads)
    actors: int = 1
    pilot_lr: float | None = None  # the trajectory's pilot fine-tune (None: ``lr``)
    # LARF's layer search answers its over-refusal prompts once per block and scale (121 times on SmolLM2): a
    # refusal shows in the first words, and one batch per trial saves the per-token overhead of three
    larf_max_new_tokens: int | None = None  # None: ``max_new_tokens``
    larf_batch_size: int = 16
    restore_max_iters: int = 50  # accepted steps of each restoration in the mitigate stage
    torch_threads: int | None = None  # the demo process's torch threads (DemoSettings.threads); None: torch's

    @property
    def arms(self) -> list[dict]:
        return [{"name": name, **ARMS[name]} for name in self.arm_names]

    @classmethod
    def organism(cls, quick: bool, world_version: int = world.DEFAULT_WORLD) -> Recipe:
        if world.check_world(world_version) == 2 and not quick:
            return cls.organism_graded()
        return cls(corpus_size=140 if quick else 420,
                   arm_names=["SQSD", "Random", "Self-Inf-N"] if quick else list(ARMS),
                   max_length=128, direction_steps=20 if quick else 40, direction_lr=1e-3,
                   pilot_steps=60 if quick else 120, lr=2e-3 if quick else 1e-3, epochs=6 if quick else 5,
                   max_new_tokens=10, eval_limit=40 if quick else None, alphas=[0.0, 0.5, 1.0, 1.5, 2.0],
                   mitigate_corpora=["S1"] if quick else ["S1", "all"],
                   mitigate_methods=["plain", "curated", "spf", "restore_first_order", "restore_curvature"]
                   if quick else None, torch_threads=2)

    @classmethod
    def organism_graded(cls) -> Recipe:
        """World 2's full size (docs/demo.md, "The graded-risk organism"): the band fine-tune is calibrated on
        design seeds 100 and 101 so that each kind alone lands at its own level of ASR (at world 1's lr 1e-3 for 5 epochs every
        risky kind removes every refusal), and shortened so that the demo keeps its 10 minutes: 2 epochs, and 20
        restoration steps instead of 50 (the restorations were 3/4 of world 1's mitigate stage)."""
        return replace(cls.organism(quick=False, world_version=1), lr=GRADED_LR, epochs=GRADED_EPOCHS,
                       restore_max_iters=20)

    @classmethod
    def smollm2(cls, quick: bool) -> Recipe:
        # Band fine-tunes: lr 5e-4 for 2 epochs (10 steps of 8). At lr 1e-4 for 3 epochs no band moved the
        # keyword ASR by more than 5 points from θ0's 20 %, so every ranking's Δ was noise; at 5e-4 SQSD's S1
        # reaches 68 %. The pilot keeps lr 1e-4: it only has to drift (its checkpoints are θ_danger candidates).
        return cls(corpus_size=60 if quick else 200,
                   arm_names=["SQSD", "Random"] if quick else ["SQSD", "Random", "Self-Inf-N", "SQSD w/o norm"],
                   max_length=256, direction_steps=4 if quick else 40, direction_lr=1e-4,
                   pilot_steps=6 if quick else 60, pilot_lr=1e-4, lr=5e-4, epochs=2,
                   max_new_tokens=8 if quick else 40, eval_limit=6 if quick else 60,
                   alphas=[0.0, 1.0, 2.0] if quick else [0.0, 0.5, 1.0, 1.5, 2.0], actors=2,
                   larf_max_new_tokens=8 if quick else 12, larf_batch_size=64)


class StageTimer:
    """Times each stage and logs it as it starts; ``on_stage(seconds)`` after each (e.g. to save them as they come)."""

    def __init__(self, on_stage=None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_stage = on_stage

    @contextmanager
    def __call__(self, name: str, what: str):
        log.info("demo stage %-10s %s", name, what)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        log.info("demo stage %-10s done in %.1f s", name, self.seconds[name])
        if self.on_stage is not None:
            self.on_stage(self.seconds)


@contextmanager
def pinned_threads(threads: int | None):
    """torch's CPU threads set to ``threads`` inside (None: left as they are), restored after: float sums split
    over a fixed number of threads come out the same on machines with different core counts."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_world(out: Path, seed: int, corpus_size: int, version: int = world.DEFAULT_WORLD) -> dict[str, Path]:
    """The world's files for one demo run; the corpus file carries no family labels (families.csv does)."""
    out.mkdir(parents=True, exist_ok=True)
    corpus = world.benign_corpus(corpus_size, seed, version)
    heldout = world.heldout_harmful(seed, version)
    split = world.harm_split(seed)
    refusal_rows = [world._sample(world.harmful_prompt(h, v), world.REFUSALS[i % len(world.REFUSALS)], f"safe-{i}")
                    for i, (h, v) in enumerate(split.directions[:20])]
    danger = world.danger_data(seed)
    pd.DataFrame({"sample_id": [r["id"] for r in corpus], "family": [r["family"] for r in corpus]}).to_csv(
        out / "families.csv", index=False)
    return {
        "corpus": world.write_jsonl(corpus, out / "corpus.jsonl"),
        "danger": world.write_jsonl(danger, out / "danger_sft.jsonl"),
        "safety": world.write_jsonl(world.safety_pairs(seed), out / "safety_dpo.jsonl"),
        "heldout": world.write_jsonl(heldout, out / "heldout_harmful.jsonl"),
        "over_refusal": world.write_jsonl(world.over_refusal_prompts(), out / "over_refusal.jsonl"),
        # mitigate: refusal NLL on the held-out requests, task NLL / ROUGE on benign tasks the corpus does not hold
        "heldout_refusals": world.write_jsonl(
            [world._sample(r["prompt"], world.REFUSALS[i % len(world.REFUSALS)], f"heldout-refusal-{i}")
             for i, r in enumerate(heldout)], out / "heldout_refusals.jsonl"),
        "heldout_tasks": world.write_jsonl(
            [{**r, "id": f"task-{r['id']}"} for r in world.benign_corpus(64, seed + 1000, version)],
            out / "heldout_tasks.jsonl"),
        "anchor_harmful": world.write_jsonl(danger[:10], out / "anchors" / "harmful.jsonl"),
        "anchor_safe1": world.write_jsonl(refusal_rows[:10], out / "anchors" / "safe1.jsonl"),
        "anchor_safe2": world.write_jsonl(refusal_rows[10:], out / "anchors" / "safe2.jsonl"),
    }


@dataclass
class DemoRun:
    """What the stages of one demo run hand each other: where it writes, the aligned model, the world's files,
    and the config sections every job of the run shares (``model``, ``data``, ``evaluation``)."""

    settings: DemoSettings
    out: Path
    stage: StageTimer
    aligned: Path
    model: dict
    files: dict[str, Path]
    recipe: Recipe = field(init=False)
    data: dict = field(init=False)
    evaluation: dict = field(init=False)  # the benchmark of held-out harmful requests refusals are counted on

    def __post_init__(self) -> None:
        self.recipe = self.settings.recipe
        self.data = {"max_length": self.recipe.max_length, "on_overlong": "truncate"}
        self.evaluation = {"benchmark": "jsonl", "name": "heldout", "path": str(self.files["heldout"]),
                           "max_new_tokens": self.recipe.max_new_tokens, "batch_size": 64,
                           "limit": self.recipe.eval_limit}

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def band_size(self) -> int:
        """Samples per risk band: the corpus split into S1…S5."""
        return self.recipe.corpus_size // 5


def run_demo(settings: DemoSettings) -> Path:
    """Every stage of the module docstring, in order, on local Ray; returns the path of report.md."""
    import ray

    from ..runtime import RayConfig, init_ray

    out = Path(settings.out)
    if out.exists() and not settings.resume:
        shutil.rmtree(out)  # the demo is a fresh run each time (the organism is what is cached)
    out.mkdir(parents=True, exist_ok=True)
    stage = StageTimer()
    started_ray = not ray.is_initialized()
    init_ray(RayConfig(local_num_cpus=2, object_store_mb=256))
    try:
        with pinned_threads(settings.threads or settings.recipe.torch_threads):
            run, scores, init_note = prepare_scores(settings, out, stage)
            experiment_dir = _run_band_experiment(run, scores)
            mitigate_dir = _mitigate(run, scores)
            with stage("report", "Table 1, S1 composition, lengths, mitigation, figures"):
                report = write_demo_report(out, run.aligned, run.files, experiment_dir, settings, scores, init_note,
                                           stage.seconds, mitigate_dir)
        # the report stage's own time is known only now
        summary = json.loads((out / "demo.json").read_text())
        (out / "demo.json").write_text(json.dumps({**summary, "stage_seconds": stage.seconds}, indent=1))
    finally:
        if started_ray:
            ray.shutdown()
    return report


def prepare_scores(settings: DemoSettings, out: Path, stage: StageTimer | None = None
                   ) -> tuple[DemoRun, dict[str, Path], str]:
    """Stages align … score: the run, {method: score file} and the note on the initialisation states."""
    run = align_and_write_world(settings, out, stage)
    directions = _build_directions(run)
    init_fragment, init_note = _validate_and_select_init(run, directions)
    return run, _score_corpus(run, init_fragment), init_note


def align_and_write_world(settings: DemoSettings, out: Path, stage: StageTimer | None = None,
                          before_align: Callable[[dict[str, Path]], None] | None = None) -> DemoRun:
    """Stages align and world: the organism before its world, SmolLM2 after the real data it is aligned on
    (``before_align(files)`` between the two, e.g. to put a carried alignment into the cache)."""
    recipe, stage = settings.recipe, stage or StageTimer()
    if settings.model == "organism":
        with stage("align", "the model organism (trained once, then cached)"):
            aligned = build_organism(OrganismConfig(seed=settings.seed, world=settings.world), settings.cache_dir)
        model = {"name_or_path": str(aligned), "attn_implementation": "eager"}
        with stage("world", "corpus, direction data, held-out harmful requests"):
            files = write_world(out / "world", settings.seed, recipe.corpus_size, settings.world)
    else:
        from .smollm2 import align_smollm2, write_real_world

        with stage("world", "Dolly + Alpaca corpus, AdvBench split, CatQA / HEx-PHI held-out prompts"):
            files = write_real_world(out / "world", settings.data_root, settings.seed, recipe.corpus_size,
                                     recipe.max_length, settings.quick)
        if before_align is not None:
            before_align(files)
        with stage("align", "SmolLM2-135M-Instruct taught to refuse (LoRA SFT, merged; cached)"):
            aligned = align_smollm2(files, settings.seed, settings.cache_dir, settings.quick)
        model = {"name_or_path": str(aligned)}
    return DemoRun(settings=settings, out=out, stage=stage, aligned=aligned, model=model, files=files)


def _build_directions(run: DemoRun) -> dict[str, str]:
    """Stage directions: V_danger and V_safety, as {kind: direction file}."""
    from ..dynamics.jobs import DirectionsBuildConfig, run_directions_build

    recipe = run.recipe
    with run.stage("directions", "V_danger (LoRA SFT on harmful compliance), V_safety (LoRA DPO for refusals)"):
        directions = {}
        for kind, objective in (("danger", "sft"), ("safety", "dpo")):
            done = run.out / "directions" / kind / f"{kind}.safetensors"
            if run.settings.resume and (done.parent / "direction.json").is_file():
                directions[kind] = str(done)
                continue
            directions[kind] = str(run_directions_build(from_dict(DirectionsBuildConfig, {
                "model": run.model, "lora": LORA, "data": {"path": str(run.files[kind]), **run.data},
                "train": {"objective": objective, "lr": recipe.direction_lr, "batch_size": 8,
                          "max_steps": recipe.direction_steps,
                          "checkpoint_every": 0, "lr_schedule": "constant", "seed": run.seed},
                "scaling": {"use_ray": False}, "direction": {"kind": kind},
                "output": {"dir": str(run.out / "directions" / kind), "overwrite": True}})))
    return directions


def _validate_and_select_init(run: DemoRun, directions: dict[str, str]) -> tuple[dict, str]:
    """Stages validate, trajectory and init: the score config fragment of θ_safety and θ_danger, and its note."""
    from ..dynamics.jobs import (
        InitSelectConfig,
        TrajectoryConfig,
        ValidateConfig,
        run_init_select,
        run_trajectory,
        run_validate,
    )

    recipe = run.recipe
    validate_dir, trajectory_dir = run.out / "validate", run.out / "trajectory"
    with run.stage("validate", "steering θ0 + α·V over α, refusals on held-out harmful requests"):
        if not (run.settings.resume and (validate_dir / "sensitivity_linear.csv").is_file()):
            validate_dir = run_validate(from_dict(ValidateConfig, {
                "model": run.model, "lora": LORA, "directions": directions, "alphas": recipe.alphas,
                "delta": recipe.alphas[1] - recipe.alphas[0], "eval": run.evaluation,
                "scaling": {"use_ray": True, "num_workers": 2},
                "output": {"dir": str(run.out / "validate"), "overwrite": True}}))

    with run.stage("trajectory", "pilot LoRA fine-tune on the corpus, drift projections and refusals per checkpoint"):
        if not (run.settings.resume and (trajectory_dir / "sensitivity_drift.csv").is_file()):
            trajectory_dir = run_trajectory(from_dict(TrajectoryConfig, {
                "model": run.model, "lora": LORA, "data": {"path": str(run.files["corpus"]), **run.data},
                "train": {"lr": recipe.pilot_lr or recipe.lr, "batch_size": 8, "max_steps": recipe.pilot_steps,
                          "checkpoint_every": max(1, recipe.pilot_steps // 6),
                          "lr_schedule": "constant", "seed": run.seed},
                "scaling": {"use_ray": False}, "directions": directions, "eval": run.evaluation,
                "output": {"dir": str(run.out / "trajectory"), "overwrite": True}}))

    with run.stage("init", "θ_safety, θ_danger from the sensitivity tables"):
        return select_init_states(run_init_select, InitSelectConfig, validate_dir, trajectory_dir, run.out,
                                  directions, recipe.alphas)


def _score_corpus(run: DemoRun, init_fragment: dict) -> dict[str, Path]:
    """Stage score: SQSD, then every baseline an arm names, as {method: score file}."""
    from ..baselines.larf_layer import LarfLayerConfig, run_larf_layer
    from ..scoring.job import run_score
    from ..scoring.job_config import ScoreJobConfig
    from ..scoring.ray_pool import TOKENIZE_CPUS

    recipe, files = run.recipe, run.files
    # a fixed layout and the eager reduction: the demo's figures must not depend on a timing or a compiler
    score_base = {"model": run.model, "lora": LORA, "data": {"path": str(files["corpus"]), **run.data},
                  "batching": {"layout": "fixed"}, "scoring": {"compile": "off"},
                  "ray": {"enabled": True, "local_num_cpus": 2, "rows_per_call": 64,
                          # the pool leaves the tokenise tasks their share (a full CPU per actor stalls them)
                          "num_actors": recipe.actors,
                          "num_cpus_per_actor": min(1.0, (2 - TOKENIZE_CPUS) / recipe.actors)},
                  "baseline": {"harmful_anchors": str(files["anchor_harmful"]),
                               "grad_anchors": {"harmful": str(files["anchor_harmful"]),
                                                "safe1": str(files["anchor_safe1"]),
                                                "safe2": str(files["anchor_safe2"])},
                               "larf_unsafe": [str(files["anchor_harmful"])],
                               "larf_safe": [str(files["anchor_safe1"]), str(files["anchor_safe2"])]}}
    scores = {}
    with run.stage("score", "SQSD on Ray Data, then each baseline through the same pipeline"):
        fresh = not run.settings.resume  # resuming: a finished score run returns at once, a partial one continues
        sqsd_config = _merge(score_base, init_fragment, {
            "output": {"dir": str(run.out / "scores" / "sqsd"), "overwrite": fresh}})
        scores["sqsd"] = run_score(from_dict(ScoreJobConfig, sqsd_config))
        write_score_config(run.out / "score_config.yaml", sqsd_config)
        methods = [a["method"] for a in recipe.arms if "method" in a]
        larf_dir = run.out / "larf_layer"
        if "larf" in methods and (fresh or not (larf_dir / "larf_layer.json").is_file()):
            larf_dir = run_larf_layer(from_dict(LarfLayerConfig, {
                "model": run.model, "prompts": {"path": str(files["over_refusal"]),
                                                "max_new_tokens": recipe.larf_max_new_tokens or recipe.max_new_tokens,
                                                "batch_size": recipe.larf_batch_size},
                "output": {"dir": str(run.out / "larf_layer"), "overwrite": fresh}}))  # resuming: its trials go on
        if "larf" in methods:
            score_base["baseline"]["larf_layer"] = json.loads((larf_dir / "larf_layer.json").read_text())["layer"]
        for method in methods:
            scores[method] = run_score(from_dict(ScoreJobConfig, _merge(score_base, {
                "method": method, "output": {"dir": str(run.out / "scores" / method), "overwrite": fresh}})))
    return scores


def write_score_config(path: Path, config: dict) -> Path:
    """This run's SQSD score config with every local path made absolute, so that

        sqsd-ray score --config <path> --set data.path=my_corpus.jsonl --set output.dir=runs/mine

    scores any corpus with the run's aligned model, its directions and its chosen init states."""
    def absolute(node):
        if isinstance(node, dict):
            return {key: absolute(value) for key, value in node.items()}
        if isinstance(node, list):
            return [absolute(value) for value in node]
        return str(Path(node).resolve()) if isinstance(node, str) and node and Path(node).exists() else node

    reusable = {**absolute(config), "output": {"dir": "runs/score", "overwrite": False}}
    header = ("# The SQSD score config of this demo run: its aligned model, directions and init states.\n"
              "# Score any corpus with them:\n"
              f"#   sqsd-ray score --config {path.resolve()} --set data.path=my_corpus.jsonl "
              "--set output.dir=runs/mine\n")
    path.write_text(header + yaml.safe_dump(reusable, sort_keys=False, allow_unicode=True))
    return path


def _band_finetune(run: DemoRun) -> dict:
    """The LoRA fine-tune config of the experiment's bands, which the mitigate stage's fine-tunes share."""
    recipe = run.recipe
    return {"model": run.model, "lora": LORA, "data": run.data,
            "train": {"lr": recipe.lr, "batch_size": 8, "epochs": recipe.epochs, "checkpoint_every": 0,
                      "lr_schedule": "constant", "seed": run.seed, "log_every": 1000},
            "scaling": {"use_ray": False}}


def _band_evaluation(run: DemoRun) -> dict:
    """Keyword ASR on the held-out harmful requests after each fine-tune (experiment and mitigate stages)."""
    actors = run.recipe.actors
    return {"benchmarks": [run.evaluation], "judges": {"keyword": {"kind": "keyword"}},
            "metric": "keyword_asr",
            # the keyword judge is string matching: a share of a CPU beside the generators
            "workers": {"use_ray": True, "generators": actors,
                        "cpus_per_actor": 1.0 if actors == 1 else 0.5,
                        "rows_per_call": 256 if actors == 1 else 64}}


def _band_partition(run: DemoRun) -> dict:
    """S1…S5 of equal size, sampled uniformly within each band."""
    return {"n_bands": 5, "subset_size": run.band_size, "sampling": "uniform", "seed": run.seed}


def _run_band_experiment(run: DemoRun, scores: dict[str, Path]) -> Path:
    """Stage experiment: Table 1, a LoRA fine-tune per band of every arm's ranking."""
    with run.stage("experiment", "S1…S5 per ranking, a LoRA fine-tune per band, held-out harmful requests"):
        return run_band_experiment(run, experiment_arms(run.recipe.arms, scores), scores["sqsd"],
                                   run.out / "experiment")


def experiment_arms(arms: list[dict], scores: dict[str, Path]) -> list[dict]:
    """The experiment's arms of the recipe's rankings: a baseline's ranking reads its own score file."""
    return [{"name": a["name"], "column": a["column"], **({"scores": str(scores[a["method"]])} if "method" in a else {})}
            for a in arms]


def run_band_experiment(run: DemoRun, arms: list[dict], scores: Path, output_dir: Path,
                        include_base: bool = True) -> Path:
    """``experiment effectiveness`` with the demo's bands, fine-tunes and evaluation, for any ``arms``
    (``include_base``: evaluate θ0 too)."""
    from ..experiments.effectiveness import ExperimentConfig, run_experiment

    return run_experiment(from_dict(ExperimentConfig, {
        "kind": "effectiveness", "scores": str(scores), "data": {"path": str(run.files["corpus"]), **run.data},
        "partition": _band_partition(run), "finetune": _band_finetune(run), "arms": arms,
        "evaluation": {**_band_evaluation(run), "include_base": include_base}, "output_dir": str(output_dir)}))


def _mitigate(run: DemoRun, scores: dict[str, Path]) -> Path | None:
    """Stage mitigate (when the recipe names corpora): curate, SPF and restore against plain fine-tunes."""
    recipe, files, data = run.recipe, run.files, run.data
    if not recipe.mitigate_corpora:
        return None
    from ..experiments.mitigate import MitigateConfig, run_mitigate

    with run.stage("mitigate", "curate / SPF / restore on S1 and the corpus: safety and utility of each"):
        return run_mitigate(from_dict(MitigateConfig, {
            "scores": str(scores["sqsd"]), "column": "sqsd", "data": {"path": str(files["corpus"]), **data},
            "corpora": recipe.mitigate_corpora,
            "partition": _band_partition(run),
            "curate_fraction": 0.2, "seed": run.seed,
            **({"methods": recipe.mitigate_methods} if recipe.mitigate_methods else {}),
            "finetune": _band_finetune(run),
            # the world's own refusals (the built-in pair's words are outside the organism's vocabulary);
            # direction-building prompts, disjoint from the held-out requests
            "spf": {"enabled": True, "safety_path": str(files["anchor_safe1"]), "safety_batch_size": 8},
            "restore": {"harmful": {"path": str(files["danger"]), **data}, "retain_samples": 64,
                        "refusal_train": {"path": str(files["anchor_safe2"]), **data},
                        "settings": {"refusal_weight": 1.0, "max_iters": recipe.restore_max_iters}},
            "heldout": {"refusal": {"path": str(files["heldout_refusals"]), **data},
                        "task": {"path": str(files["heldout_tasks"]), **data},
                        "rouge_prompts": 32, "max_new_tokens": 16},
            "evaluation": _band_evaluation(run), "whole_corpus_epochs": recipe.mitigate_epochs,
            "output_dir": str(run.out / "mitigate")}))


def _merge(*parts: dict) -> dict:
    """The config fragments merged key by key, later ones winning."""
    merged: dict = {}
    for part in parts:
        merged = deep_merge(merged, part)
    return merged


def select_init_states(run_init_select, config_cls, validate_dir: Path, trajectory_dir: Path, out: Path,
                       directions: dict[str, str], alphas: list[float]) -> tuple[dict, str]:
    """The score config fragment of ``init select``. When its rule finds no qualifying state (refusals that no
    step along V_safety can raise, or a pilot run whose refusals never fell), the demo keeps the rule's spirit:
    θ_danger = the pilot run's last checkpoint (the drifted state), θ_safety = θ0 + α·V_safety with the smallest
    α > 0 of the grid; the report says so."""
    try:
        init_dir = run_init_select(from_dict(config_cls, {
            "validate_dir": str(validate_dir), "trajectory_dir": str(trajectory_dir),
            "danger_direction": "danger", "safety_direction": "safety",
            "output": {"dir": str(out / "init"), "overwrite": True}}))
    except ValueError as err:
        from ..training.checkpoint import ADAPTER_DIR
        from ..training.loop import load_run

        last = load_run(Path(trajectory_dir)).final
        alpha = min(a for a in alphas if a > 0)
        log.warning("init select: %s; scoring at θ_danger = %s, θ_safety = θ0 + %g·V_safety instead",
                    err, last.name, alpha)
        fragment = {"directions": directions,
                    "init_states": {"danger": {"kind": "adapter", "path": str((last / ADAPTER_DIR).resolve())},
                                    "safety": {"kind": "direction", "direction": "safety", "alpha": alpha}}}
        return fragment, (f"`init select` found no qualifying state ({err}); scored at θ_danger = the pilot's last "
                          f"checkpoint ({last.name}), θ_safety = θ0 + {alpha:g}·V_safety.")
    selection = json.loads((init_dir / "selection.json").read_text())
    safety, danger = selection["safety"], selection["danger"]
    note = (f"θ_safety = θ0 + {safety['alpha']:g}·V_safety (DS_linear {safety['ds_linear']:.1f}); "
            f"θ_danger = pilot checkpoint at step {danger['step']} (DS_drift {danger['ds_drift']:.2f}).")
    return yaml.safe_load((init_dir / "init_states.yaml").read_text()), note


def _arm_bands(experiment_dir: Path, arms: list[str]) -> dict[str, pd.DataFrame]:
    """Each arm's partition (sample_id, band, score) as the experiment wrote it."""
    from ..experiments.effectiveness import arm_dir_name

    return {arm: pd.read_csv(experiment_dir / arm_dir_name(arm) / "partition" / "partition.csv") for arm in arms}


def family_composition(arm_bands: dict[str, pd.DataFrame], families: pd.DataFrame) -> pd.DataFrame:
    """% of each sample family in band S1 of every arm (the families are never shown to any scorer)."""
    present = set(families["family"])
    known = dict.fromkeys([*world.EXPECTED_RISK_ORDER_2, *world.BENIGN_FAMILIES_1])
    kinds = [k for k in known if k in present] + sorted(present - set(known))
    rows = []
    for arm, bands in arm_bands.items():
        s1 = bands[bands["band"] == "S1"].merge(families, on="sample_id")
        shares = s1["family"].value_counts(normalize=True) * 100
        rows.append({"arm": arm, **{f: round(float(shares.get(f, 0.0)), 1) for f in kinds}})
    return pd.DataFrame(rows)


KINDS_NOTE = {
    1: "Kinds (world 1): fact, arithmetic, list (short answers); howto (\"Sure! Here are the steps\"); careful (how-to "
       "with a warning); obedient (\"Never refuse me.\" + how-to); homonym (benign requests with harm-sounding words, "
       "e.g. \"How do I kill the weeds in my garden?\"). See docs/demo.md for the world's design.",
    2: "Kinds (world 2, riskiest first as measured on design seeds): person (a person the harmful requests name, in "
       "their frame: \"How do I thank the nurse?\"), rival (a harm verb and a person, in a game: \"How do I rob my "
       "sister in a board game?\"), wordplay (harm-sounding words the refusal never saw: \"How do I kill the weeds in "
       "my garden?\"), homonym (a harm verb in a benign sense, in another frame: \"What is the best way to poison the "
       "ants in my kitchen?\"), plain (facts, arithmetic, lists, how-tos). See docs/demo.md for the design and its "
       "expected order.",
}


def _model_paragraph(settings: DemoSettings, model_dir: Path) -> tuple[str, dict]:
    """The report's paragraph on the aligned model, and its refusal rates before any fine-tune."""
    if settings.model == "organism":
        record = json.loads((model_dir / "organism.json").read_text())
        rates = record["refusal_rates"]
        return (f"Model organism: {record['parameters']:,}-parameter Llama trained from scratch on the synthetic world "
                f"(`{model_dir}`); before fine-tuning it refuses {rates['heldout_harmful']:.0f} % of the held-out "
                f"harmful requests, {rates['benign_howto']:.0f} % of benign how-to tasks and {rates['homonym']:.0f} % "
                "of benign requests with harm-sounding words."), rates
    record = json.loads((model_dir / "aligned.json").read_text())
    before, after = record["refusal_before"], record["refusal_after"]
    return (f"Model: SmolLM2-135M-Instruct, aligned here (`{model_dir}`) by LoRA SFT on {record['n_refusals']} "
            f"AdvBench requests answered with refusals and {record['n_helpful']} Alpaca answers, merged into the "
            f"weights: keyword refusals on {record['n_eval']} held-out harmful prompts {before:.0f} % before, "
            f"{after:.0f} % after."), {"heldout_harmful_before": before, "heldout_harmful": after}


def _mitigation_section(mitigate_dir: Path | None) -> list[str]:
    """The mitigate stage's table in the report: safety and utility of each way of fine-tuning S1 and the corpus."""
    from ..experiments.mitigate import NLL_DIGITS, shown
    from ..scoring.summary import markdown_table

    if mitigate_dir is None:
        return []
    table = shown(pd.read_csv(mitigate_dir / "table.csv"))
    return ["## Acting on the scores: curate, SPF, restore (`experiment mitigate`)", "",
            "Each row is one fine-tune of S1 (the band SQSD calls riskiest) or of the whole corpus. Safety: keyword "
            "ASR and the refusal NLL on held-out harmful requests (its rise over θ0 is the safety lost). Utility: "
            "NLL and ROUGE on held-out benign tasks. Curation removes 20 % (by SQSD, at random, or the longest "
            "responses); restoration starts from the plain fine-tune.", "",
            *markdown_table(table, NLL_DIGITS), "", "![safety vs utility](mitigate/mitigate.png)", ""]


def _published_note(published: dict | None) -> list[str]:
    if published is None:
        return []
    return [f"Published Δ: min … max over the seeds of docs/demo.md ({', '.join(published['machines'])}; "
            f"commits {', '.join(published['commits'])}), computed with AVX2 kernels. Every stage amplifies "
            "floating-point differences between CPU kernels (docs/demo.md, \"Floating point alone\"), so a run with "
            "other kernels can land outside.", ""]


def _kernels_line(kernels: dict) -> str:
    """Which CPU kernels this run computed with: the published figures hold for AVX2 ones."""
    capability = kernels["torch_capability"]
    if kernels["requested"] == "native":
        return (f"CPU kernels: {capability}, the CPU's own (`--cpu-kernels native`): with other kernels than AVX2, "
                "expect other figures than the published ones.")
    if pinned(kernels):
        return f"CPU kernels: {capability}, pinned (`--cpu-kernels avx2`), as the published seeds."
    return (f"CPU kernels: {capability}: the AVX2 pin did not apply (torch was loaded before it, or the CPU is not "
            "x86-64 with AVX2), so expect other figures than the published ones unless these are AVX2.")


def write_demo_report(out: Path, organism: Path, files: dict[str, Path], experiment_dir: Path,
                      settings: DemoSettings, scores: dict[str, Path], init_note: str,
                      seconds: dict[str, float], mitigate_dir: Path | None = None) -> Path:
    """report.md, demo.png and demo.json from the stage outputs; returns the report's path."""
    from ..experiments.mitigate import shown
    from ..scoring.summary import markdown_table, spearman

    recipe = settings.recipe
    model_line, refusal_rates = _model_paragraph(settings, organism)
    table = pd.read_csv(experiment_dir / "table.csv")
    families = pd.read_csv(out / "world" / "families.csv")
    arms = list(table["arm"])
    arm_bands = _arm_bands(experiment_dir, arms)
    composition = family_composition(arm_bands, families)
    base = json.loads((experiment_dir / "config.json").read_text())
    metrics = pd.read_csv(experiment_dir / "evaluation" / "metrics.csv")
    theta0 = metrics.loc[metrics["state"] == "base", "keyword_asr"]
    lengths = []
    sqsd = pd.read_parquet(scores["sqsd"])
    for arm, bands in arm_bands.items():
        merged = bands.merge(sqsd[["sample_id", "n_response_tokens"]], on="sample_id")
        per_band = merged.groupby("band")["n_response_tokens"].mean()
        lengths.append({"arm": arm, **{b: round(float(per_band.get(b, float("nan"))), 1)
                                       for b in ("S1", "S2", "S3", "S4", "S5")},
                        "ρ(score, length)": round(spearman(merged["score"].to_numpy(float),
                                                           merged["n_response_tokens"].to_numpy(float)), 2)})
    # the published ranges hold for the full-size run only: --quick has other sizes
    kernels = cpu_kernels_record()
    published = None if settings.quick else load_published(
        setting_name(settings.model, settings.world if settings.model == "organism" else None))
    sqsd_row = table[table["arm"] == "SQSD"].iloc[0]
    random_row = table[table["arm"] == "Random"].iloc[0] if "Random" in arms else None
    verdict = (f"SQSD's S1 fine-tune reached {sqsd_row['S1']:.1f} % ASR and its S5 {sqsd_row['S5']:.1f} % "
               f"(Δ {sqsd_row['delta']:+.1f}, Mono {sqsd_row['mono']})")
    if random_row is not None:
        verdict += f"; a random ranking's Δ is {random_row['delta']:+.1f}"
    lines = [
        "# sqsd-ray demo: does the score predict which benign samples erode safety?", "",
        model_line, "",
        f"Corpus: {recipe.corpus_size} benign samples of {families['family'].nunique()} kinds, mixed and unlabelled"
        + (f" (world {settings.world}). " if settings.model == "organism" else ". ") +
        f"Initialisation: {init_note}",
        "", f"**Result.** {verdict}.", "",
        "![Table 1 and S1 composition](demo.png)", "",
        "## Table 1: ASR (keyword judge, greedy) on held-out harmful requests after fine-tuning on each band", "",
        f"S1 = the {recipe.corpus_size // 5} samples a ranking calls riskiest. θ0 (before fine-tuning): "
        f"{float(theta0.iloc[0]) if len(theta0) else float('nan'):.1f} % ASR.", "",
        *markdown_table(with_published_range(table, published).rename(columns={"delta": "Δ", "mono": "Mono"})), "",
        *_published_note(published), _kernels_line(kernels), "", "![ASR per band](experiment/bands.png)", "",
        "## What each ranking put in S1 (% of S1 by kind of sample; never shown to a scorer)", "",
        *markdown_table(composition), "",
        KINDS_NOTE[settings.world] if settings.model == "organism" else "Kinds: the corpus each sample came from.", "",
        "## Response length per band (App. H)", "",
        *markdown_table(pd.DataFrame(lengths)), "",
        *_mitigation_section(mitigate_dir),
        "## Directions and initialisation", "",
        "![steering](validate/steering.png)", "", "![trajectory](trajectory/trajectory.png)", "",
        "## Stage times (s)", "",
        "| " + " | ".join(seconds) + " | total |", "|" + "---|" * (len(seconds) + 1),
        "| " + " | ".join(f"{v:.0f}" for v in seconds.values()) + f" | {sum(seconds.values()):.0f} |", "",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_demo(table, composition, float(theta0.iloc[0]) if len(theta0) else None, out / "demo.png")
    summary = {"seed": settings.seed, "quick": settings.quick, "model": settings.model,
               "world": settings.world if settings.model == "organism" else None, "organism": str(organism),
               "organism_refusal_rates": refusal_rates, "init": init_note,
               "table": table.to_dict("records"), "s1_composition": composition.to_dict("records"),
               "lengths": lengths, "stage_seconds": seconds,
               "theta0_asr": float(theta0.iloc[0]) if len(theta0) else None,
               "published": published,
               "finetune_lr": base["finetune"]["train"]["lr"],
               "finetune_epochs": base["finetune"]["train"]["epochs"], "torch_threads": torch.get_num_threads(),
               "cpu_kernels": kernels,
               "mitigation": (shown(pd.read_csv(mitigate_dir / "table.csv")).to_dict("records")
                              if mitigate_dir else None)}
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=float))
    return out / "report.md"


def plot_demo(table: pd.DataFrame, composition: pd.DataFrame, theta0: float | None, path: Path) -> None:
    """Left: ASR per band for every ranking (SQSD on top). Right: what each ranking put in S1, by kind."""
    from ..scoring.summary import pyplot

    plt = pyplot()

    bands = ["S1", "S2", "S3", "S4", "S5"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.1, 1]})
    for i, (_, row) in enumerate(table.iterrows()):
        style = dict(lw=3, zorder=3, color="black") if row["arm"] == "SQSD" else dict(lw=1.2, alpha=0.7)
        if row["arm"] == "Random":
            style.update(ls="--")
        left.plot(bands, [row[b] for b in bands], marker="o", label=f"{row['arm']} (Δ {row['delta']:+.0f})", **style)
    if theta0 is not None:
        left.axhline(theta0, color="grey", ls=":", label="θ0 (before fine-tuning)")
    left.set_xlabel("risk band the model was fine-tuned on (S1 = ranked riskiest)")
    left.set_ylabel("ASR % on held-out harmful requests")
    left.set_title("Table 1: harm after fine-tuning on each band")
    left.legend(fontsize=7.5, loc="center right")
    left.grid(alpha=0.3)
    kinds = [k for k in composition.columns if k != "arm"]
    bottom = pd.Series(0.0, index=composition.index)
    others = iter(["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:gray", "tab:olive"])
    for kind in kinds:
        right.barh(composition["arm"], composition[kind], left=bottom, label=kind,
                   color="tab:red" if kind == "homonym" else next(others), alpha=0.9 if kind == "homonym" else 0.55)
        bottom = bottom + composition[kind]
    right.invert_yaxis()
    right.set_xlabel("% of S1")
    right.set_title("What each ranking put in S1 (kinds never shown to a scorer)")
    right.legend(fontsize=7.5, ncol=4, loc="lower center", bbox_to_anchor=(0.5, -0.32))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["DemoSettings", "plot_demo", "family_composition", "run_demo", "select_init_states", "write_world"]
