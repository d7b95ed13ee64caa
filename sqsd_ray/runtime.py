"""Ray at the edge: starting or attaching to Ray, and the resource profiles scoring actors run under.

Local by default (a private Ray on this machine, dashboard off or on 127.0.0.1 only); attaches to a cluster
when ``ray.address`` or ``RAY_ADDRESS`` is set (as under ``ray job submit``). Every resource number comes from
``RayConfig``, filled from a named profile and overridable key by key.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from .config import ConfigError, help_field

log = logging.getLogger(__name__)


@dataclass
class RayConfig:
    """How scoring runs on Ray. Unset resource fields come from ``profile``."""

    enabled: bool = help_field(True, help="false = score in this process without Ray (same kernel, same output).")
    address: str | None = help_field(
        None, help="Ray address to attach to; default: RAY_ADDRESS if set, else start a private local Ray."
    )
    profile: Literal["local", "gpu"] = help_field(
        "local",
        help="local: 1 actor on 1 CPU, so read/tokenise tasks keep a core (an actor pool on every CPU hangs the "
        "reads, ray#44687); gpu: one actor per cluster GPU, 1 GPU and 4 CPUs each.",
    )
    num_actors: int | None = help_field(None, help="scoring actors in the pool (profile default).")
    num_cpus_per_actor: float | None = help_field(None, help="CPUs reserved per actor; fractions allowed.")
    num_gpus_per_actor: float | None = help_field(None, help="GPUs per actor (profile default).")
    torch_threads_per_actor: int | None = help_field(
        None, help="CPU threads torch uses in an actor; default: the actor's CPU reservation. Ray Data calls the "
        "actor from a worker thread, where a 2-thread torch team ran 2.5x slower than 1 thread on a 2-core "
        "machine (tiny model: 12 vs 36 samples/s), so more threads than reserved CPUs is rarely a win."
    )
    rows_per_call: int = help_field(
        256, help="rows handed to an actor per call; sorted by length inside into token-budget micro-batches, "
        "so larger values cut padding at the cost of coarser progress and retries (GPU batching on the Alpaca "
        "instructions: 64 rows -> 13.7 % padding, 256 -> 4.9 %, 1024 -> 1.7 %). Fewer where the corpus is too "
        "small to give every actor 4 calls."
    )
    max_restarts: int = help_field(3, help="times a dead scoring actor is restarted.")
    max_task_retries: int = help_field(
        -1, help="times a call lost with its actor is retried (-1: until the actor's max_restarts are spent). A "
        "vanished node leaves its actor unreachable for ~15 s before Ray declares it dead, and every call in that "
        "window spends a retry: a budget of 3 ran out in ~5 s and failed the run."
    )
    local_num_cpus: int | None = help_field(None, help="local Ray only: CPUs to give it (default: all).")
    object_store_mb: int = help_field(512, help="local Ray only: object store size in MiB.")
    include_dashboard: bool = help_field(False, help="local Ray only: start the dashboard (bound to 127.0.0.1).")

    def __post_init__(self) -> None:
        if self.rows_per_call < 1:
            raise ConfigError(f"ray.rows_per_call must be >= 1, got {self.rows_per_call}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"ray.num_actors must be >= 1, got {self.num_actors}")
        for key in ("max_restarts", "max_task_retries"):
            if getattr(self, key) < -1:
                raise ConfigError(f"ray.{key} must be >= 0, or -1 for no limit; got {getattr(self, key)}")

    def resolved(self, cluster_gpus: float) -> RayConfig:
        """Fill unset resource fields from the profile (GPU count from the running cluster)."""
        if self.profile == "gpu":
            if cluster_gpus < 1 and self.num_gpus_per_actor is None:
                raise ConfigError("ray.profile=gpu but the Ray cluster has no GPU; use ray.profile=local")
            defaults = dict(num_actors=max(1, int(cluster_gpus)), num_cpus_per_actor=4.0, num_gpus_per_actor=1.0)
        else:
            defaults = dict(num_actors=1, num_cpus_per_actor=1.0, num_gpus_per_actor=0.0)
        out = replace(self, **{k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()})
        if out.torch_threads_per_actor is None:
            out = replace(out, torch_threads_per_actor=max(1, int(out.num_cpus_per_actor)))
        return out


@dataclass
class WorkerScaling:
    """Workers for training (Ray Train, data parallel: gloo on CPU, nccl on GPU) and for evaluating model states
    (Ray tasks), or this process alone."""

    use_ray: bool = help_field(True, help="false = run in this process (no Ray): same loop, same outputs")
    address: str | None = help_field(None, help="Ray address; default RAY_ADDRESS, else a private local Ray")
    num_workers: int = help_field(1, help="Ray workers: data-parallel training workers, or parallel evaluation tasks")
    use_gpu: bool = help_field(False, help="one GPU per worker (training: nccl; CPU workers use gloo)")
    cpus_per_worker: float = help_field(1.0, help="CPUs reserved per worker")
    torch_threads: int | None = help_field(None, help="torch CPU threads per worker; default cpus_per_worker")
    max_failures: int = help_field(0, help="training: restarts of the worker group after a failure (resumes from the last checkpoint)")
    restart_wait_s: float = help_field(
        600.0, help="training: how long a (re)start of the worker group may wait for the cluster to offer its "
        "workers (an autoscaler adding a node takes minutes); then the run stops, keeping its checkpoints"
    )
    local_num_cpus: int | None = help_field(None, help="local Ray only: CPUs to give it (default: all)")
    object_store_mb: int = help_field(256, help="local Ray only: object store size in MiB")
    include_dashboard: bool = help_field(False, help="local Ray only: start the dashboard (bound to 127.0.0.1)")
    fail_at_step: int | None = help_field(
        None, help="fault drill: training worker rank 0 kills its own process once at this step (checks that "
        "scaling.max_failures restarts the workers from the last checkpoint)"
    )

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if not self.use_ray and self.num_workers != 1:
            raise ConfigError("scaling.num_workers > 1 needs scaling.use_ray: true")
        if self.max_failures < -1:
            raise ConfigError(f"scaling.max_failures must be >= 0, or -1 for no limit; got {self.max_failures}")
        if not self.restart_wait_s > 0:
            raise ConfigError(f"scaling.restart_wait_s must be a positive number of seconds, got {self.restart_wait_s}")


class WorkersLost(RuntimeError):
    """A Ray Train run stopped because the cluster lost its workers (a node vanished) more often than
    ``scaling.max_failures`` allows, or could not offer them again within ``scaling.restart_wait_s``. Whatever the
    run checkpointed is kept; the message says where and how to resume."""


# Ray Train reads this in its controller (the driver's value is passed on to it) when it starts a worker group.
_WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def train_failure_config(scaling: WorkerScaling):
    """Ray Train's FailureConfig: ``max_failures`` restarts after worker errors (a lost node's worker included),
    and no retry of a worker group that could not be started (Ray's default retries that forever: a run that lost
    a node nobody replaces would wait without end; each start waits ``restart_wait_s``, ``fit_on_ray_train``).
    Preemptions the cluster announces (drained nodes) keep Ray's own budget, unlimited by default."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=scaling.max_failures, controller_failure_limit=0)


def _lost_worker(failure: BaseException) -> bool:
    """Whether a training worker's failure is its process or node going away, not an error of the job.

    Ray Train reports a dead worker through its health check: ``WorkerHealthCheckFailedError`` wrapping the
    ``RayActorError`` (ActorDiedError, ActorUnavailableError), or ``WorkerHealthCheckTimeoutError`` for one
    that stopped answering."""
    from ray.exceptions import RayActorError

    if type(failure).__name__ == "WorkerHealthCheckTimeoutError":
        return True
    failure = getattr(failure, "health_check_failure", failure)
    return isinstance(failure, RayActorError)


def fit_on_ray_train(trainer, scaling: WorkerScaling, kept: Callable[[], str]):
    """``trainer.fit()``, waiting at most ``scaling.restart_wait_s`` for a worker group; lost workers beyond
    what the run may absorb raise ``WorkersLost`` with ``kept()`` (what was kept and how to resume)."""
    from ray.train import ControllerError, WorkerGroupError

    saved = os.environ.get(_WORKER_GROUP_START_TIMEOUT)
    os.environ[_WORKER_GROUP_START_TIMEOUT] = str(scaling.restart_wait_s)
    try:
        return trainer.fit()
    except ControllerError as err:
        why = type(err.controller_failure).__name__
        if why == "WorkerGroupStartupTimeoutError":
            need = (f"{scaling.num_workers} workers with {scaling.cpus_per_worker:g} CPUs"
                    + (" and 1 GPU" if scaling.use_gpu else "") + " each")
            raise WorkersLost(f"the cluster did not offer {need} within scaling.restart_wait_s = "
                              f"{scaling.restart_wait_s:g} s ({why}); {kept()}") from err
        if why == "WorkerGroupStartupFailedError":  # e.g. a worker's node died while the worker was starting
            cause = " ".join(str(err.controller_failure).split())[:300]
            raise WorkersLost(f"a training worker died while the worker group was starting ({cause}); {kept()}") \
                from err
        raise
    except WorkerGroupError as err:
        lost = sorted(rank for rank, failure in err.worker_failures.items() if _lost_worker(failure))
        if not lost:
            raise
        raise WorkersLost(f"training workers {lost} died (their node was lost or killed) after the "
                          f"{scaling.max_failures} restarts allowed by scaling.max_failures; {kept()}") from err
    finally:
        if saved is None:
            os.environ.pop(_WORKER_GROUP_START_TIMEOUT, None)
        else:
            os.environ[_WORKER_GROUP_START_TIMEOUT] = saved


LOOPBACK = "127.0.0.1"


def loopback_only() -> None:
    """Make a Ray started from this process listen on 127.0.0.1 only.

    Ray resolves a node address of 127.0.0.1 to the machine's outward address unless its "cluster" mode is off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once when Ray is imported); its GCS, raylet, workers and agents
    then listen on every interface. The variable covers the processes Ray starts; the constant, this one,
    where Ray was imported before the variable could be set.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(cfg: RayConfig | WorkerScaling):
    """Start or attach to Ray; a no-op when Ray is already initialised (tests, notebooks).

    A private local Ray listens on 127.0.0.1 only (``loopback_only``), its dashboard too when enabled."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to Ray at %s", address)
        ray.init(address=address, log_to_driver=True, runtime_env=_worker_runtime_env())
    else:
        log.info("starting a local Ray on %s (%s CPUs, object store %d MiB)", LOOPBACK, cfg.local_num_cpus or "all",
                 cfg.object_store_mb)
        loopback_only()
        ray.init(
            num_cpus=cfg.local_num_cpus,
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            include_dashboard=cfg.include_dashboard,
            dashboard_host=LOOPBACK,
            log_to_driver=True,
            runtime_env=_worker_runtime_env(),
            _node_ip_address=LOOPBACK,
        )
    return ray


WORKER_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the CLI's format; Ray prefixes the worker's name and pid
_WORKER_SETUP_HOOK = "sqsd_ray.runtime.setup_worker_logging"


def setup_worker_logging() -> None:
    """Ray's ``worker_process_setup_hook``: ``sqsd_ray`` loggers at INFO to stderr in every worker and actor.

    A Ray worker process has no log handler of ours, so Python drops INFO lines (a scoring actor's block timings, an
    evaluation task's progress); stderr is what Ray forwards to the driver (``log_to_driver``). Ray Train configures
    its workers' root logger itself (message only, to the console and its own log files): there the records pass on
    to it and this handler stays quiet, so each line is printed once and Ray Train's files keep it.
    """
    logger = logging.getLogger("sqsd_ray")
    if any(getattr(h, "sqsd_ray_worker", False) for h in logger.handlers):
        return  # a reused worker process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(WORKER_LOG_FORMAT))
    handler.addFilter(_unless_the_root_prints_it)
    handler.sqsd_ray_worker = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _unless_the_root_prints_it(record: logging.LogRecord) -> bool:
    """False when a console handler of the root logger (Ray Train's, in its workers) prints the record anyway."""
    return not any(type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler)
                   and record.levelno >= h.level for h in logging.getLogger().handlers)


def _worker_runtime_env() -> dict | None:
    """The runtime_env ``init_ray`` gives the job: the worker log hook. Left out when a job submitted with
    ``ray job submit`` brings its own hook (Ray refuses to merge two values of one runtime_env key)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from .cpu_kernels import ENV, PINS
    from .data.reference import DATA_DIR_ENV

    submitted = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}").get("runtime_env") or {}
    runtime_env = {}
    if "worker_process_setup_hook" in submitted:
        log.info("the submitted job's runtime_env sets worker_process_setup_hook; sqsd_ray's worker log handler "
                 "is left out (call %s from that hook to keep worker logs)", _WORKER_SETUP_HOOK)
    else:
        runtime_env["worker_process_setup_hook"] = _WORKER_SETUP_HOOK
    # what the driver's workers must share with it reaches those of an attached cluster too, which inherit no driver
    # environment: pinned CPU kernels (cpu_kernels.py) and the data root that `ref:` names resolve in
    shared = {name: os.environ[name] for name in (*PINS["avx2"], ENV, DATA_DIR_ENV) if name in os.environ}
    if shared and "env_vars" in submitted:
        log.info("the submitted job's runtime_env sets env_vars, so %s reach its workers only if set there",
                 ", ".join(sorted(shared)))
    elif shared:
        runtime_env["env_vars"] = shared
    return runtime_env or None
