"""`directions validate` and `trajectory` judged like `evaluate`: each judge kind (keyword, a tiny Llama Guard-class
causal LM, a tiny safe-rlhf-class score model, both loaded from directories by `build_judge`) on a tiny Llama,
in this process. Oracles: a guard whose answer is forced ("safe" / "unsafe\\nS1"), and every state's ASR /
Safety Score recomputed by calling `build_judge` directly on the responses the run wrote."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from sqsd_ray.config import ConfigError, RunOutput
from sqsd_ray.data.records import DataConfig
from sqsd_ray.dynamics.jobs import TrajectoryConfig, ValidateConfig, run_trajectory, run_validate, safety_axis
from sqsd_ray.evaluation.generate import EvalSettings
from sqsd_ray.evaluation.judges import JudgeSettings, build_judge, llama_guard_prompt, summarise
from sqsd_ray.models.loading import ModelConfig
from sqsd_ray.models.tiny import build_tiny_model, build_tiny_tokenizer
from sqsd_ray.runtime import WorkerScaling
from sqsd_ray.training.config import TrainJobConfig, TrainOutput, TrainSettings
from sqsd_ray.training.loop import run_training
from tests.conftest import save_random_directions
from tests.unit.test_judges import _tiny_score_checkpoint

MODEL = ModelConfig(name_or_path="tiny-llama")
HERE = WorkerScaling(use_ray=False, torch_threads=1)
ALPHAS = [0.0, 0.5, 1.0]
N_PROMPTS = 3


def forced_guard(answer: str, seed: int = 0):
    """A tiny Llama that greedily answers ``answer`` to every Llama Guard prompt, then ends its turn.

    Attention and MLP outputs are zeroed, so the residual stream at each position is the embedding of that
    token; embeddings are orthogonal unit vectors for the chain prompt-end -> answer tokens -> eos, and the LM
    head maps each to the next token of the chain (eos to itself)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", seed=seed)
    last = tokenizer(llama_guard_prompt("q", "a"), add_special_tokens=False)["input_ids"][-1]
    chain = [last, *tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain) <= model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        for i, token in enumerate(chain):
            embed[token, i] = 1.0
            head[chain[i + 1] if i + 1 < len(chain) else token, i] = 10.0
    return model, tokenizer


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory):
    """Judge model directories, saved the way the real checkpoints are: two forced guards and a score model."""
    root = tmp_path_factory.mktemp("judges")
    for answer, name in (("safe", "guard_safe"), ("unsafe\nS1", "guard_unsafe")):
        model, tokenizer = forced_guard(answer)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "cost").mkdir()
    _tiny_score_checkpoint(root / "cost")
    build_tiny_tokenizer().save_pretrained(root / "cost")
    return root


def judge_table(judge_dirs) -> dict[str, dict[str, JudgeSettings]]:
    """One `judges:` setting per judge kind, as a job file would give it."""
    return {
        "keyword": {"keyword": JudgeSettings()},
        "llamaguard": {"guard": JudgeSettings(kind="llamaguard", model=str(judge_dirs / "guard_safe"),
                                              dtype="float32", batch_size=8)},
        "cost_model": {"cost": JudgeSettings(kind="cost_model", model=str(judge_dirs / "cost"), dtype="float32")},
    }


@pytest.fixture(scope="module")
def directions(tmp_path_factory):
    paths = save_random_directions(tmp_path_factory.mktemp("directions"), "tiny-llama")
    return {kind: str(path) for kind, path in paths.items()}


@pytest.fixture(scope="module")
def pilot_run(tmp_path_factory, shared_data):
    """A two-checkpoint benign fine-tune that every trajectory test analyses (``from_run``)."""
    out = tmp_path_factory.mktemp("pilot")
    run_training(TrainJobConfig(
        model=MODEL, data=DataConfig(path=str(shared_data / "benign" / "dolly_387.jsonl"), limit=8, max_length=128),
        train=TrainSettings(lr=1e-2, batch_size=4, max_steps=2, checkpoint_every=1, lr_schedule="constant"),
        scaling=HERE, output=TrainOutput(dir=str(out))))
    return out


def eval_settings(shared_data) -> EvalSettings:
    return EvalSettings(benchmark="catqa", path=str(shared_data / "eval" / "catqa_english.json"), limit=N_PROMPTS,
                        max_new_tokens=4, batch_size=N_PROMPTS)


def validate(judges, directions, shared_data, out, **extra):
    return run_validate(ValidateConfig(model=MODEL, directions=directions, alphas=ALPHAS, delta=0.5,
                                       eval=eval_settings(shared_data), judges=judges, scaling=HERE,
                                       output=RunOutput(dir=str(out)), **extra))


def trajectory(judges, directions, shared_data, pilot_run, out, **extra):
    return run_trajectory(TrajectoryConfig(
        model=MODEL, data=DataConfig(path=str(shared_data / "benign" / "dolly_387.jsonl"), limit=8, max_length=128),
        directions=directions, from_run=str(pilot_run), eval=eval_settings(shared_data), judges=judges,
        scaling=HERE, output=TrainOutput(dir=str(out)), **extra))


def read_responses(out) -> pd.DataFrame:
    return pd.DataFrame([json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()])


def direct_safety(responses: pd.DataFrame, judge: JudgeSettings) -> dict[str, tuple[float, float]]:
    """Oracle: state -> (ASR, safety) from build_judge called directly on the responses the run wrote."""
    judged = build_judge(judge)
    out = {}
    for state, rows in responses.groupby("state"):
        summary = summarise(judged.judge(list(zip(rows["prompt"], rows["response"]))))
        out[state] = ((math.nan, summary.safety_score) if judge.kind == "cost_model"
                      else (summary.asr, 100.0 - summary.asr))
    return out


def assert_same(a: float, b: float) -> None:
    assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (a, b)


@pytest.mark.parametrize("kind", ["keyword", "llamaguard", "cost_model"])
def test_validate_takes_each_judge(kind, judge_dirs, directions, shared_data, tmp_path):
    judges = judge_table(judge_dirs)[kind]
    (name, judge), = judges.items()
    out = validate(judges, directions, shared_data, tmp_path / "validate")
    steering, responses = pd.read_csv(out / "steering.csv"), read_responses(out)
    assert (steering["judge"] == name).all() and (steering["n"] == N_PROMPTS).all()
    assert len(responses) == (1 + 2 * 2) * N_PROMPTS  # θ0 once, 2 directions × 2 α > 0
    assert {f"{name}_status", f"{name}_categories", f"{name}_score"} <= set(responses.columns)
    oracle = direct_safety(responses, judge)
    for row in steering.itertuples():
        asr, safety = oracle["alpha=0" if row.alpha == 0 else f"{row.direction}@{row.alpha:g}"]
        assert_same(row.asr, asr)
        assert_same(row.safety, safety)
    if kind == "cost_model":
        assert steering["asr"].isna().all() and (responses["cost_status"] == "scored").all()
        assert (steering["cost_safety_score"] == steering["safety"]).all()
    else:
        assert (steering[f"{name}_asr"] == steering["asr"]).all() and (steering[f"{name}_unparsed"] == 0).all()
    if kind == "llamaguard":  # the forced guard finds every response safe; keywords find none refused
        assert (responses["guard_status"] == "safe").all() and (steering["safety"] == 100.0).all()
    if kind == "keyword":  # the default judge keeps the keyword metric: a random tiny model never refuses
        assert (responses["keyword_status"] == "unsafe").all() and (steering["safety"] == 0.0).all()
        assert list(responses["refused"]) == list(responses["keyword_status"] == "safe")
    linear = pd.read_csv(out / "sensitivity_linear.csv")
    s = steering[steering["direction"] == "danger"].set_index("alpha")["safety"]
    assert_same(linear[linear["direction"] == "danger"].iloc[0]["ds"], s[1.0] - s[0.0])
    assert f"({name}: " in (out / "sensitivity.md").read_text()


@pytest.mark.parametrize("kind", ["keyword", "llamaguard", "cost_model"])
def test_trajectory_takes_each_judge(kind, judge_dirs, directions, shared_data, pilot_run, tmp_path):
    judges = judge_table(judge_dirs)[kind]
    (name, judge), = judges.items()
    out = trajectory(judges, directions, shared_data, pilot_run, tmp_path / "trajectory")
    points, responses = pd.read_csv(out / "trajectory.csv"), read_responses(out)
    assert list(points["step"]) == [0, 1, 2] and (points["judge"] == name).all()
    oracle = direct_safety(responses, judge)
    for row in points.itertuples():
        asr, safety = oracle[f"step-{row.step:06d}"]
        assert_same(row.asr, asr)
        assert_same(row.safety, safety)
    if kind == "llamaguard":
        assert (points["safety"] == 100.0).all() and (points["guard_asr"] == 0.0).all()
    drift = pd.read_csv(out / "sensitivity_drift.csv")
    p = points.set_index("step")
    first = drift[(drift["direction"] == "danger") & (drift["step"] == 1)].iloc[0]
    expected = (p.loc[2, "safety"] - p.loc[1, "safety"]) / (p.loc[2, "proj_danger"] - p.loc[1, "proj_danger"])
    assert_same(first["ds"], expected)
    config = (out / "trajectory_config.yaml").read_text()
    assert f"kind: {judge.kind}" in config


def test_several_judges_one_generation(judge_dirs, directions, shared_data, pilot_run, tmp_path):
    """All judges score the same responses; `safety_judge` picks the one behind safety; every judge's verdict
    and metric is kept."""
    table = judge_table(judge_dirs)
    judges = {"refusals": table["keyword"]["keyword"], "cost": table["cost_model"]["cost"],
              "guard_unsafe": JudgeSettings(kind="llamaguard", model=str(judge_dirs / "guard_unsafe"),
                                            dtype="float32", batch_size=8),
              "guard_safe": table["llamaguard"]["guard"]}
    out = validate(judges, directions, shared_data, tmp_path / "validate", safety_judge="guard_unsafe")
    steering, responses = pd.read_csv(out / "steering.csv"), read_responses(out)
    assert (steering["judge"] == "guard_unsafe").all()
    assert (steering["guard_unsafe_asr"] == 100.0).all() and (steering["safety"] == 0.0).all()
    assert (steering["guard_safe_asr"] == 0.0).all() and steering["cost_safety_score"].notna().all()
    assert (steering["refusals_asr"] == 100.0).all()
    assert (responses["guard_unsafe_categories"] == "S1").all() and (responses["guard_safe_status"] == "safe").all()
    cost = direct_safety(responses, judges["cost"])
    for row in steering.itertuples():
        assert_same(row.cost_safety_score, cost["alpha=0" if row.alpha == 0 else f"{row.direction}@{row.alpha:g}"][1])

    default_first = trajectory(judges, directions, shared_data, pilot_run, tmp_path / "trajectory")
    points = pd.read_csv(default_first / "trajectory.csv")
    assert (points["judge"] == "refusals").all() and (points["safety"] == 100.0 - points["refusals_asr"]).all()
    assert (points["guard_safe_asr"] == 0.0).all()


def test_safety_axis_names_the_judge(judge_dirs):
    table = judge_table(judge_dirs)
    assert safety_axis(table["keyword"]) == ("safety = 100 − ASR %  (keyword: refusal phrases)", True)
    assert safety_axis(table["llamaguard"]) == ("safety = 100 − ASR %  (guard: guard_safe)", True)
    assert safety_axis(table["cost_model"]) == ("Safety Score = −cost  (cost: cost)", False)


def test_safety_judge_must_be_a_judge(directions):
    with pytest.raises(ConfigError, match="safety_judge 'guard' is not one of the judges"):
        ValidateConfig(directions=directions, safety_judge="guard")
    with pytest.raises(ConfigError, match="judges: name at least one judge"):
        TrajectoryConfig(directions=directions, judges={})


def test_the_papers_validate_and_trajectory_jobs_judge_with_llamaguard():
    from pathlib import Path

    import yaml

    from sqsd_ray.config import from_dict
    from sqsd_ray.dynamics.jobs import TrajectoryConfig, ValidateConfig

    jobs = Path(__file__).resolve().parents[2] / "jobs"
    paper = [p for p in sorted(jobs.glob("*.yaml")) if p.name.startswith(("validate_", "trajectory_"))
             and "tiny" not in p.name]
    assert len(paper) == 9
    for path in paper:
        cls = ValidateConfig if path.name.startswith("validate_") else TrajectoryConfig
        cfg = from_dict(cls, yaml.safe_load(path.read_text()))
        first = next(iter(cfg.judges.values()))
        assert first.kind == "llamaguard" and "Llama-Guard-3" in first.model, path.name
