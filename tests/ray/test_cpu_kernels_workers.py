"""Ray workers started after the CPU kernels are pinned compute with the same kernels as their driver."""

from __future__ import annotations

from sqsd_ray.cpu_kernels import ENV, PINS
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
    import os, torch
    return [torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
            os.environ.get("ONEDNN_MAX_CPU_ISA")]

try:
    print(json.dumps({"driver": torch.backends.cpu.get_cpu_capability(), "worker": ray.get(capability.remote())}))
finally:
    ray.shutdown()
"""
    assert _python(code) == {"driver": "AVX2", "worker": ["AVX2", "AVX2", "AVX2"]}


@x86_with_avx2
def test_workers_of_an_attached_cluster_get_the_pins_and_data_root_through_the_runtime_env(tmp_path, monkeypatch):
    """A cluster started without the pins: its workers inherit nothing from the driver; the job's runtime_env
    brings the pins, and the data root."""
    from tests.cluster_sim import simulated_cluster

    for name in (ENV, *PINS["avx2"], "SQSD_DATA_DIR"):  # the cluster starts without any of them
        monkeypatch.delenv(name, raising=False)
    code = """
import json
from sqsd_ray.cpu_kernels import pin_cpu_kernels
pin_cpu_kernels("avx2")
import ray
from sqsd_ray.runtime import RayConfig, init_ray
init_ray(RayConfig())  # RAY_ADDRESS: attach

@ray.remote(num_cpus=1)
def capability():
    import os, torch
    return [torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
            os.environ.get("ONEDNN_MAX_CPU_ISA"), os.environ.get("SQSD_DATA_DIR")]

try:
    print(json.dumps({"worker": ray.get(capability.remote())}))
finally:
    ray.shutdown()
"""
    with simulated_cluster(tmp_path, n_workers=1, num_cpus=1, num_gpus=0) as sim:
        # the data root `ref:` names resolve in travels the same way
        answer = _python(code, **sim.env, SQSD_DATA_DIR="/data/reference")
    assert answer == {"worker": ["AVX2", "AVX2", "AVX2", "/data/reference"]}
