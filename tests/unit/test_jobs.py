"""Every job file in jobs/ parses into its config class (STYLE 5: jobs are data, a test loads every file)."""

from __future__ import annotations

import pytest
import yaml

from sqsd_ray.baselines.larf_layer import LarfLayerConfig
from sqsd_ray.config import from_dict
from sqsd_ray.dynamics.jobs import DirectionsBuildConfig, InitSelectConfig, TrajectoryConfig, ValidateConfig
from sqsd_ray.evaluation.job import EvalJobConfig
from sqsd_ray.experiments.effectiveness import ExperimentConfig
from sqsd_ray.experiments.mitigate import MitigateConfig
from sqsd_ray.mitigation.curate import CurateConfig
from sqsd_ray.mitigation.restore_job import RestoreConfig
from sqsd_ray.scoring.job_config import ScoreJobConfig
from tests.conftest import REPO_ROOT

JOB_FILES = sorted((REPO_ROOT / "jobs").glob("*.yaml"))
KINDS = {
    "score": ScoreJobConfig,
    "directions": DirectionsBuildConfig,
    "validate": ValidateConfig,
    "trajectory": TrajectoryConfig,
    "init": InitSelectConfig,
    "evaluate": EvalJobConfig,
    "experiment": ExperimentConfig,
    "larf-layer": LarfLayerConfig,
    "curate": CurateConfig,
    "restore": RestoreConfig,
    "mitigate": MitigateConfig,
}


def test_there_are_jobs():
    assert JOB_FILES


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_parses(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must open with a comment giving its run command"
    kind = "mitigate" if path.name.startswith("experiment_mitigate_") else path.name.split("_")[0]
    assert kind in KINDS, f"{path.name}: job files are named <kind>_<what>.yaml with kind in {sorted(KINDS)}"
    from_dict(KINDS[kind], yaml.safe_load(text))
