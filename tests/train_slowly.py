"""A training verb of ``sqsd-ray`` with every optimizer step slowed down, so a test can take a node away mid-run.

    python -m tests.train_slowly SECONDS_PER_STEP -- directions build --config job.yaml ...

The Ray Train workers run ``slow_train_worker``, which travels by value (it is defined here, not in the package)
and slows ``Trainer.train_step`` in the worker's own process before running the package's ``train_worker``.
Only the driver's reference is swapped; a worker process imports the package unpatched.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray import cloudpickle

from sqsd_ray.cli import main
from sqsd_ray.training import loop

cloudpickle.register_pickle_by_value(sys.modules[__name__])
DELAY = 0.0


def slow_train_worker(config: dict[str, Any]) -> None:
    from sqsd_ray.training import loop as worker_loop

    step = worker_loop.Trainer.train_step
    delay = DELAY

    def slowed(self, forward=None):
        time.sleep(delay)
        return step(self, forward)

    worker_loop.Trainer.train_step = slowed
    worker_loop.train_worker(config)  # the worker imported the package itself: its loop, not this wrapper


if __name__ == "__main__":
    DELAY = float(sys.argv[1])
    rest = sys.argv[2:]
    rest = rest[1:] if rest and rest[0] == "--" else rest
    loop.train_worker = slow_train_worker
    sys.exit(main(rest))
