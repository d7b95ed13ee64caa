"""Every file under cluster/ is checked the way its consumer would read it: YAML loads; each KubeRay resource has the
keys the operator needs (and the combinations its validation allows); each RayJob runs a sqsd-ray verb with a job file
that exists in jobs/, on the one RayCluster defined here; the runtime environment is well-formed; shell scripts pass
``bash -n``. A file of a kind this test does not know fails it, so a new file cannot go unchecked."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from sqsd_ray.cli import build_parser
from tests.conftest import REPO_ROOT

CLUSTER = REPO_ROOT / "cluster"
FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
YAML_FILES = [p for p in FILES if p.suffix in (".yaml", ".yml")]
SHELL_FILES = [p for p in FILES if p.suffix == ".sh"]
OTHER_FILES = {"Dockerfile", "Dockerfile.dockerignore"}  # checked by the tests below that read them
# the verbs a cluster runs, each with a RayJob template: (command, subcommand)
CLUSTER_VERBS = {("score", None), ("directions", "build"), ("experiment", "effectiveness"),
                 ("experiment", "mitigate"), ("restore", None)}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Kubernetes resource names KubeRay derives Services from


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _resources(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path in YAML_FILES for doc in _documents(path)
            if doc.get("apiVersion") == "ray.io/v1" and doc.get("kind") == kind]


def _image_checkout() -> str:
    """Where cluster/Dockerfile puts the checkout in the image (its WORKDIR): the RayJobs name job files there."""
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M)
    assert len(workdirs) == 1, f"cluster/Dockerfile should have one WORKDIR, found {workdirs}"
    return workdirs[0].rstrip("/") + "/"


def _commands(entrypoint: str) -> list[list[str]]:
    """The sqsd-ray commands of a RayJob entrypoint: one, or several joined by && inside ``bash -c '...'``."""
    words = shlex.split(entrypoint)
    if words[:2] == ["bash", "-c"]:
        assert len(words) == 3, f"bash -c takes one quoted script: {entrypoint!r}"
        return [shlex.split(part) for part in words[2].split("&&")]
    assert "&&" not in words and ";" not in entrypoint, \
        f"{entrypoint!r}: KubeRay's submitter runs the entrypoint in its own shell; wrap a sequence in bash -c '...'"
    return [words]


def test_every_file_under_cluster_is_of_a_known_kind():
    assert YAML_FILES and SHELL_FILES
    unknown = [p for p in FILES if p not in YAML_FILES and p not in SHELL_FILES and p.name not in OTHER_FILES]
    assert not unknown, f"no check knows these files under cluster/: {unknown}"
    for name in OTHER_FILES | {"setup.sh"}:
        assert (CLUSTER / name).is_file(), f"cluster/{name} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_file_loads_and_opens_with_a_comment(path):
    assert path.read_text().startswith("#"), f"{path.name} must open with a comment saying how it is used"
    assert _documents(path), f"{path} holds no YAML document"


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shell_script_passes_bash_n(path):
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_raycluster_has_what_kuberay_needs():
    import ray

    clusters = _resources("RayCluster")
    assert [doc["metadata"]["name"] for _, doc in clusters] == ["sqsd-ray"], "one RayCluster spec, shared by the jobs"
    volumes = {doc["metadata"]["name"] for path in YAML_FILES for doc in _documents(path)
               if doc.get("kind") == "PersistentVolumeClaim"}
    for path, doc in clusters:
        spec = doc["spec"]
        assert DNS_1035.match(doc["metadata"]["name"])
        assert spec["rayVersion"] == ray.__version__, f"{path.name}: rayVersion differs from the Ray sqsd-ray uses"
        assert f"rayproject/ray:{spec['rayVersion']}-" in (CLUSTER / "Dockerfile").read_text()
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert all(g.get("groupName") for g in spec["workerGroupSpecs"])
        for group in groups:
            pod = group["template"]["spec"]
            assert "rayStartParams" in group and pod["containers"][0]["image"]
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                      if "persistentVolumeClaim" in v}
            assert claims <= volumes, f"{path.name}: volume claims {claims - volumes} are not defined under cluster/"
            env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
            # the token only ever from a Secret, never a value in a manifest
            assert "value" not in env.get("HF_TOKEN", {}) and "secretKeyRef" in env["HF_TOKEN"]["valueFrom"]


def test_a_rayjob_per_cluster_verb_on_the_shared_raycluster_with_job_files_that_exist():
    clusters = {doc["metadata"]["name"] for _, doc in _resources("RayCluster")}
    checkout = _image_checkout()
    parser = build_parser()
    verbs = set()
    jobs = _resources("RayJob")
    for path, doc in jobs:
        name, spec = doc["metadata"]["name"], doc["spec"]
        assert DNS_1035.match(name) and len(name) <= 47, f"{path.name}: {name!r} is no valid RayJob name"
        assert spec["entrypoint"].strip() and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), \
            f"{path.name}: set exactly one of clusterSelector and rayClusterSpec"
        selected = spec["clusterSelector"]["ray.io/cluster"]
        assert selected in clusters, f"{path.name}: clusterSelector names {selected!r}, defined nowhere in cluster/"
        # KubeRay's validation refuses these with clusterSelector
        assert not spec.get("backoffLimit") and not spec.get("suspend") and not spec.get("shutdownAfterJobFinishes")
        for command in _commands(spec["entrypoint"]):
            assert command[0] == "sqsd-ray", f"{path.name}: {command}"
            args = parser.parse_args(command[1:])  # the verb and its flags as sqsd-ray reads them
            verbs.add((args.command, getattr(args, "directions_command", None) or getattr(args, "kind", None)))
            assert args.config, f"{path.name}: {command} names no --config"
            for config in args.config:
                assert str(config).startswith(checkout), f"{path.name}: {config} is not in the image's checkout"
                local = REPO_ROOT / str(config)[len(checkout):]
                assert local.parent == REPO_ROOT / "jobs" and local.is_file(), f"{path.name}: {local} does not exist"
    assert verbs == CLUSTER_VERBS, f"RayJob templates cover {sorted(verbs, key=str)}"
    assert len({doc["metadata"]["name"] for _, doc in jobs}) == len(jobs), "two RayJobs share a name"


def test_runtime_env_uploads_the_checkout_and_carries_no_secret():
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "." and ".venv/" in runtime_env["excludes"]
    assert set(runtime_env) <= {"working_dir", "excludes", "env_vars"}, "pip/conda here would reinstall per job"
    env_vars = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "Ray takes env_vars as strings only"
    secrets = {k for k in env_vars if re.search(r"(^|_)(TOKEN|SECRET|PASSWORD|KEY)(_|$)", k)}
    assert not secrets, f"{secrets}: runtime_env is shown in the dashboard; secrets come from the node environment"
