"""``sqsd-ray`` with every scoring call slowed down, so a test or a bench can interrupt a run part-way.

    python -m tests.score_slowly SECONDS_PER_CALL [--ray-gpus N] -- score --config job.yaml ...

Each scoring call (a part in process, a block on Ray) first sleeps SECONDS_PER_CALL. On Ray the slow actor class
travels by value (it is defined here, not in the package). With ``--ray-gpus N`` the script starts a local Ray
with N logical GPUs (and ``--ray-cpus`` CPUs) on 127.0.0.1 first, as a GPU node would offer them.
"""

from __future__ import annotations

import argparse
import sys
import time

from ray import cloudpickle

from sqsd_ray.cli import main
from sqsd_ray.scoring import blocks, ray_pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])
DELAY = 0.0


class SlowActor(ray_pool.ScoringActor):
    delay = 0.0

    def __call__(self, block):
        time.sleep(self.delay)
        return super().__call__(block)


def _slow_in_process(call):
    def slowed(self, block):
        time.sleep(DELAY)
        return call(self, block)

    return slowed


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("delay", type=float)
    parser.add_argument("--ray-gpus", type=float, default=None)
    parser.add_argument("--ray-cpus", type=int, default=4)
    args, rest = parser.parse_known_args()
    rest = rest[1:] if rest and rest[0] == "--" else rest
    DELAY = SlowActor.delay = args.delay
    blocks.BlockScorer.__call__ = _slow_in_process(blocks.BlockScorer.__call__)
    score_on_ray = ray_pool.score_with_ray
    ray_pool.score_with_ray = lambda cfg, store, rows, actor_cls=None: score_on_ray(cfg, store, rows, SlowActor)
    if args.ray_gpus is not None:
        import ray

        from sqsd_ray.runtime import LOOPBACK, loopback_only

        loopback_only()
        ray.init(num_cpus=args.ray_cpus, num_gpus=args.ray_gpus, object_store_memory=150_000_000,
                 include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=True)
    sys.exit(main(rest))
