"""A private local Ray listens on loopback only: GCS, raylets, workers, agents and dashboard."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.ray

# Started in a fresh process, as `sqsd-ray` does: the test session's own Ray is already running. It lists every
# listening TCP socket of itself and of every process it started, while a task has run (workers up).
LIST_SOCKETS = """
import json, psutil, ray
from sqsd_ray.runtime import RayConfig, init_ray
init_ray(RayConfig(local_num_cpus=1, object_store_mb=80, include_dashboard=True))
ray.get(ray.remote(lambda: 1).remote())
me = psutil.Process()
sockets = []
for proc in [me, *me.children(recursive=True)]:
    try:
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                sockets.append([proc.name(), conn.laddr.ip, conn.laddr.port])
    except psutil.NoSuchProcess:
        pass
ray.shutdown()
print("SOCKETS", json.dumps(sockets))
"""


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def test_private_local_ray_listens_on_loopback_only(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no RAY_ADDRESS: a private Ray; its token in tmp
    out = subprocess.run([sys.executable, "-c", LIST_SOCKETS], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("SOCKETS ")), None)
    assert line, out.stderr[-3000:]
    import json

    sockets = json.loads(line.removeprefix("SOCKETS "))
    names = {name for name, _, _ in sockets}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names
    outward = [s for s in sockets if not _is_loopback(s[1])]
    assert not outward, f"listening beyond loopback: {outward}"
