"""The demo's init stage: init select's own states when its rule finds them, and the documented fallback
(the pilot's last checkpoint, θ0 + α_min·V_safety) when it does not; both must be a valid score config."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import sqsd_ray.training.loop as train_module
from sqsd_ray.config import from_dict
from sqsd_ray.demo.pipeline import select_init_states
from sqsd_ray.dynamics.jobs import InitSelectConfig
from sqsd_ray.scoring.job_config import InitStatesConfig

DIRECTIONS = {"danger": "/d/danger.safetensors", "safety": "/d/safety.safetensors"}


def test_fallback_scores_at_the_pilots_last_checkpoint_and_the_smallest_alpha(tmp_path, monkeypatch):
    last = tmp_path / "trajectory" / "train" / "step-000040"
    (last / "adapter").mkdir(parents=True)
    monkeypatch.setattr(train_module, "load_run", lambda run_dir: SimpleNamespace(final=last))

    def no_state(config):
        raise ValueError("no α raises the refusal rate")

    fragment, note = select_init_states(no_state, InitSelectConfig, tmp_path / "validate", tmp_path / "trajectory",
                                        tmp_path, DIRECTIONS, alphas=[-1.0, 0.0, 0.5, 1.0, 2.0])
    assert fragment["directions"] == DIRECTIONS
    states = from_dict(InitStatesConfig, fragment["init_states"])
    assert states.danger.kind == "adapter" and states.danger.path == str((last / "adapter").resolve())
    assert states.safety.kind == "direction" and states.safety.direction == "safety" and states.safety.alpha == 0.5
    assert "no α raises the refusal rate" in note and "step-000040" in note and "0.5" in note


def test_selected_states_are_taken_as_init_select_wrote_them(tmp_path):
    chosen = {"directions": DIRECTIONS,
              "init_states": {"danger": {"kind": "adapter", "path": "/runs/pilot/step-000020/adapter"},
                              "safety": {"kind": "direction", "direction": "safety", "alpha": 2.0}}}

    def select(config):
        out = tmp_path / "init"
        out.mkdir()
        (out / "init_states.yaml").write_text(yaml.safe_dump(chosen))
        (out / "selection.json").write_text(json.dumps({"safety": {"alpha": 2.0, "ds_linear": 31.5},
                                                        "danger": {"step": 20, "ds_drift": 0.42}}))
        return out

    fragment, note = select_init_states(select, InitSelectConfig, tmp_path / "v", tmp_path / "t", tmp_path,
                                        DIRECTIONS, alphas=[0.5, 1.0])
    assert fragment == chosen
    assert note == ("θ_safety = θ0 + 2·V_safety (DS_linear 31.5); θ_danger = pilot checkpoint at step 20 "
                    "(DS_drift 0.42).")


def test_a_different_error_is_not_swallowed(tmp_path):
    def broken(config):
        raise KeyError("validate_dir")

    with pytest.raises(KeyError):
        select_init_states(broken, InitSelectConfig, tmp_path, tmp_path, tmp_path, DIRECTIONS, alphas=[1.0])


def test_score_config_of_a_run_scores_another_corpus_from_anywhere(tmp_path, monkeypatch):
    """demo writes score_config.yaml: its SQSD config with local paths absolute, loadable as a score job."""
    import yaml

    from sqsd_ray.config import load_config
    from sqsd_ray.demo.pipeline import write_score_config
    from sqsd_ray.scoring.job_config import ScoreJobConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "directions").mkdir(parents=True)
    for name in ("danger", "safety"):
        (tmp_path / "run" / "directions" / f"{name}.safetensors").write_bytes(b"x")
    (tmp_path / "run" / "corpus.jsonl").write_text("")
    config = {"model": {"name_or_path": "tiny-llama", "attn_implementation": "eager"},
              "data": {"path": "run/corpus.jsonl", "max_length": 128},
              "directions": {"danger": "run/directions/danger.safetensors",
                             "safety": "run/directions/safety.safetensors"},
              "init_states": {"safety": {"kind": "direction", "direction": "safety", "alpha": 0.5}},
              "output": {"dir": "run/scores/sqsd", "overwrite": True}}
    path = write_score_config(tmp_path / "run" / "score_config.yaml", config)
    written = yaml.safe_load(path.read_text())
    assert written["directions"]["danger"] == str(tmp_path / "run" / "directions" / "danger.safetensors")
    assert written["model"]["name_or_path"] == "tiny-llama" and written["data"]["max_length"] == 128
    assert written["output"] == {"dir": "runs/score", "overwrite": False}  # never the demo's own score run
    assert f"sqsd-ray score --config {path}" in path.read_text().splitlines()[2]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(ScoreJobConfig, [path], ["data.path=mine.jsonl", "output.dir=runs/mine"])
    assert cfg.data.path == "mine.jsonl" and cfg.init_states.safety.alpha == 0.5
    assert Path(cfg.directions.safety).is_file() and Path(cfg.directions.danger).is_absolute()
