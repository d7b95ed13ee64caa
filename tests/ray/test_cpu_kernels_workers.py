"""Ray workers started after the CPU kernels are pinned compute with the same kernels as their driver."""

from __future__ import annotations

from tests.unit.test_cpu_kernels import _python, x86_with_avx2


@x86_with_avx2
def test_ray_workers_started_after_the_pin_compute_with_it():
    code = """
import json
from sqsd_ray.cpu_kernels import pin_cpu_kernels
pin_cpu_kernels("avx2")
import ray, torch
from sqsd_ray.runtime import RayConfig, init_ray
init_ray(RayConfig(local_num_cpus=1, object_store_mb=80))

@ray.remote
def capability():
    import torch
    return torch.backends.cpu.get_cpu_capability()

try:
    print(json.dumps({"driver": torch.backends.cpu.get_cpu_capability(), "worker": ray.get(capability.remote())}))
finally:
    ray.shutdown()
"""
    assert _python(code) == {"driver": "AVX2", "worker": "AVX2"}
