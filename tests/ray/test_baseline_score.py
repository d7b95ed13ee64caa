"""Baselines through `sqsd-ray score`: the same loop, Ray Data path and Parquet as SQSD, and the same values as the
baseline scorer run directly (itself checked against batch-1 oracles in tests/unit/test_baselines.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sqsd_ray.config import load_config
from sqsd_ray.scoring.job import run_score
from sqsd_ray.scoring.job_config import ScoreJobConfig

pytestmark = [pytest.mark.ray]


def _cfg(tmp_path, shared_data, method, name, ray=False):
    return load_config(ScoreJobConfig, None, [
        "model.name_or_path=tiny-llama", f"data.path={shared_data / 'benign' / 'alpaca_1904.json'}",
        "data.limit=10", "data.max_length=512", f"method={method}", f"output.dir={tmp_path / name}",
        f"ray.enabled={str(ray).lower()}", "ray.local_num_cpus=2",
        f"baseline.harmful_anchors={shared_data / 'anchors' / 'pure_bad_10.jsonl'}",
        f"baseline.grad_anchors={{harmful: {shared_data / 'anchors' / 'illegal_activities_10.jsonl'}, "
        f"safe1: {shared_data / 'anchors' / 'illegal_activities_10_anchor1.jsonl'}, "
        f"safe2: {shared_data / 'anchors' / 'illegal_activities_10_anchor2.jsonl'}}}",
    ])


@pytest.mark.parametrize("method", ["self_inf_n", "bianchor_grad", "bianchor_reps", "larf"])
def test_baseline_score_files(tmp_path, shared_data, method):
    cfg = _cfg(tmp_path, shared_data, method, method)
    anchors = shared_data / "anchors"
    cfg.baseline.larf_layer = 1
    cfg.baseline.larf_unsafe = [str(anchors / "pure_bad_10.jsonl")]
    cfg.baseline.larf_safe = [str(anchors / "illegal_activities_10_anchor1.jsonl")]
    path = run_score(cfg)
    df = pd.read_parquet(path)
    assert len(df) == 10 and (df["status"] == "ok").all() and np.isfinite(df[method]).all()
    assert {"sample_id", method, "n_response_tokens"} <= set(df)
    assert f"# {method}" in (path.parent / "summary.md").read_text()
    if method == "self_inf_n":  # log(‖g‖² + 1) + log(|y| + 1)
        expected = np.log1p(df["self_influence"]) + np.log1p(df["n_response_tokens"])
        assert np.allclose(df[method], expected)
    if method == "bianchor_reps":
        assert ((df[method] >= -1) & (df[method] <= 1)).all()


def test_baseline_on_ray_equals_in_process(tmp_path, shared_data, local_ray):
    here = pd.read_parquet(run_score(_cfg(tmp_path, shared_data, "bianchor_grad", "here")))
    there = pd.read_parquet(run_score(_cfg(tmp_path, shared_data, "bianchor_grad", "ray", ray=True)))
    merged = here.merge(there, on="sample_id", suffixes=("", "_ray"))
    assert len(merged) == 10
    assert np.allclose(merged["bianchor_grad"], merged["bianchor_grad_ray"], atol=1e-6)


def test_another_method_in_the_same_directory_is_refused(tmp_path, shared_data):
    run_score(_cfg(tmp_path, shared_data, "self_inf_n", "one"))
    with pytest.raises(Exception, match="method"):
        run_score(_cfg(tmp_path, shared_data, "bianchor_reps", "one"))


def test_reward_model_baseline_scores_the_cost(tmp_path, shared_data):
    import math

    import torch

    from sqsd_ray.data.records import DataConfig, load_samples
    from sqsd_ray.evaluation.judges import BEAVER_TEMPLATE
    from sqsd_ray.models.tiny import build_tiny_tokenizer
    from tests.unit.test_judges import _tiny_score_checkpoint

    checkpoint = tmp_path / "cost"
    checkpoint.mkdir()
    backbone, head = _tiny_score_checkpoint(checkpoint)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(checkpoint)
    cfg = _cfg(tmp_path, shared_data, "reward_model", "rm")
    cfg.baseline.reward_model, cfg.baseline.reward_dtype = str(checkpoint), "float32"
    df = pd.read_parquet(run_score(cfg)).set_index("sample_id")
    samples, _ = load_samples(DataConfig(path=str(shared_data / "benign" / "alpaca_1904.json"), limit=10))
    assert len(df) == 10
    for sample in samples[:3]:  # oracle: the cost of one unpadded sequence
        text = BEAVER_TEMPLATE.format(prompt=sample.messages[-1]["content"], response=sample.response)
        with torch.no_grad():
            cost = head(backbone(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).last_hidden_state[0, -1])
        assert math.isclose(df.loc[sample.sample_id, "reward_model"], float(cost), rel_tol=1e-4, abs_tol=1e-6)


def test_full_gradient_space_and_a_method_placeholder_in_the_output_dir(tmp_path, shared_data):
    lora = pd.read_parquet(run_score(_cfg(tmp_path, shared_data, "self_inf_n", "lora")))
    cfg = load_config(ScoreJobConfig, None, [f"output.dir={tmp_path / 'full_{method}'}", "method=self_inf_n",
                                             "baseline.gradient=full", *[f"{k}={v}" for k, v in (
                                                 ("model.name_or_path", "tiny-llama"),
                                                 ("data.path", shared_data / "benign" / "alpaca_1904.json"),
                                                 ("data.limit", 10), ("ray.enabled", "false"))]])
    assert cfg.output.dir == str(tmp_path / "full_self_inf_n")
    full = pd.read_parquet(run_score(cfg))
    assert (tmp_path / "full_self_inf_n" / "scores.parquet").is_file()
    merged = lora.merge(full, on="sample_id", suffixes=("_lora", "_full"))
    assert len(merged) == 10 and np.isfinite(merged["self_inf_n_full"]).all()
    assert not np.allclose(merged["self_inf_n_lora"], merged["self_inf_n_full"])
