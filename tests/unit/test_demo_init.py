"""The demo's init stage: init select's own states when its rule finds them, and the documented fallback
(the pilot's last checkpoint, θ0 + α_min·V_safety) when it does not; both must be a valid score config."""

from __future__ import annotations

import json
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
