"""The parameter-dynamics lab (paper §3, §4.3, App. A, E): the four jobs that prepare what ``score`` needs.

    sqsd-ray directions build   LoRA SFT (V_danger) or DPO (V_safety) -> checkpoints -> direction file
    sqsd-ray directions validate  steer θ0 + α·V over an α grid, safety per α, Fig. 5, DS_linear (Eq. 26)
    sqsd-ray trajectory         benign fine-tune, per checkpoint ⟨θ_t − θ0, V̂⟩ and safety, Fig. 2, DS_drift (Eq. 27)
    sqsd-ray init select        θ_safety = θ0 + α*·V_safety and θ_danger = θ_t* from those tables, as adapters

Each job writes one run directory; ``init select`` reads the validate and trajectory directories and writes
``init_states.yaml``, a config fragment ``score`` takes as a second ``--config``. Validate and trajectory judge
their responses with ``evaluate``'s judges (``judges:``, keyword by default; the paper: LlamaGuard 3 ASR and
the beaver cost model's Safety Score); ``safety_judge`` picks the one whose metric is the safety S of Eq. 26–27.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from ..config import ConfigError, RunOutput, from_dict, help_field, prepare_run_dir, to_dict
from ..evaluation.generate import EvalSettings, GenerationSettings, StateResult, check_generation, write_responses
from ..evaluation.job import evaluate_states, judge_states
from ..evaluation.judges import JudgeSettings
from ..models.directions import Direction
from ..models.loading import ModelConfig, base_model_reference
from ..models.lora import LoraSettings, load_adapter_state, save_adapter
from ..runtime import WorkerScaling
from ..scoring.blocks import load_direction
from ..scoring.summary import save_figure
from ..training.checkpoint import ADAPTER_DIR
from ..training.config import TrainJobConfig
from ..training.loop import TrainRun, load_run, run_training
from .sensitivity import drift_norm, drift_projection, ds_drift, ds_linear, rank_drift, rank_linear

log = logging.getLogger(__name__)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def _write_csv(rows: list[dict], path: Path) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    return path


JUDGES_HELP = ("name -> judge, as in `evaluate` (kind keyword | llamaguard | cost_model, model, dtype, batch_size, "
               "...); every judge's ASR (and unparsed count) or Safety Score goes into the tables")
SAFETY_JUDGE_HELP = ("the judge whose metric is the safety S that DS differentiates: 100 − ASR (%) for keyword / "
                     "llamaguard, the Safety Score (mean −cost, Eq. 15) for cost_model; default the first judge")


def _check_judges(judges: Mapping[str, JudgeSettings], safety_judge: str | None) -> None:
    if not judges:
        raise ConfigError("judges: name at least one judge, e.g. {keyword: {kind: keyword}}")
    if safety_judge is not None and safety_judge not in judges:
        raise ConfigError(f"safety_judge {safety_judge!r} is not one of the judges {sorted(judges)}; name one of "
                          "them or leave it null (the first)")


def safety_axis(judges: Mapping[str, JudgeSettings], safety_judge: str | None = None) -> tuple[str, bool]:
    """The label of the safety axis, naming the judge, and whether it is a percentage (100 − ASR)."""
    name = safety_judge or next(iter(judges))
    judge = judges[name]
    if judge.kind == "cost_model":
        return f"Safety Score = −cost  ({name}: {Path(judge.model or '').name})", False
    what = "refusal phrases" if judge.kind == "keyword" else Path(judge.model or "").name
    return f"safety = 100 − ASR %  ({name}: {what})", True


# ------------------------------------------------------------------------------------ directions build


@dataclass
class DirectionExport:
    kind: Literal["danger", "safety"] = help_field("danger", help="what the direction encodes (recorded in the file)")
    step: int | None = help_field(
        None, help="checkpoint step to export; null = the final one (paper: final for V_danger, a model-specific "
        "intermediate checkpoint for V_safety, e.g. 9000 for Qwen3-8B)"
    )
    name: str = help_field("", help="file stem of <output.dir>/<name>.safetensors; default the kind")


@dataclass
class DirectionsBuildConfig(TrainJobConfig):
    direction: DirectionExport = field(default_factory=DirectionExport)

    def __post_init__(self) -> None:
        expected = "dpo" if self.direction.kind == "safety" else "sft"
        if self.train.objective != expected:
            log.warning("building a %s direction with train.objective=%s (the paper uses %s)", self.direction.kind,
                        self.train.objective, expected)


def export_direction(run: TrainRun, step: int | None, kind: str, out_path: Path, base_model: str) -> Direction:
    """V = θ̂ − θ0 of checkpoint ``step`` as a direction file, with the peft adapter copied beside it."""
    checkpoint = run.checkpoint(step)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    last = state["history"][-1] if state["history"] else {}
    direction = Direction.from_peft_adapter(
        checkpoint / ADAPTER_DIR, kind=kind, base_model=base_model, checkpoint=str(checkpoint),
        step=str(state["step"]), epoch=f"{state['epoch']:.3f}", train_loss=f"{last.get('loss', float('nan')):.5f}",
    )
    direction.save(out_path)
    adapter_copy = out_path.with_suffix("").with_name(out_path.stem + "_adapter")
    shutil.rmtree(adapter_copy, ignore_errors=True)
    shutil.copytree(checkpoint / ADAPTER_DIR, adapter_copy)
    log.info("%s direction from %s: ‖V‖ = %.4g -> %s", kind, checkpoint.name, direction.norm(), out_path)
    return direction


def run_directions_build(cfg: DirectionsBuildConfig) -> Path:
    run = run_training(cfg)
    out = Path(cfg.output.dir)
    path = out / f"{cfg.direction.name or cfg.direction.kind}.safetensors"
    direction = export_direction(run, cfg.direction.step, cfg.direction.kind, path, cfg.model.name_or_path)
    summary = {"direction": str(path), "kind": cfg.direction.kind, "norm": direction.norm(),
               "fingerprint": direction.fingerprint(), "checkpoint": direction.metadata["checkpoint"],
               "steps": len(run.history), "seconds": round(run.seconds, 2),
               "first_loss": run.history[0]["loss"] if run.history else None,
               "last_loss": run.history[-1]["loss"] if run.history else None,
               "checkpoints": [p.name for p in run.checkpoints]}
    (out / "direction.json").write_text(json.dumps(summary, indent=1))
    return path


# ----------------------------------------------------------------------------------- steering validation


@dataclass
class ValidateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    directions: dict[str, str] = help_field(
        {}, help="name -> direction file (or peft adapter dir); kind (danger/safety) from the file's metadata. "
        "Several safety directions (e.g. DPO checkpoints 7000/8000/9000) give Table 4's candidates."
    )
    direction_kinds: dict[str, Literal["danger", "safety"]] = help_field(
        {}, help="name -> kind, required for peft adapter dirs (which do not record it); overrides file metadata"
    )
    alphas: list[float] = help_field(
        [round(0.1 * i, 1) for i in range(0, 21)], help="steering grid α (Eq. 14); holds α ± delta for DS_linear"
    )
    delta: float = help_field(0.1, help="δ of DS_linear (Eq. 26; paper: 0.1)")
    top_k: int = help_field(5, help="rows per direction in the sensitivity table (Table 4: top-5)")
    eval: EvalSettings = field(default_factory=EvalSettings)
    judges: dict[str, JudgeSettings] = help_field({"keyword": JudgeSettings()}, help=JUDGES_HELP)
    safety_judge: str | None = help_field(None, help=SAFETY_JUDGE_HELP)
    scaling: WorkerScaling = field(default_factory=WorkerScaling)
    generation: GenerationSettings = help_field(
        default_factory=GenerationSettings, help="engine (hf | vllm: the steered states as vLLM LoRA adapters, written "
        "under output.dir while they are answered) and sampling of the responses", identity_if_set=True,
    )
    output: RunOutput = field(default_factory=lambda: RunOutput(dir="runs/validate"))

    def __post_init__(self) -> None:
        if not self.directions:
            raise ConfigError("directions: name at least one direction file, e.g. {beaver: runs/dir/danger.safetensors}")
        if len(set(self.alphas)) < 2:
            raise ConfigError("alphas: give at least two steering magnitudes")
        _check_judges(self.judges, self.safety_judge)
        check_generation(self.generation, self.model, self.scaling.use_ray, "scaling")


def _direction_kind(path: str, name: str = "", kinds: dict[str, str] | None = None) -> str:
    if kinds and name in kinds:
        return kinds[name]
    p = Path(path)
    if p.suffix == ".safetensors":
        return Direction.read_header(p)["metadata"].get("kind", "danger")
    raise ConfigError(f"direction {name!r} is a peft adapter dir, which does not record whether it is a danger or a "
                      f"safety direction: set direction_kinds.{name}, or export it with `sqsd-ray directions export`")


def _absolute(paths: dict[str, str]) -> dict[str, str]:
    """Direction paths as absolute paths: run configs are read later, maybe from another directory."""
    return {name: str(Path(p).resolve()) for name, p in paths.items()}


def run_validate(cfg: ValidateConfig) -> Path:
    """Safety of θ0 + α·V for every direction and α; Fig. 5, DS_linear table (Table 4 style)."""
    from ..models.directions import init_state_from_direction

    out = prepare_run_dir(cfg.output.dir, cfg.output.overwrite)
    cfg = replace(cfg, directions=_absolute(cfg.directions))
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    directions = {name: load_direction(path, _direction_kind(path, name, cfg.direction_kinds))
                  for name, path in cfg.directions.items()}
    alphas = sorted(set(cfg.alphas))
    states: dict[str, dict | None] = {"alpha=0": None}  # θ0 is shared by every direction
    for name, direction in directions.items():
        for alpha in alphas:
            if alpha != 0:
                states[f"{name}@{alpha:g}"] = init_state_from_direction(direction, alpha, cfg.lora.scaling, cfg.lora.r)
    generated = evaluate_states(cfg.model, cfg.lora, states, cfg.eval, cfg.scaling, cfg.generation, out)
    results = {r.name: r for r in judge_states(generated, cfg.judges, cfg.safety_judge, cfg.scaling, cfg.eval.label)}
    write_responses(list(results.values()), out / "responses.jsonl")

    steering, table = [], []
    for name, direction in directions.items():
        kind = direction.kind or "danger"
        curve = {a: results["alpha=0" if a == 0 else f"{name}@{a:g}"] for a in alphas}
        steering += [{"direction": name, "kind": kind, "alpha": a, "judge": r.judge, "asr": r.asr, "safety": r.safety,
                      "n": r.n, "projection": a * direction.norm(), **r.metrics} for a, r in curve.items()]
        sens = ds_linear({a: r.safety for a, r in curve.items()}, cfg.delta)
        top = {s.alpha: i + 1 for i, s in enumerate(rank_linear(sens, len(sens)))}
        table += [{"direction": name, "kind": kind, **asdict(s), "rank": top.get(s.alpha)} for s in sens]
    _write_csv(steering, out / "steering.csv")
    _write_csv(table, out / "sensitivity_linear.csv")
    label, percent = safety_axis(cfg.judges, cfg.safety_judge)
    plot_steering(steering, out / "steering.png", label, percent)
    (out / "sensitivity.md").write_text(_linear_table_md(table, cfg.top_k, cfg.delta, label))
    log.info("validation written to %s", out)
    return out


def _linear_table_md(table: list[dict], top_k: int, delta: float, safety: str = "") -> str:
    lines = [f"# Linear-path directional sensitivity (Eq. 26, δ = {delta:g})", "",
             "Top α per direction by DS_linear (higher: safety responds more to a step along V). For danger "
             "directions the most negative values matter; their rows are listed for completeness.", "",
             *([f"S(θ): {safety}.", ""] if safety else []),
             "| direction | kind | rank | α | DS_linear | S(α−δ) | S(α+δ) |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["direction"] for r in table):
        ranked = sorted((r for r in table if r["direction"] == name and r["rank"]), key=lambda r: r["rank"])[:top_k]
        for r in ranked:
            lines.append(f"| {name} | {r['kind']} | {r['rank']} | {r['alpha']:g} | {r['ds']:.3f} | "
                         f"{r['safety_minus']:.1f} | {r['safety_plus']:.1f} |")
        if not ranked:
            lines.append(f"| {name} | | | | no α > 0 with both neighbours on the grid | | |")
    return "\n".join(lines) + "\n"


def plot_steering(rows: list[dict], path: Path, safety_label: str = "safety = 100 − ASR %  (keyword: refusal phrases)",
                  percent: bool = True) -> Path:
    """Fig. 5: safety as a function of the steering magnitude α, one line per direction; ``safety_label`` names
    the judge (``safety_axis``), ``percent`` fixes the axis to 0–100."""
    from ..scoring.summary import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["direction"] for r in rows):
        curve = sorted((r["alpha"], r["safety"]) for r in rows if r["direction"] == name)
        kind = next(r["kind"] for r in rows if r["direction"] == name)
        ax.plot(*zip(*curve), marker="o", ms=3, label=f"{name} ({kind})",
                ls="-" if kind == "safety" else "--")
    ax.set_xlabel("steering magnitude α  (θ0 + α·V)")
    ax.set_ylabel(safety_label, fontsize=8)
    if percent:
        ax.set_ylim(-3, 103)
    ax.set_title("Parameter steering along each direction")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ trajectory


@dataclass
class TrajectoryConfig(TrainJobConfig):
    directions: dict[str, str] = help_field({}, help="name -> direction file: the directions to project the drift on")
    from_run: str | None = help_field(
        None, help="analyse the checkpoints of this finished training run dir instead of training (model, lora "
        "and data must be those of that run)"
    )
    evaluate: bool = help_field(True, help="measure safety at every checkpoint (needed for DS_drift)")
    eval: EvalSettings = field(default_factory=EvalSettings)
    judges: dict[str, JudgeSettings] = help_field({"keyword": JudgeSettings()}, help=JUDGES_HELP)
    safety_judge: str | None = help_field(None, help=SAFETY_JUDGE_HELP)
    top_k: int = help_field(5, help="rows per direction in the sensitivity table (Table 5: top-5)")

    def __post_init__(self) -> None:
        if not self.directions:
            raise ConfigError("directions: name at least one direction file to project the drift on")
        _check_judges(self.judges, self.safety_judge)


def run_trajectory(cfg: TrajectoryConfig) -> Path:
    """Benign fine-tune with checkpoints every k steps; projections, safety, Fig. 2 and DS_drift (Table 5 style)."""
    run = load_run(cfg.from_run) if cfg.from_run else run_training(cfg)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, directions=_absolute(cfg.directions))
    (out / "trajectory_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    directions = {name: load_direction(path, _direction_kind(path, name)) for name, path in cfg.directions.items()}
    states: dict[str, dict | None] = {"step-000000": None}
    points = [{"step": 0, "checkpoint": "", "drift_norm": 0.0, **{f"proj_{n}": 0.0 for n in directions}}]
    for checkpoint in run.checkpoints:
        factors, info = load_adapter_state(checkpoint / ADAPTER_DIR)
        row = {"step": _step_of(checkpoint), "checkpoint": str(checkpoint.resolve()),
               "drift_norm": drift_norm(factors, info.module_scalings)}
        for name, direction in directions.items():
            row[f"proj_{name}"] = drift_projection(factors, info.module_scalings, direction)
        points.append(row)
        states[checkpoint.name] = factors
    if cfg.evaluate:
        generated = evaluate_states(cfg.model, cfg.lora, states, cfg.eval, cfg.scaling)
        results: list[StateResult] = judge_states(generated, cfg.judges, cfg.safety_judge, cfg.scaling,
                                                  cfg.eval.label)
        write_responses(results, out / "responses.jsonl")
        for row, result in zip(points, results):
            row.update(judge=result.judge, asr=result.asr, safety=result.safety, **result.metrics)
    _write_csv(points, out / "trajectory.csv")
    label, percent = safety_axis(cfg.judges, cfg.safety_judge)
    table = []
    if cfg.evaluate:
        for name, direction in directions.items():
            sens = ds_drift([p["step"] for p in points], [p["safety"] for p in points],
                            [p[f"proj_{name}"] for p in points])
            top = {s.step: i + 1 for i, s in enumerate(rank_drift(sens, len(sens)))}
            table += [{"direction": name, "kind": direction.kind or "danger", **asdict(s), "rank": top.get(s.step)}
                      for s in sens]
        _write_csv(table, out / "sensitivity_drift.csv")
        (out / "sensitivity.md").write_text(_drift_table_md(table, cfg.top_k, label))
    plot_trajectory(points, list(directions), out / "trajectory.png", label, percent)
    log.info("trajectory of %d checkpoints written to %s", len(run.checkpoints), out)
    return out


def _drift_table_md(table: list[dict], top_k: int, safety: str = "") -> str:
    lines = ["# Drift-enhanced directional sensitivity (Eq. 27)", "",
             "Top checkpoints per direction by DS_drift, most negative first (safety lost per unit of drift along "
             "V̂). Only negative values qualify; step 0 (θ0) is left out.", "",
             *([f"S(θ): {safety}.", ""] if safety else []),
             "| direction | kind | rank | step t | t + a | DS_drift | S(t) | S(t+a) | p(t) | p(t+a) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["direction"] for r in table):
        ranked = sorted((r for r in table if r["direction"] == name and r["rank"]), key=lambda r: r["rank"])[:top_k]
        for r in ranked:
            lines.append(f"| {name} | {r['kind']} | {r['rank']} | {r['step']} | {r['next_step']} | {r['ds']:.3f} | "
                         f"{r['safety']:.1f} | {r['next_safety']:.1f} | {r['projection']:.4g} | "
                         f"{r['next_projection']:.4g} |")
        if not ranked:
            lines.append(f"| {name} | | | | | no checkpoint loses safety along this direction | | | | |")
    return "\n".join(lines) + "\n"


def _draw_trajectory(ax, points: list[dict], names: list[str], title: str, safety_label: str, percent: bool) -> None:
    steps = [p["step"] for p in points]
    for name in names:
        ax.plot(steps, [p[f"proj_{name}"] for p in points], marker="o", ms=3, label=f"⟨Δθ, V̂_{name}⟩")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("projection of the drift")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    if "safety" in points[0]:
        twin = ax.twinx()
        twin.plot(steps, [p["safety"] for p in points], color="black", lw=1.5, ls=":", label="safety")
        twin.set_ylabel(safety_label, fontsize=8)
        if percent:
            twin.set_ylim(-3, 103)
        twin.legend(loc="lower right", fontsize=7)


def plot_trajectory(points: list[dict], names: list[str], path: Path,
                    safety_label: str = "safety = 100 − ASR %  (keyword: refusal phrases)", percent: bool = True) -> Path:
    """Fig. 2: ⟨θ_t − θ0, V̂⟩ per direction against the step, and safety on a second axis (``safety_axis``)."""
    from ..scoring.summary import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _draw_trajectory(ax, points, names, "Parameter drift along safety-related directions", safety_label, percent)
    return save_figure(fig, path)


def plot_trajectory_grid(run_dirs: list[Path], path: Path, columns: int = 2) -> Path:
    """Fig. 3: the trajectories of several runs (models × data sets) side by side, one panel per run."""
    import pandas as pd

    from ..scoring.summary import pyplot

    plt = pyplot()

    rows = -(-len(run_dirs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4 * rows), squeeze=False)
    for ax, run_dir in zip(axes.flat, run_dirs):
        table = run_dir / "trajectory.csv"
        if not table.is_file():
            raise FileNotFoundError(f"{table} is missing: {run_dir} is not a trajectory run directory")
        points = pd.read_csv(table).to_dict("records")
        names = [c.removeprefix("proj_") for c in points[0] if c.startswith("proj_")]
        config = yaml.safe_load((run_dir / "trajectory_config.yaml").read_text())
        judges = {n: from_dict(JudgeSettings, j) for n, j in config.get("judges", {"keyword": {}}).items()}
        _draw_trajectory(ax, points, names, f"{config['model']['name_or_path']} · {Path(config['data']['path']).name}",
                         *safety_axis(judges, config.get("safety_judge")))
    for ax in list(axes.flat)[len(run_dirs):]:
        ax.axis("off")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------ init selection


@dataclass
class InitSelectConfig:
    validate_dir: str = help_field("", help="run dir of `directions validate` (sensitivity_linear.csv, config.yaml)")
    trajectory_dir: str = help_field("", help="run dir of `trajectory` (sensitivity_drift.csv, checkpoints)")
    safety_direction: str | None = help_field(
        None, help="name (in the validate run) of V_safety; default: the safety direction with the highest DS_linear"
    )
    danger_direction: str | None = help_field(
        None, help="name (in the trajectory run) of V_danger; required when the trajectory projected on several"
    )
    safety_pick: int = help_field(1, help="take the k-th most sensitive α (paper: top-1, sometimes top-3/4)")
    danger_pick: int = help_field(1, help="take the k-th most sensitive checkpoint")
    top_k: int = help_field(5, help="candidates listed in selection.json / sensitivity.md")
    output: RunOutput = field(default_factory=lambda: RunOutput(dir="runs/init"))

    def __post_init__(self) -> None:
        if not self.validate_dir or not self.trajectory_dir:
            raise ConfigError("init select needs validate_dir and trajectory_dir (outputs of the two jobs)")
        if self.safety_pick < 1 or self.danger_pick < 1:
            raise ConfigError("safety_pick and danger_pick are 1-based ranks")


SELECTION_RULE = (
    "θ_safety = θ0 + α*·V_safety with α* the safety_pick-th α > 0 ranked by DS_linear (Eq. 26) descending, among "
    "the safety-kind directions of the validate run (or the one named); DS_linear must be > 0. θ_danger = θ_t* "
    "with t* the danger_pick-th checkpoint t > 0 ranked by DS_drift(t) (Eq. 27) ascending (most negative first; "
    "only negative values qualify) for the chosen danger direction. Ties: smaller α, earlier step."
)


def run_init_select(cfg: InitSelectConfig) -> Path:
    import pandas as pd

    from ..models.directions import init_state_from_direction

    validate_dir, trajectory_dir = Path(cfg.validate_dir), Path(cfg.trajectory_dir)
    for path in (validate_dir / "sensitivity_linear.csv", trajectory_dir / "sensitivity_drift.csv"):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `directions validate` / `trajectory` (with evaluation) first")
    out = prepare_run_dir(cfg.output.dir, cfg.output.overwrite)
    validate_cfg = yaml.safe_load((validate_dir / "config.yaml").read_text())
    trajectory_cfg = yaml.safe_load((trajectory_dir / "trajectory_config.yaml").read_text())

    linear = pd.read_csv(validate_dir / "sensitivity_linear.csv")
    linear = linear[(linear["kind"] == "safety") & (linear["alpha"] > 0) & (linear["ds"] > 0)]
    if cfg.safety_direction is not None:
        if cfg.safety_direction not in validate_cfg["directions"]:
            raise ConfigError(f"safety_direction {cfg.safety_direction!r} is not in the validate run "
                              f"(directions: {sorted(validate_cfg['directions'])})")
        linear = linear[linear["direction"] == cfg.safety_direction]
    linear = linear.sort_values(["ds", "alpha"], ascending=[False, True])
    if len(linear) < cfg.safety_pick:
        raise ValueError(f"{validate_dir}: only {len(linear)} α > 0 with DS_linear > 0 for a safety direction; the "
                         f"safety direction does not make the model safer there (widen the α grid or rebuild it)")
    safety_row = linear.iloc[cfg.safety_pick - 1]

    drift = pd.read_csv(trajectory_dir / "sensitivity_drift.csv")
    names = list(dict.fromkeys(drift["direction"]))
    danger_name = cfg.danger_direction or (names[0] if len(names) == 1 else None)
    if danger_name is None or danger_name not in names:
        raise ConfigError(f"danger_direction: choose one of the trajectory's directions {names}")
    drift = drift[(drift["direction"] == danger_name) & (drift["step"] > 0) & (drift["ds"] < 0)]
    drift = drift.sort_values(["ds", "step"])
    if len(drift) < cfg.danger_pick:
        raise ValueError(f"{trajectory_dir}: only {len(drift)} checkpoints with DS_drift < 0 along {danger_name!r}; "
                         "safety did not fall with the drift (train longer, or evaluate more prompts)")
    danger_row = drift.iloc[cfg.danger_pick - 1]

    lora = LoraSettings(**validate_cfg["lora"])
    safety_path = validate_cfg["directions"][safety_row["direction"]]
    v_safety = load_direction(safety_path, "safety")
    factors = init_state_from_direction(v_safety, float(safety_row["alpha"]), lora.scaling, lora.r)
    base = base_model_reference(from_dict(ModelConfig, validate_cfg["model"]))
    save_adapter(factors, lora, out / "init_safety", base.name_or_path, base.revision)
    points = pd.read_csv(trajectory_dir / "trajectory.csv")
    checkpoint = Path(points.loc[points["step"] == int(danger_row["step"]), "checkpoint"].iloc[0])
    shutil.copytree(checkpoint / ADAPTER_DIR, out / "init_danger")

    selection = {
        "rule": SELECTION_RULE,
        "safety": {"direction": safety_row["direction"], "path": str(Path(safety_path).resolve()), "alpha": float(safety_row["alpha"]),
                   "ds_linear": float(safety_row["ds"]), "pick": cfg.safety_pick, "adapter": str(out / "init_safety"),
                   "candidates": linear.head(cfg.top_k).to_dict("records")},
        "danger": {"direction": danger_name, "path": str(Path(trajectory_cfg["directions"][danger_name]).resolve()),
                   "step": int(danger_row["step"]), "ds_drift": float(danger_row["ds"]), "pick": cfg.danger_pick,
                   "checkpoint": str(checkpoint), "adapter": str(out / "init_danger"),
                   "candidates": drift.head(cfg.top_k).to_dict("records")},
        "validate_dir": str(validate_dir), "trajectory_dir": str(trajectory_dir),
    }
    (out / "selection.json").write_text(json.dumps(selection, indent=1, default=float))
    for side in ("safety", "danger"):  # each adapter carries its own provenance
        record = {k: v for k, v in selection[side].items() if k != "candidates"}
        (out / f"init_{side}" / "sqsd_init_state.json").write_text(json.dumps({**record, "rule": SELECTION_RULE},
                                                                              indent=1, default=float))
    fragment = {
        "directions": {"danger": selection["danger"]["path"], "safety": selection["safety"]["path"]},
        "init_states": {"danger": {"kind": "adapter", "path": str((out / "init_danger").resolve())},
                        "safety": {"kind": "adapter", "path": str((out / "init_safety").resolve())}},
    }
    (out / "init_states.yaml").write_text(
        "# θ_danger and θ_safety chosen by `sqsd-ray init select` (see selection.json); use as\n"
        f"#   sqsd-ray score --config <job>.yaml --config {out / 'init_states.yaml'}\n"
        + yaml.safe_dump(fragment, sort_keys=False))
    log.info("θ_safety: %s at α* = %g (DS_linear %.3f); θ_danger: %s checkpoint %d (DS_drift %.3f)",
             safety_row["direction"], safety_row["alpha"], safety_row["ds"], danger_name, danger_row["step"],
             danger_row["ds"])
    return out


__all__ = [
    "DirectionExport",
    "DirectionsBuildConfig",
    "InitSelectConfig",
    "RunOutput",
    "SELECTION_RULE",
    "TrajectoryConfig",
    "ValidateConfig",
    "export_direction",
    "plot_trajectory_grid",
    "run_directions_build",
    "run_init_select",
    "run_trajectory",
    "run_validate",
    "safety_axis",
]
