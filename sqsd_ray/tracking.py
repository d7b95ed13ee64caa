"""Experiment tracking: a run's parameters and metrics to TensorBoard or MLflow, beside the files it writes.

One ``tracking`` section in a job's YAML (``train``, ``directions build``, ``trajectory``, ``score``,
``experiment``, ``experiment mitigate``)::

    tracking: {backend: tensorboard}                          # -> <run dir>/tensorboard
    tracking: {backend: mlflow, uri: http://mlflow.internal:5000, experiment: sqsd-qwen3}
    tracking: {backend: mlflow}                               # -> MLFLOW_TRACKING_URI, else file:<run dir>/mlruns

The driver owns a run's lifetime (``tracking_run``: resolve where it goes, create the MLflow run, mark it finished
or failed); whoever has metrics opens a ``Tracker`` on it (``open_tracker``): the driver itself for scoring and
experiments, rank 0 of the Ray Train workers for training (every other rank gets the no-op tracker). A resumed
training run reopens the MLflow run it started (``tracking.json`` in its run directory), so one fine-tune is one
curve however often it was interrupted.

Tracking is not part of any run's identity: where the metrics go does not change them.

Ray ships ``ray.air.integrations.mlflow.setup_mlflow`` for Ray Train workers. It is not used here: it always
creates a new MLflow run (a worker-group restart or a resumed job would split one fine-tune into several runs),
keeps its run in MLflow's process-global "active run" (the experiment driver runs band fine-tunes from several
threads), and logs parameters one request each; its rank-0 gating is the one line ``open_tracker`` has.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlparse

from .config import ConfigError, help_field

log = logging.getLogger(__name__)

BACKENDS = ("none", "tensorboard", "mlflow")
INSTALL_HINT = "pip install sqsd-ray[tracking]"
TENSORBOARD_DIR = "tensorboard"  # default log directory inside the run directory
MLFLOW_DIR = "mlruns"  # default local MLflow store inside the run directory
RUN_RECORD = "tracking.json"  # where a training run records its MLflow run, to reopen it on resume
_PARAMS_PER_REQUEST = 100  # MLflow's limit on params in one log_batch
_PARAM_VALUE_CHARS = 6000  # MLflow's limit on a param value's length


class TrackingUnavailable(ConfigError):
    """The chosen back-end's package is not installed."""


@dataclass
class TrackingConfig:
    """Where a run's metrics go besides its own files (docs/tracking.md)."""

    backend: Literal["none", "tensorboard", "mlflow"] = help_field(
        "none", help="none: the run's own files only; tensorboard: event files; mlflow: an MLflow run"
    )
    uri: str | None = help_field(
        None, help="tensorboard: the log directory (default <run dir>/tensorboard); mlflow: the tracking URI, a "
        "server (http://host:5000) or a local store (file:/path/mlruns, or a plain path); default "
        "MLFLOW_TRACKING_URI, else file:<run dir>/mlruns"
    )
    experiment: str = help_field("sqsd-ray", help="mlflow: the experiment the run is filed under (created if missing)")
    run_name: str | None = help_field(None, help="the run's name in TensorBoard / MLflow; default the run "
                                      "directory's name")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:  # from_dict checks the Literal; a TrackingConfig built in code does not
            raise ConfigError(f"tracking.backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment must not be empty (MLflow files every run under an experiment)")
        if self.uri is not None and not self.uri.strip():
            raise ConfigError("tracking.uri must not be empty; leave it out (null) for the default location")

    @property
    def enabled(self) -> bool:
        return self.backend != "none"


@dataclass(frozen=True)
class TrackingTarget:
    """A ``TrackingConfig`` resolved against a run directory: where this run's metrics go. Plain data, so it
    travels to Ray workers and into run.json."""

    backend: str
    uri: str  # tensorboard: an absolute log directory; mlflow: a tracking URI with its scheme
    run_name: str
    experiment: str | None = None  # mlflow only
    run_id: str | None = None  # mlflow only, once the run exists

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrackingTarget | None:
        return None if not data else cls(**data)

    def watch_command(self) -> str:
        """The command that shows this run."""
        if self.backend == "tensorboard":
            return f"tensorboard --logdir {self.uri}"
        if self.uri.startswith("file:"):
            return f"mlflow ui --backend-store-uri {self.uri}"
        return f"open {self.uri} (MLflow experiment {self.experiment!r}, run {self.run_name!r})"

    def child(self, name: str) -> TrackingConfig:
        """The tracking of a run this one starts (an experiment's fine-tune ``name``, e.g. ``SQSD/S1``): the same
        back-end; TensorBoard in a sub-directory (one curve per fine-tune under one ``--logdir``), MLflow in the
        same store and experiment under the name ``<this run>/<name>``."""
        uri = str(Path(self.uri) / name) if self.backend == "tensorboard" else self.uri
        return TrackingConfig(backend=self.backend, uri=uri, experiment=self.experiment or "sqsd-ray",  # type: ignore[arg-type]
                              run_name=f"{self.run_name}/{name}")

    def moved(self, old_dir: Path, new_dir: Path) -> TrackingTarget:
        """This target with a location inside ``old_dir`` given under ``new_dir`` (a run built in a staging
        directory and then swapped into place)."""
        old, new = str(Path(old_dir).resolve()), str(Path(new_dir).resolve())
        local = self.uri.removeprefix("file://") if self.uri.startswith("file://") else self.uri
        if not (local == old or local.startswith(old + os.sep)):
            return self
        moved = new + local[len(old):]
        return replace(self, uri=Path(moved).as_uri() if self.uri.startswith("file:") else moved)


def child_tracking(own: TrackingConfig, parent: TrackingTarget | None, name: str) -> TrackingConfig:
    """The tracking of a sub-run: its own section when that names a back-end, else its parent's (``child``)."""
    if own.enabled or parent is None:
        return own
    return parent.child(name)


# ------------------------------------------------------------------------------------------ resolving


def resolve(cfg: TrackingConfig, run_dir: str | Path) -> TrackingTarget | None:
    """Where ``cfg`` sends the metrics of the run in ``run_dir`` (None for backend none)."""
    if not cfg.enabled:
        return None
    run_dir = Path(run_dir).resolve()
    name = cfg.run_name or run_dir.name
    if cfg.backend == "tensorboard":
        logdir = Path(cfg.uri).expanduser().resolve() if cfg.uri else run_dir / TENSORBOARD_DIR
        return TrackingTarget("tensorboard", str(logdir), name)
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or str(run_dir / MLFLOW_DIR)
    if not urlparse(uri).scheme:  # a plain path: MLflow's local file store, made absolute for the workers
        uri = Path(uri).expanduser().resolve().as_uri()
    return TrackingTarget("mlflow", uri, name, experiment=cfg.experiment)


def require_backend(backend: str) -> None:
    """One clear line when the back-end's package is missing, before a run starts (not in a worker, later)."""
    package = {"tensorboard": "tensorboard", "mlflow": "mlflow"}.get(backend)
    if package is None:
        return
    try:
        if backend == "mlflow":
            _import_mlflow()
        else:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard writes through it)
    except ImportError:
        raise TrackingUnavailable(f"tracking.backend={backend} needs the {package} package, which is not "
                                  f"installed: {INSTALL_HINT}") from None


def _import_mlflow():
    # MLflow reports usage to its servers unless told not to; training workers and clusters are often offline, and
    # a run's tracking should send nothing but the run. A user's own setting wins.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def _mlflow_client(uri: str):
    mlflow = _import_mlflow()
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store (in "maintenance mode", pointing users at a database) unless this is set;
        # a file: store is what the user chose here, to need no server. Set in this process only, for this choice.
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


# ------------------------------------------------------------------------------------------ a run's lifetime


@contextmanager
def tracking_run(cfg: TrackingConfig, run_dir: str | Path, params: Mapping[str, Any] | None = None,
                 reopen_from: str | Path | None = None) -> Iterator[TrackingTarget | None]:
    """Resolve ``cfg`` for ``run_dir``, start the run (MLflow: create it, or reopen the one recorded in
    ``reopen_from`` when it is still there), log ``params`` to a new run, and yield the target; the MLflow run is
    marked FINISHED, or FAILED / KILLED when the block raises. Yields None for backend none."""
    target = resolve(cfg, run_dir)
    if target is None:
        yield None
        return
    require_backend(target.backend)
    reopened = False
    if target.backend == "mlflow":
        target, reopened = _start_mlflow_run(target, Path(reopen_from) if reopen_from else None)
    else:
        Path(target.uri).mkdir(parents=True, exist_ok=True)
    if reopen_from is not None:
        Path(reopen_from).write_text(json.dumps(target.to_dict(), indent=1))
    log.info("tracking to %s %s; watch with: %s", target.backend, target.uri, target.watch_command())
    if params and not reopened:  # a reopened run has them (and MLflow refuses to change a logged param)
        with open_tracker(target) as tracker:
            tracker.log_params(params)
    status = "FINISHED"
    try:
        yield target
    except BaseException as err:
        # Ctrl-C, or an error a job raised on it (a score run's RunInterrupted): stopped, not failed
        stopped = isinstance(err, KeyboardInterrupt) or isinstance(err.__context__, KeyboardInterrupt)
        status = "KILLED" if stopped else "FAILED"
        raise
    finally:
        if target.backend == "mlflow" and target.run_id:
            _mlflow_client(target.uri).set_terminated(target.run_id, status=status)


def _start_mlflow_run(target: TrackingTarget, record: Path | None) -> tuple[TrackingTarget, bool]:
    client = _mlflow_client(target.uri)
    earlier = TrackingTarget.from_dict(json.loads(record.read_text())) if record and record.is_file() else None
    if earlier is not None and earlier.run_id and (earlier.uri, earlier.experiment) == (target.uri, target.experiment):
        from mlflow.exceptions import MlflowException

        try:
            client.get_run(earlier.run_id)
        except MlflowException as err:  # deleted, or another store under the same URI
            log.warning("MLflow run %s recorded in %s is gone (%s); starting a new one", earlier.run_id, record,
                        " ".join(str(err).split())[:200])
        else:
            client.update_run(earlier.run_id, status="RUNNING")
            return replace(target, run_id=earlier.run_id), True
    experiment = client.get_experiment_by_name(target.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(target.experiment)
    run = client.create_run(experiment_id, run_name=target.run_name)
    return replace(target, run_id=run.info.run_id), False


# ------------------------------------------------------------------------------------------ trackers


class Tracker:
    """Where metrics go; this base class drops them (backend none, and every rank but 0)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Settings of the run, nested mappings flattened to dotted keys."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars at ``step``; keys may be grouped with ``/`` (``train/loss``)."""

    def close(self) -> None:
        """Write out what is buffered (the run itself is ended by ``tracking_run``)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    """Event files in the target's log directory (``torch.utils.tensorboard``), flushed every 30 s for a live view."""

    def __init__(self, target: TrackingTarget) -> None:
        require_backend("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=target.uri, flush_secs=30)

    def log_params(self, params: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in flatten_params(params).items())
        self.writer.add_text("params", "| key | value |\n|---|---|\n" + rows)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            if value is not None:
                self.writer.add_scalar(key, float(value), global_step=step)

    def close(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """Params and metrics of the target's MLflow run, in batched requests."""

    def __init__(self, target: TrackingTarget) -> None:
        if not target.run_id:
            raise ValueError("an MLflow tracker needs a started run (tracking_run gives its run_id)")
        self.client, self.run_id = _mlflow_client(target.uri), target.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:_PARAM_VALUE_CHARS]) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), _PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=items[start:start + _PARAMS_PER_REQUEST])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)


def open_tracker(target: TrackingTarget | Mapping[str, Any] | None, rank: int = 0) -> Tracker:
    """The tracker of a started run (``tracking_run``'s target, or its ``to_dict``); a no-op one for no target
    and for every rank but 0."""
    if isinstance(target, Mapping):
        target = TrackingTarget.from_dict(target)
    if target is None or rank != 0:
        return Tracker()
    return TensorBoardTracker(target) if target.backend == "tensorboard" else MlflowTracker(target)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as ``{"train.lr": "5e-06", ...}``: lists and mappings without a scalar inside as JSON."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def _mlflow_key(key: str) -> str:
    """MLflow allows letters, digits and ``_-. :/`` in metric names; anything else becomes ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", key)


__all__ = ["INSTALL_HINT", "RUN_RECORD", "Tracker", "TrackingConfig", "TrackingTarget", "TrackingUnavailable",
           "child_tracking", "flatten_params", "open_tracker", "require_backend", "resolve", "tracking_run"]
