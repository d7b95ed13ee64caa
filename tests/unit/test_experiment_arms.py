"""Arm score columns an experiment derives itself: the chance row (random) and safety only (−safety_proj)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sqsd_ray.config import load_config
from sqsd_ray.experiments.effectiveness import Arm, ExperimentConfig, arm_scores


def _scores(tmp_path):
    path = tmp_path / "scores.parquet"
    pd.DataFrame({"sample_id": [f"s{i}" for i in range(8)], "sqsd": np.arange(8.0),
                  "safety_proj": np.linspace(-1, 1, 8),
                  "status": ["ok"] * 7 + ["nonfinite"]}).to_parquet(path)
    return path


def test_random_arm_is_a_seeded_ranking_of_the_usable_samples(tmp_path):
    path = _scores(tmp_path)
    columns = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        (tmp_path / name).mkdir()
        cfg = load_config(ExperimentConfig, None, [f"scores={path}", f"partition.seed={seed}"])
        derived, column = arm_scores(cfg, Arm(name="Random", column="random"), tmp_path / name)
        frame = pd.read_parquet(derived)
        assert column == "random" and len(frame) == 7 and (frame["status"] == "ok").all()
        assert frame["random"].between(0, 1).all()
        columns.append(frame["random"].to_numpy())
    assert np.array_equal(columns[0], columns[1]) and not np.array_equal(columns[0], columns[2])


def test_safety_only_arm_negates_the_safety_projection(tmp_path):
    path = _scores(tmp_path)
    cfg = load_config(ExperimentConfig, None, [f"scores={path}"])
    derived, column = arm_scores(cfg, Arm(name="safety only", column="neg_safety_proj"), tmp_path)
    frame = pd.read_parquet(derived)
    assert np.allclose(frame[column], -frame["safety_proj"])
