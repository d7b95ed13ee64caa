"""A multi-node Ray cluster on one machine, for tests: a head without CPUs and worker nodes with logical GPUs, every
process on 127.0.0.1, driven from subprocess drivers the way users run jobs.

    with simulated_cluster(tmp_path, dashboard=True) as sim:
        subprocess.run([sys.executable, "-m", "sqsd_ray.cli", "score", ...], env=sim.env)   # RAY_ADDRESS set
        subprocess.run([RAY, "job", "submit", "--address", sim.dashboard_url, ...], env=sim.env)
        sim.remove_worker(sim.workers[0])            # a machine vanishes: its raylet and workers are killed
        sim.add_worker()                             # a replacement joins

The nodes are ``ray.cluster_utils.Cluster`` nodes, held by a child process (``python -m tests.cluster_sim``)
rather than by pytest: the test process already holds its own local Ray, one process is the driver of one cluster
at most, and the cluster's environment (a private HOME with the auth token, RAY_AUTH_MODE, the loopback switch,
RAY_TMPDIR) must never reach the pytest process. The child takes JSON commands on stdin and answers on a pipe of
its own (Ray prints to stdout); when its stdin closes (pytest died) it tears the cluster down, and Ray binds every
process it starts to it with the kernel's parent-death signal. Everything lives in one short /tmp directory (Ray's
socket paths have a length limit), removed on shutdown. Node-death detection keeps Ray's defaults (a killed node
is declared dead after about 15 s of failed health checks), so a test sees what a real cluster would.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK = "127.0.0.1"
OBJECT_STORE_BYTES = 100_000_000  # per node: tiny models only; three nodes share the machine's /dev/shm


@dataclass(frozen=True)
class SimNode:
    """A worker node: its Ray node id (hex, as ``ray.get_runtime_context().get_node_id()`` reports it), the PID of
    its raylet (the node's workers are the raylet's children) and the logical resources it offers."""

    node_id: str
    raylet_pid: int
    num_cpus: int
    num_gpus: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


class SimulatedCluster:
    """A head (0 CPUs) and ``n_workers`` worker nodes (4 logical CPUs and 1 logical GPU each), all on 127.0.0.1.

    ``address`` is the GCS address for ``ray.init`` / RAY_ADDRESS; ``env`` the environment of a driver subprocess;
    ``dashboard_url`` is set with ``dashboard=True`` (``ray job submit``). ``auth`` (default: ``dashboard``) turns on
    token auth as cluster/ runs its clusters, the token generated into the cluster's private HOME; Ray 2.60's job
    submission to a dashboard on 127.0.0.1 also works without it."""

    def __init__(self, n_workers: int = 2, num_cpus: int = 4, num_gpus: int = 1, dashboard: bool = False,
                 auth: bool | None = None, start_timeout_s: float = 120.0):
        self.root = Path(tempfile.mkdtemp(prefix="sqsim-", dir="/tmp"))  # short: socket paths are length-limited
        self.auth = dashboard if auth is None else auth
        self.address = ""
        self.dashboard_url: str | None = None
        self.workers: list[SimNode] = []
        self._host: subprocess.Popen | None = None
        self._answers = -1
        self._buffer = b""
        self._log = open(self.root / "host.log", "ab")
        self._base_env = self._cluster_env()
        try:
            if self.auth:
                subprocess.run([RAY, "get-auth-token", "--generate"], env=self._base_env, check=True,
                               capture_output=True, timeout=60)
            self._start_host(dashboard, start_timeout_s)
            for _ in range(n_workers):
                self.add_worker(num_cpus, num_gpus)
        except BaseException:
            self.shutdown()
            raise

    def _cluster_env(self) -> dict[str, str]:
        home = self.root / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "RAY_TMPDIR": str(self.root), "RAY_USAGE_STATS_ENABLED": "0",
               # with node_ip_address 127.0.0.1, keeps every Ray process on loopback (otherwise Ray swaps in the
               # machine's outward address and binds every interface)
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        # always explicit: a local ray.init (the test session's own Ray) leaves RAY_AUTH_MODE=token in os.environ
        env["RAY_AUTH_MODE"] = "token" if self.auth else "disabled"
        return env

    @property
    def env(self) -> dict[str, str]:
        """Environment for a driver subprocess on this cluster (``sqsd-ray score``, ``ray job submit``): RAY_ADDRESS,
        the private HOME (auth token), RAY_AUTH_MODE, RAY_TMPDIR and the loopback switch."""
        return {**self._base_env, "RAY_ADDRESS": self.address}

    # ---- the host process

    def _start_host(self, dashboard: bool, timeout: float) -> None:
        self._answers, answers_w = os.pipe()
        spec = {"root": str(self.root), "temp_dir": str(self.root / "ray"), "answer_fd": answers_w,
                "dashboard": dashboard, "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
                "metrics_export_port": free_port()}
        self._host = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster_sim", json.dumps(spec)], cwd=REPO_ROOT, env=self._base_env,
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, pass_fds=(answers_w,),
            start_new_session=True,  # Ctrl-C in a terminal goes to pytest alone, whose teardown stops the cluster
        )
        os.close(answers_w)
        hello = self._read_answer(timeout)
        self.address = hello["address"]
        if dashboard:
            self.dashboard_url = f"http://{hello['webui_url']}"
            self._wait_for_dashboard(timeout)

    def _wait_for_dashboard(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # up, and asking for the token
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"dashboard {self.dashboard_url} did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def _read_answer(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the cluster host did not answer in {timeout:.0f} s:\n{self.log_tail()}")
            ready, _, _ = select.select([self._answers], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._answers, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"the cluster host exited ({self._host.poll()}):\n{self.log_tail()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"cluster host: {answer['error']}")
        return answer

    def _call(self, timeout: float = 120.0, **command: Any) -> dict[str, Any]:
        if self._host is None or self._host.poll() is not None:
            raise RuntimeError("the simulated cluster is not running")
        self._host.stdin.write((json.dumps(command) + "\n").encode())
        self._host.stdin.flush()
        return self._read_answer(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the host's log (Ray's start-up and teardown messages)."""
        self._log.flush()
        return (self.root / "host.log").read_text(errors="replace")[-chars:]

    # ---- nodes

    def add_worker(self, num_cpus: int = 4, num_gpus: int = 1) -> SimNode:
        """Start a worker node; returns once the GCS lists it alive."""
        node = SimNode(**self._call(op="add", num_cpus=num_cpus, num_gpus=num_gpus)["node"])
        self.workers.append(node)
        return node

    def remove_worker(self, node: SimNode, wait_until_dead: bool = True) -> None:
        """Lose ``node`` abruptly, as a machine that vanished: its raylet, object store and workers get SIGKILL, with
        no draining. With ``wait_until_dead``, returns once the GCS has declared the node dead (Ray's health
        checks: about 15 s)."""
        self._call(op="remove", node_id=node.node_id, wait=wait_until_dead)
        self.workers.remove(node)

    # ---- processes

    def processes(self) -> list[int]:
        """PIDs of the live processes of this cluster: the host and its descendants (the nodes' daemons, agents and
        workers), and whatever carries this cluster's RAY_TMPDIR in its environment (workers, which Ray puts in
        process groups of their own and which outlive a killed raylet for a moment; drivers started with ``env``)."""
        import psutil

        found = set()
        if self._host is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                host = psutil.Process(self._host.pid)
                found = {host.pid, *(p.pid for p in host.children(recursive=True))}
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                if proc.environ().get("RAY_TMPDIR") == str(self.root):
                    found.add(proc.pid)
        alive = []
        for pid in sorted(found):
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def listening_sockets(self) -> list[tuple[str, str, int]]:
        """(process name, address, port) of every listening TCP socket of this cluster's processes."""
        import psutil

        sockets = []
        for pid in self.processes():
            try:
                proc = psutil.Process(pid)
                sockets += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                            if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                continue
        return sockets

    def shutdown(self, timeout: float = 60.0) -> list[int]:
        """Stop every node (the host removes them, then exits), SIGKILL whatever of this cluster outlived that, and
        remove the temp dir. Returns the PIDs that had to be killed (empty when the teardown was clean)."""
        killed: list[int] = []
        host = self._host
        if host is not None:
            if host.poll() is None:
                with contextlib.suppress(OSError):
                    host.stdin.write(b'{"op": "shutdown"}\n')
                    host.stdin.flush()
                with contextlib.suppress(OSError):
                    host.stdin.close()  # EOF: the host tears down even if it missed the command
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.wait(timeout=timeout)
            killed = self.processes()
            for pid in killed:  # only this cluster's processes (its RAY_TMPDIR), never a broader match
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.wait(timeout=10)
            self._host = None
        if self._answers >= 0:
            os.close(self._answers)
            self._answers = -1
        self._log.close()
        self.workers = []
        shutil.rmtree(self.root, ignore_errors=True)
        return killed


@contextlib.contextmanager
def simulated_cluster(tmp_path: Path | None = None, dashboard: bool = False,
                      **kwargs: Any) -> Iterator[SimulatedCluster]:
    """A ``SimulatedCluster`` for the ``with`` block, shut down after it (also when the block fails); ``kwargs`` go
    to ``SimulatedCluster``. ``tmp_path`` (a test's folder) receives the host's log, for a post-mortem."""
    sim = SimulatedCluster(dashboard=dashboard, **kwargs)
    try:
        yield sim
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                shutil.copy(sim.root / "host.log", Path(tmp_path) / "cluster_host.log")
        sim.shutdown()


# ------------------------------------------------------------------------------------------- the host process


def _serve(spec: dict[str, Any]) -> None:
    """Hold a ``ray.cluster_utils.Cluster`` and apply the commands read from stdin, one JSON line each."""
    answers = os.fdopen(spec["answer_fd"], "w", buffering=1)

    def answer(**payload: Any) -> None:
        answers.write(json.dumps(payload) + "\n")

    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "node_ip_address": LOOPBACK, "object_store_memory": OBJECT_STORE_BYTES,
            "temp_dir": spec["temp_dir"], "include_dashboard": spec["dashboard"], "dashboard_host": LOOPBACK,
            # Ray's fixed defaults (8265, 52365, ...) would clash with any other Ray on the machine
            "dashboard_port": spec["dashboard_port"],
            "dashboard_agent_listen_port": spec["dashboard_agent_listen_port"],
            "metrics_export_port": spec["metrics_export_port"]}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    nodes: dict[str, Any] = {}
    answer(address=cluster.address, webui_url=cluster.webui_url)
    orphaned = True  # until told to shut down: stdin's EOF means the test process is gone, and nobody cleans up
    try:
        for line in sys.stdin:
            command = json.loads(line)
            try:
                if command["op"] == "add":
                    node = cluster.add_node(num_cpus=command["num_cpus"], num_gpus=command["num_gpus"],
                                            node_ip_address=LOOPBACK, object_store_memory=OBJECT_STORE_BYTES)
                    nodes[node.node_id] = node
                    answer(node={"node_id": node.node_id, "raylet_pid": node.all_processes["raylet"][0].process.pid,
                                 "num_cpus": command["num_cpus"], "num_gpus": command["num_gpus"]})
                elif command["op"] == "remove":
                    cluster.remove_node(nodes.pop(command["node_id"]), allow_graceful=False)
                    if command["wait"]:
                        _wait_until_dead(cluster, command["node_id"])
                    answer(removed=command["node_id"])
                elif command["op"] == "shutdown":
                    orphaned = False
                    break
                else:
                    answer(error=f"unknown op {command['op']!r}")
            except Exception as err:  # noqa: BLE001 - every failure goes back to the test, named
                answer(error=f"{type(err).__name__}: {err}")
    finally:
        cluster.shutdown()
        if orphaned:
            shutil.rmtree(spec["root"], ignore_errors=True)


def _wait_until_dead(cluster, node_id: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(n["Alive"] for n in cluster.global_state.node_table() if n["NodeID"] == node_id):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the GCS still lists node {node_id} alive {timeout:.0f} s after its processes were killed")


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
