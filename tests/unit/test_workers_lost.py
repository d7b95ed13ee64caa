"""How a Ray Train run that lost its workers ends: ``fit_on_ray_train`` against Ray Train's own error types, as
its controller raises them (a dead worker arrives wrapped in a failed health check), and the restart wait it sets."""

from __future__ import annotations

import os

import pytest
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import (
    WorkerGroupStartupFailedError,
    WorkerGroupStartupTimeoutError,
    WorkerHealthCheckFailedError,
    WorkerHealthCheckTimeoutError,
)

from sqsd_ray.config import ConfigError
from sqsd_ray.runtime import WorkerScaling, WorkersLost, fit_on_ray_train

KEY = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class FailingTrainer:
    def __init__(self, error: BaseException):
        self.error, self.wait_seen = error, None

    def fit(self):
        self.wait_seen = os.environ.get(KEY)
        raise self.error


def _fit(error: BaseException, **scaling):
    trainer = FailingTrainer(error)
    fit_on_ray_train(trainer, WorkerScaling(num_workers=2, cpus_per_worker=4, **scaling), lambda: "KEPT")
    return trainer


def test_a_dead_worker_beyond_max_failures_is_workers_lost():
    dead = WorkerHealthCheckFailedError("health check failed", ActorDiedError())
    with pytest.raises(WorkersLost, match=r"training workers \[1\] died .* 0 restarts .*; KEPT"):
        _fit(WorkerGroupError("rank 1 died", {0: RuntimeError("gloo: connection reset"), 1: dead}))
    with pytest.raises(WorkersLost, match=r"workers \[0\] died"):
        _fit(WorkerGroupError("rank 0 hangs", {0: WorkerHealthCheckTimeoutError("no answer")}))


def test_an_error_of_the_job_itself_is_raised_as_it_is():
    with pytest.raises(WorkerGroupError, match="bad record"):
        _fit(WorkerGroupError("bad record", {0: ValueError("bad record")}))
    with pytest.raises(ControllerError):
        _fit(ControllerError(RuntimeError("controller bug")))


def test_workers_not_back_in_time_name_the_wait_and_what_was_kept(monkeypatch):
    monkeypatch.setenv(KEY, "7")  # the user's own value comes back afterwards
    trainer = FailingTrainer(ControllerError(WorkerGroupStartupTimeoutError(2)))
    with pytest.raises(WorkersLost, match=r"did not offer 2 workers with 4 CPUs each within scaling.restart_wait_s "
                                          r"= 45 s .*; KEPT"):
        fit_on_ray_train(trainer, WorkerScaling(num_workers=2, cpus_per_worker=4, restart_wait_s=45), lambda: "KEPT")
    assert trainer.wait_seen == "45" and os.environ[KEY] == "7"
    with pytest.raises(WorkersLost, match="died while the worker group was starting"):
        _fit(ControllerError(WorkerGroupStartupFailedError("node died during init")))


def test_scaling_checks_its_failure_settings():
    assert WorkerScaling(max_failures=-1).max_failures == -1  # Ray's "retry forever"
    with pytest.raises(ConfigError, match="scaling.max_failures"):
        WorkerScaling(max_failures=-2)
    with pytest.raises(ConfigError, match="scaling.restart_wait_s"):
        WorkerScaling(restart_wait_s=0)
