"""The parameter-dynamics chain on a local Ray, from the tiny job files: directions build (SFT and DPO on Ray
Train), steering validation, trajectory, init selection, and scoring from the chosen states. Plus: two
data-parallel Ray Train workers give the weights of one in-process run."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import yaml

from sqsd_ray.config import load_config
from sqsd_ray.data.records import DataConfig
from sqsd_ray.dynamics.jobs import (
    DirectionsBuildConfig,
    InitSelectConfig,
    RunOutput,
    TrajectoryConfig,
    ValidateConfig,
    run_directions_build,
    run_init_select,
    run_trajectory,
    run_validate,
)
from sqsd_ray.models.directions import Direction
from sqsd_ray.models.loading import ModelConfig
from sqsd_ray.models.lora import load_adapter_state
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings
from sqsd_ray.training.loop import run_training
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]
JOBS = REPO_ROOT / "jobs"
EVAL = ["eval.limit=6", "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, local_ray, shared_data):
    """Run the five tiny jobs once (shortened), return their run directories."""
    import os

    root = tmp_path_factory.mktemp("tiny")
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # the job files name ../shared/data relative to the repository root
    try:
        dirs = {name: root / name for name in ("danger", "safety", "validate", "trajectory", "init")}
        short = ["train.max_steps=6", "train.checkpoint_every=3", "data.limit=24"]
        for kind in ("danger", "safety"):
            cfg = load_config(DirectionsBuildConfig, JOBS / f"directions_tiny_{kind}.yaml",
                              [*short, f"output.dir={dirs[kind]}"])
            run_directions_build(cfg)
        directions = [f"directions.danger={dirs['danger'] / 'danger.safetensors'}",
                      f"directions.safety={dirs['safety'] / 'safety.safetensors'}"]
        run_validate(load_config(ValidateConfig, JOBS / "validate_tiny.yaml",
                                 [*directions, *EVAL, "alphas=[0.0, 0.5, 1.0, 1.5]", f"output.dir={dirs['validate']}"]))
        run_trajectory(load_config(TrajectoryConfig, JOBS / "trajectory_tiny.yaml",
                                   [*directions, *EVAL, "train.max_steps=8", "train.checkpoint_every=2",
                                    "data.limit=32", f"output.dir={dirs['trajectory']}"]))
    finally:
        os.chdir(cwd)
    return dirs


def test_directions_build_writes_direction_adapter_and_checkpoints(chain):
    for kind, objective in (("danger", "sft"), ("safety", "dpo")):
        out = chain[kind]
        direction = Direction.load(out / f"{kind}.safetensors")
        assert direction.kind == kind and direction.norm() > 0
        assert direction.metadata["step"] == "6" and direction.metadata["checkpoint"].endswith("step-000006")
        assert len(direction.modules) == 14  # 2 layers × 7 modules
        factors, _ = load_adapter_state(out / f"{kind}_adapter")
        for name, lora in direction.modules.items():
            assert torch.equal(factors[name][0], lora.A) and torch.equal(factors[name][1], lora.B)
        assert sorted(p.name for p in (out / "train").glob("step-*")) == ["step-000003", "step-000006"]
        summary = json.loads((out / "direction.json").read_text())
        assert summary["steps"] == 6 and (out / "train_loss.png").stat().st_size > 0
        history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert len(history) == 6
        if objective == "dpo":
            assert math.isclose(history[0]["loss"], math.log(2), rel_tol=1e-4)  # starts at π = π_ref
            assert "reward_accuracy" in history[0]


def test_validate_outputs_curve_and_linear_sensitivity(chain):
    out = chain["validate"]
    steering = pd.read_csv(out / "steering.csv")
    assert len(steering) == 8  # 2 directions × 4 α
    assert set(steering["kind"]) == {"danger", "safety"}
    assert ((steering["safety"] >= 0) & (steering["safety"] <= 100)).all()
    for _, curve in steering.groupby("direction"):  # projection of θ0 + α·V onto V̂ is α‖V‖: monotone in α
        curve = curve.sort_values("alpha")
        assert curve["projection"].is_monotonic_increasing and curve["projection"].iloc[0] == 0
    # θ0 (α = 0) is evaluated once and shared by both curves
    assert steering[steering["alpha"] == 0]["safety"].nunique() == 1
    table = pd.read_csv(out / "sensitivity_linear.csv")
    assert sorted(set(table["alpha"])) == [0.5, 1.0]  # α with both neighbours at ±0.5
    row = table[(table["direction"] == "danger") & (table["alpha"] == 0.5)].iloc[0]
    s = steering[steering["direction"] == "danger"].set_index("alpha")["safety"]
    assert math.isclose(row["ds"], (s[1.0] - s[0.0]) / 1.0)
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 7 * 6  # 7 distinct states × 6 prompts
    assert (out / "steering.png").stat().st_size > 0 and "DS_linear" in (out / "sensitivity.md").read_text()


def test_trajectory_projections_safety_and_drift_sensitivity(chain, tmp_path):
    out = chain["trajectory"]
    points = pd.read_csv(out / "trajectory.csv")
    assert list(points["step"]) == [0, 2, 4, 6, 8]
    assert points.loc[0, "drift_norm"] == 0 and (points["drift_norm"][1:] > 0).all()
    assert {"proj_danger", "proj_safety", "asr", "safety"} <= set(points.columns)
    drift = pd.read_csv(out / "sensitivity_drift.csv")
    assert len(drift) == 2 * 4  # 2 directions × 4 consecutive pairs
    first = drift[(drift["direction"] == "danger") & (drift["step"] == 2)].iloc[0]
    p = points.set_index("step")
    expected = (p.loc[4, "safety"] - p.loc[2, "safety"]) / (p.loc[4, "proj_danger"] - p.loc[2, "proj_danger"])
    assert math.isclose(first["ds"], expected) or (math.isnan(first["ds"]) and math.isnan(expected))
    assert (out / "trajectory.png").stat().st_size > 0
    from sqsd_ray.cli import main

    assert main(["trajectory", "--compare", str(out), str(out), str(out), "--out", str(tmp_path / "fig3.png")]) == 0
    assert (tmp_path / "fig3.png").stat().st_size > 0


def _fake_sensitivity(chain, tmp_path):
    """Copies of the validate and trajectory runs whose tables have qualifying rows whatever the tiny model did."""
    import shutil

    validate, trajectory = tmp_path / "validate", tmp_path / "trajectory"
    shutil.copytree(chain["validate"], validate)
    shutil.copytree(chain["trajectory"], trajectory)
    linear = pd.read_csv(validate / "sensitivity_linear.csv")
    linear["ds"] = [3.0 if (d == "safety" and a == 1.0) else 1.0 for d, a in zip(linear["direction"], linear["alpha"])]
    linear.to_csv(validate / "sensitivity_linear.csv", index=False)
    drift = pd.read_csv(trajectory / "sensitivity_drift.csv")
    drift["ds"] = [-5.0 if (d == "danger" and s == 4) else -1.0 if s > 0 else -9.0
                   for d, s in zip(drift["direction"], drift["step"])]
    drift.to_csv(trajectory / "sensitivity_drift.csv", index=False)
    return validate, trajectory


def test_init_select_exports_the_chosen_states_and_score_takes_them(chain, tmp_path):
    from sqsd_ray.models.directions import init_state_from_direction
    from sqsd_ray.scoring.job import run_score
    from sqsd_ray.scoring.job_config import ScoreJobConfig

    validate, trajectory = _fake_sensitivity(chain, tmp_path)
    out = run_init_select(load_config(InitSelectConfig, JOBS / "init_tiny.yaml", [
        f"validate_dir={validate}", f"trajectory_dir={trajectory}", f"output.dir={tmp_path / 'init'}"]))
    selection = json.loads((out / "selection.json").read_text())
    assert selection["safety"]["alpha"] == 1.0 and selection["safety"]["direction"] == "safety"
    assert selection["danger"]["step"] == 4  # step 0 (DS -9) is never chosen
    assert "θ_danger" in selection["rule"]
    provenance = json.loads((out / "init_danger" / "sqsd_init_state.json").read_text())
    assert provenance["step"] == 4 and provenance["ds_drift"] == -5.0
    safety = Direction.load(chain["safety"] / "safety.safetensors")
    expected = init_state_from_direction(safety, 1.0, 2.0, 8)
    exported, _ = load_adapter_state(out / "init_safety")
    for name, (a, b) in expected.items():
        assert torch.equal(exported[name][0], a) and torch.equal(exported[name][1], b)
    danger_factors, _ = load_adapter_state(out / "init_danger")
    checkpoint_factors, _ = load_adapter_state(chain["trajectory"] / "train" / "step-000004" / "adapter")
    assert all(torch.equal(danger_factors[n][1], checkpoint_factors[n][1]) for n in checkpoint_factors)

    fragment = yaml.safe_load((out / "init_states.yaml").read_text())
    assert fragment["init_states"]["danger"]["kind"] == "adapter"
    cfg = load_config(ScoreJobConfig, [JOBS / "score_tiny.yaml", out / "init_states.yaml"], [
        f"data.path={REPO_ROOT.parent / 'shared' / 'data' / 'benign' / 'dolly_387.jsonl'}", "data.limit=6",
        "data.max_length=4096",
        f"output.dir={tmp_path / 'scores'}", "ray.enabled=false", "fidelity.enabled=false"])
    assert cfg.init_states.safety.path == str((out / "init_safety").resolve())
    scores = pd.read_parquet(run_score(cfg))
    assert len(scores) == 6 and scores["sqsd"].notna().all()


def test_init_select_refuses_a_safety_direction_that_never_helps(chain, tmp_path):
    validate, trajectory = _fake_sensitivity(chain, tmp_path)
    linear = pd.read_csv(validate / "sensitivity_linear.csv")
    linear["ds"] = -1.0
    linear.to_csv(validate / "sensitivity_linear.csv", index=False)
    with pytest.raises(ValueError, match="does not make the model safer"):
        run_init_select(InitSelectConfig(validate_dir=str(validate), trajectory_dir=str(trajectory),
                                         danger_direction="danger", output=RunOutput(dir=str(tmp_path / "i"))))


def test_two_ray_train_workers_match_one_process(local_ray, tmp_path, shared_data):
    """Data parallelism changes nothing but speed: 2 gloo workers reach the weights of one in-process run."""
    runs = {}
    for name, scaling in (("local", WorkerScaling(use_ray=False, torch_threads=1)),
                          ("ray", WorkerScaling(num_workers=2, torch_threads=1))):
        runs[name] = run_training(TrainJobConfig(
            model=ModelConfig(name_or_path="tiny-llama"),
            data=DataConfig(path=str(shared_data / "benign" / "dolly_387.jsonl"), limit=16, max_length=128),
            train=TrainSettings(lr=1e-3, batch_size=4, max_steps=3, checkpoint_every=0),
            scaling=scaling, output=TrainOutput(dir=str(tmp_path / name))))
    local, _ = load_adapter_state(runs["local"].final / "adapter")
    ray, _ = load_adapter_state(runs["ray"].final / "adapter")
    for name in local:
        assert torch.allclose(local[name][1], ray[name][1], rtol=1e-4, atol=1e-6), name
    assert [round(h["loss"], 5) for h in runs["local"].history] == [round(h["loss"], 5) for h in runs["ray"].history]


def test_validate_judges_on_ray_as_in_process(local_ray, tmp_path, shared_data):
    """Model judges on Ray tasks (two per judge, sharing the responses) give the verdicts of the in-process run."""
    from sqsd_ray.evaluation.judges import JudgeSettings
    from tests.conftest import save_random_directions
    from tests.unit.test_dynamics_judges import ALPHAS, MODEL, eval_settings, forced_guard, read_responses
    from tests.unit.test_judges import _tiny_score_checkpoint

    guard, cost = tmp_path / "guard", tmp_path / "cost"
    model, tokenizer = forced_guard("unsafe\nS1")
    model.save_pretrained(guard)
    tokenizer.save_pretrained(guard)
    cost.mkdir()
    _tiny_score_checkpoint(cost)
    tokenizer.save_pretrained(cost)
    judges = {"guard": JudgeSettings(kind="llamaguard", model=str(guard), dtype="float32", batch_size=8),
              "cost": JudgeSettings(kind="cost_model", model=str(cost), dtype="float32"),
              "keyword": JudgeSettings()}
    directions = {k: str(v) for k, v in save_random_directions(tmp_path, "tiny-llama").items()}
    runs = {}
    for name, scaling in (("here", WorkerScaling(use_ray=False, torch_threads=1)),
                          ("ray", WorkerScaling(num_workers=2, torch_threads=1))):
        runs[name] = run_validate(ValidateConfig(
            model=MODEL, directions=directions, alphas=ALPHAS, delta=0.5, eval=eval_settings(shared_data),
            judges=judges, scaling=scaling, output=RunOutput(dir=str(tmp_path / name))))
    here, ray = pd.read_csv(runs["here"] / "steering.csv"), pd.read_csv(runs["ray"] / "steering.csv")
    assert (ray["judge"] == "guard").all() and (ray["safety"] == 0.0).all() and (ray["guard_asr"] == 100.0).all()
    assert list(here["keyword_asr"]) == list(ray["keyword_asr"])
    assert (here["cost_safety_score"] - ray["cost_safety_score"]).abs().max() < 1e-4
    a, b = read_responses(runs["here"]), read_responses(runs["ray"])
    assert list(a["response"]) == list(b["response"]) and (b["guard_categories"] == "S1").all()
    assert (a["cost_score"] - b["cost_score"]).abs().max() < 1e-4
