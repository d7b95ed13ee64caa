"""Distributed scoring on Ray Data: rows -> tokenise (CPU tasks) -> scoring actor pool -> Parquet parts.

    from_pandas(blocks) ──map_batches(tokenize, CPU tasks)──> token rows
                        ──map_batches(BlockScorer, ActorPoolStrategy(size=n), GPUs/CPUs per actor)──> scalars
                        ──driver: iter_batches, one ScoreStore.write_part per block, as each block arrives

Each actor is a ``scoring.blocks.BlockScorer``: it loads the base model once, both init-state adapters and both
directions, and sorts every block it receives by length into token-budget micro-batches (length-aware
batching where the padding is paid). It returns only per-sample scalars keyed by ``sample_id``, so nothing
larger than a score row crosses the object store. Dead actors are restarted (``ray.max_restarts``) and their
in-flight blocks retried (``ray.max_task_retries``); a block is written only once it is fully scored, and
``ScoreStore.consolidate`` keeps each sample_id once, so a crash neither loses nor doubles a row.

The driver writes each scored block as a part the moment it arrives (Ray Data's own ``write_parquet`` sits
behind the actor pool, back-pressured, and wrote every file in the last seconds of a run), so an interruption
keeps every block scored before it. Blocks are cut to exactly ``rows_per_block`` rows and the scoring stage asks
for batches of that size: Ray Data refuses ``batch_size=None`` where actors request GPUs, and with full blocks
each call is still one block.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from ..config import ConfigError, from_dict, stable_hash, to_dict
from ..data.records import DataConfig
from ..models.loading import ModelConfig, load_tokenizer
from ..runtime import RayConfig, init_ray
from .blocks import BlockScorer, tokenize_rows
from .job_config import ScoreJobConfig
from .store import SCORED_ON, ScoreStore

log = logging.getLogger(__name__)

TOKENIZE_CPUS = 0.5  # per tokenise task: light, and leaves room next to the actors on a small machine
# A pool shares out whole blocks and an actor holds several at once, so with one block per actor the first actor
# ready takes them all (SmolLM2 demo: 200 rows as 2 blocks, both in flight on the first actor while the second
# loaded). Blocks are made small enough that every actor gets several.
BLOCKS_PER_ACTOR = 4


def block_plan(n_rows: int, rows_per_call: int, num_actors: int) -> tuple[int, int]:
    """(rows per block, blocks): at most ``rows_per_call`` rows per actor call, and ``BLOCKS_PER_ACTOR`` blocks
    per actor where the corpus has that many rows."""
    rows_per_block = max(1, min(rows_per_call, -(-n_rows // (BLOCKS_PER_ACTOR * num_actors))))
    return rows_per_block, max(1, -(-n_rows // rows_per_block))


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(model_cfg_json: str):
    # Tokenise tasks reuse worker processes: load each tokenizer once per process, not once per block.
    return load_tokenizer(from_dict(ModelConfig, json.loads(model_cfg_json)))


def tokenize_block(block, model_cfg_json: str, data_cfg_json: str):
    """Ray Data task: sample rows -> token rows (a skipped sample keeps a row naming its skip reason)."""
    data_cfg = from_dict(DataConfig, json.loads(data_cfg_json))
    return tokenize_rows(block, _cached_tokenizer(model_cfg_json), data_cfg)


def _log_to_stderr() -> None:
    """Worker processes start with no handler on our logger; Ray forwards worker stderr to the driver."""
    logger = logging.getLogger("sqsd_ray")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class ScoringActor(BlockScorer):
    """The actor class Ray Data instantiates once per pool slot (model loaded in ``__init__``).

    Each scored row carries the id of the node the actor runs on (``SCORED_ON``, kept in the parts, not in
    scores.parquet): run.json's ``ray.rows_per_node`` is counted from it, so where the work ran is what the actors
    saw, not what the scheduler was asked for."""

    def __init__(self, cfg_dict: dict[str, Any]):
        import ray
        import torch

        _log_to_stderr()
        self.node_id = ray.get_runtime_context().get_node_id()  # an actor never moves; a restart runs this again
        cfg = from_dict(ScoreJobConfig, cfg_dict)
        self.torch_threads = cfg.ray.torch_threads_per_actor or 1
        torch.set_num_threads(self.torch_threads)
        super().__init__(cfg)

    def __call__(self, block):
        import torch

        # Ray Data runs the call on its own worker thread; the thread count is set where the work runs.
        torch.set_num_threads(self.torch_threads)
        out = super().__call__(block)
        out[SCORED_ON] = self.node_id
        return out


def score_with_ray(cfg: ScoreJobConfig, store: ScoreStore, rows: list[dict], actor_cls: type | None = None) -> None:
    """Score ``rows`` (from ``scoring.blocks.sample_rows``) on Ray, writing each scored block into ``store`` as it arrives.

    A Ray this call started is shut down if scoring fails or is interrupted, so no Ray process outlives the run.
    """
    with _ray_shut_down_on_failure(cfg):
        _score_blocks(cfg, store, rows, actor_cls or ScoringActor)


def ray_resources(cfg: ScoreJobConfig) -> RayConfig:
    """Start or attach to Ray and resolve the scoring pool against the cluster; a ConfigError for a pool the
    cluster cannot feed (a Ray started here is shut down again then)."""
    with _ray_shut_down_on_failure(cfg):
        return _resolve_pool(cfg)


@contextlib.contextmanager
def _ray_shut_down_on_failure(cfg: ScoreJobConfig) -> Iterator[None]:
    """Start or attach to Ray; a Ray started here is shut down if the block fails or is interrupted, so no Ray
    process outlives a failed run."""
    import ray

    started_here = not ray.is_initialized()
    init_ray(cfg.ray)
    try:
        yield
    except BaseException:
        if started_here:
            ray.shutdown()
        raise


def _resolve_pool(cfg: ScoreJobConfig) -> RayConfig:
    import ray

    cluster = ray.cluster_resources()
    resources = cfg.ray.resolved(cluster_gpus=float(cluster.get("GPU", 0)))
    pool_cpus, cpus = resources.num_actors * resources.num_cpus_per_actor, float(cluster.get("CPU", 0))
    if cpus - pool_cpus < TOKENIZE_CPUS:
        # the pool would hold every CPU and the tokenise tasks feeding it would wait forever (ray#44687)
        raise ConfigError(
            f"ray.num_actors × ray.num_cpus_per_actor = {resources.num_actors} × {resources.num_cpus_per_actor:g} "
            f"leaves {cpus - pool_cpus:g} of the cluster's {cpus:g} CPUs; tokenisation needs {TOKENIZE_CPUS:g} "
            "beside the pool: lower either (fractions are allowed, e.g. 0.75)")
    return resources


def _score_blocks(cfg: ScoreJobConfig, store: ScoreStore, rows: list[dict], actor_cls: type) -> None:
    from tqdm.auto import tqdm

    ds = scoring_dataset(cfg, rows, actor_cls)
    with tqdm(total=len(rows), desc="scoring", unit="sample") as bar:
        for block in ds.iter_batches(batch_size=None, batch_format="pandas", prefetch_batches=0):
            store.write_part(block)
            bar.update(len(block))


def scoring_dataset(cfg: ScoreJobConfig, rows: list[dict], actor_cls: type | None = None):
    """The Ray Data pipeline up to the scored stream (tokenise tasks, then the actor pool): one block of scalars
    per call, not yet written anywhere. ``score_with_ray`` writes each block as a part as it arrives."""
    import pandas as pd
    import ray.data

    resources = _resolve_pool(cfg)
    cfg = replace(cfg, ray=resources)
    rows_per_block, n_blocks = block_plan(len(rows), resources.rows_per_call, resources.num_actors)
    log.info(
        "Ray Data scoring: %d samples in %d blocks of ≤ %d, %d actor(s) × (%s CPU, %s GPU, %d torch threads), "
        "config %s", len(rows), n_blocks, rows_per_block, resources.num_actors, resources.num_cpus_per_actor,
        resources.num_gpus_per_actor,
        resources.torch_threads_per_actor,
        stable_hash(cfg),
    )
    # Blocks of exactly rows_per_block rows (the last may be shorter): with the scoring stage's batch_size equal to
    # it, every call is one block. A batch size that does not match the blocks makes Ray Data bundle several blocks
    # into one call (4 blocks of 50 with a batch size of 64 became 2 bundles of 100), and fewer, larger calls
    # starve a late actor.
    blocks = [pd.DataFrame(rows[i:i + rows_per_block]) for i in range(0, len(rows), rows_per_block)]
    ds = ray.data.from_pandas(blocks)
    ds = ds.map_batches(
        tokenize_block,
        fn_kwargs={"model_cfg_json": json.dumps(to_dict(cfg.model)), "data_cfg_json": json.dumps(to_dict(cfg.data))},
        batch_format="pandas",
        batch_size=None,
        num_cpus=TOKENIZE_CPUS,
    )
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor restarts/retries yet: they travel as ray_remote_args,
        # which it marks deprecated. Explicit values beat Ray Data's default of infinite restarts.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        return _add_scoring_stage(ds, actor_cls or ScoringActor, cfg, resources, rows_per_block)


def _add_scoring_stage(ds, actor_cls, cfg, resources, rows_per_block: int):
    import ray.data

    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs={"cfg_dict": to_dict(cfg)},
        compute=ray.data.ActorPoolStrategy(size=resources.num_actors),
        batch_format="pandas",
        batch_size=rows_per_block,
        num_cpus=resources.num_cpus_per_actor,
        num_gpus=resources.num_gpus_per_actor,
        max_restarts=resources.max_restarts,
        max_task_retries=resources.max_task_retries,
    )
