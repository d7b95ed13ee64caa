"""Local Ray for the ray tier: small (2 CPUs, 150 MB object store, no dashboard), one per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=150_000_000, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
