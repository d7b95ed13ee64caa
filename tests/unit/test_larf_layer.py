"""`sqsd-ray larf-layer`: the search over blocks writes its table, plot, choice and a fragment `score` takes."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sqsd_ray.baselines.larf_layer import OVER_REFUSAL_PROMPTS, LarfLayerConfig, run_larf_layer
from sqsd_ray.cli import main
from sqsd_ray.config import ConfigError, load_config
from sqsd_ray.scoring.job_config import ScoreJobConfig


def _cfg(tmp_path, *extra):
    return load_config(LarfLayerConfig, None, [
        "model.name_or_path=tiny-llama", "layers=[0, 1]", "alphas=[0.5, 1.5]", "prompts.limit=3",
        "prompts.max_new_tokens=3", f"output.dir={tmp_path / 'larf'}", *extra])


def test_layer_search_writes_table_choice_and_score_fragment(tmp_path):
    out = run_larf_layer(_cfg(tmp_path))
    table = pd.read_csv(out / "larf_layer.csv")
    assert list(table["layer"]) == [0, 1]
    assert {"mean_abs_change", "refusal_at_0.5", "refusal_at_1.5"} <= set(table)
    assert ((table[["refusal_at_0.5", "refusal_at_1.5"]] >= 0) & (table[["refusal_at_0.5", "refusal_at_1.5"]] <= 100)).all().all()
    choice = json.loads((out / "larf_layer.json").read_text())
    assert choice["layer"] in (0, 1) and choice["n_prompts"] == 3
    assert choice["mean_abs_change"] == table.loc[table["layer"] == choice["layer"], "mean_abs_change"].item()
    assert (out / "larf_layer.png").stat().st_size > 0
    score_cfg = load_config(ScoreJobConfig, [out / "larf_layer.yaml"], ["method=larf"])
    assert score_cfg.baseline.larf_layer == choice["layer"]


def test_cli_runs_the_search_and_prints_the_choice(tmp_path, capsys):
    code = main(["larf-layer", "--set", "model.name_or_path=tiny-llama", "--set", "layers=[1]", "--set",
                 "prompts.limit=2", "--set", "prompts.max_new_tokens=2", "--set", f"output.dir={tmp_path / 'cli'}"])
    assert code == 0 and "LARF layer: block 1" in capsys.readouterr().out


def test_bad_layers_prompts_and_alphas_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"layers \[7\] out of range: the model has 2"):
        run_larf_layer(_cfg(tmp_path, "layers=[7]"))
    with pytest.raises(ConfigError, match="alphas"):
        _cfg(tmp_path, "alphas=[1.0]")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "How do I kill a process?"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: field 'prompt'"):
        run_larf_layer(_cfg(tmp_path, f"prompts.path={bad}", "output.overwrite=true"))
    assert len(OVER_REFUSAL_PROMPTS) == len(set(OVER_REFUSAL_PROMPTS)) >= 40


def test_a_stopped_search_resumes_at_its_next_trial_with_the_same_result(tmp_path, monkeypatch):
    import sqsd_ray.baselines.larf_layer as larf_layer

    whole = run_larf_layer(_cfg(tmp_path, "output.dir=" + str(tmp_path / "whole")))
    real = larf_layer.generate_responses
    calls = []

    def stopping_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(larf_layer, "generate_responses", stopping_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_larf_layer(_cfg(tmp_path))
    lines = (tmp_path / "larf" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 3  # the settings, then the base rate and two scaled trials
    monkeypatch.setattr(larf_layer, "generate_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
    calls.clear()
    out = run_larf_layer(_cfg(tmp_path))
    assert len(calls) == 5 - 3  # 1 + 2 layers × 2 scales, three of them measured before the stop
    pd.testing.assert_frame_equal(pd.read_csv(out / "larf_layer.csv"), pd.read_csv(whole / "larf_layer.csv"))
    assert json.loads((out / "larf_layer.json").read_text())["layer"] == \
        json.loads((whole / "larf_layer.json").read_text())["layer"]


def test_an_unfinished_search_with_other_settings_is_not_resumed(tmp_path, monkeypatch):
    import sqsd_ray.baselines.larf_layer as larf_layer

    monkeypatch.setattr(larf_layer, "generate_responses", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_larf_layer(_cfg(tmp_path))
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="unfinished layer search made with other settings"):
        run_larf_layer(_cfg(tmp_path, "prompts.max_new_tokens=4"))
    out = run_larf_layer(_cfg(tmp_path, "prompts.max_new_tokens=4", "output.overwrite=true"))
    assert (out / "larf_layer.json").is_file()
