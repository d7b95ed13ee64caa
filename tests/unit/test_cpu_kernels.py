"""CPU kernels pinned before torch loads: torch and the Ray workers a process starts compute with AVX2 kernels."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sqsd_ray.cpu_kernels import ENV, PINS, pin_cpu_kernels, requested_kernels

REPO = Path(__file__).resolve().parents[2]
FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
x86_with_avx2 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or " avx2" not in FLAGS,
                                   reason="the pins are for x86-64 CPUs with AVX2")


def _python(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (ENV, *PINS["avx2"])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                            env={**clean, "PYTHONPATH": str(REPO), **env}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


CAPABILITY = """
import json, sys
from sqsd_ray.cpu_kernels import pin_cpu_kernels
pin_cpu_kernels(sys.argv[1] if len(sys.argv) > 1 else None)
import torch
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}))
"""


@x86_with_avx2
def test_pinned_torch_uses_avx2_and_native_keeps_the_cpus_own():
    native = _python("import json, torch; print(json.dumps({'capability': torch.backends.cpu.get_cpu_capability()}))")
    assert _python(CAPABILITY)["capability"] == "AVX2"  # the default
    assert _python(CAPABILITY, **{ENV: "native"})["capability"] == native["capability"]


def test_after_torch_is_imported_the_pin_only_warns(monkeypatch, caplog):
    import torch  # noqa: F401  (already imported in this process: the point of the test)

    for name in (ENV, *PINS["avx2"]):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING, logger="sqsd_ray.cpu_kernels"):
        assert pin_cpu_kernels("avx2") == "avx2"
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "torch was imported before" in caplog.text and "ATEN_CPU_CAPABILITY=avx2" in caplog.text
    assert all(name not in os.environ for name in PINS["avx2"])  # a half-pinned process would mix kernels


def test_an_unknown_choice_names_where_it_came_from(monkeypatch):
    monkeypatch.setenv(ENV, "avx512")
    with pytest.raises(ValueError, match="'avx512' \\(from SQSD_CPU_KERNELS\\): choose one of avx2, native"):
        requested_kernels()
    with pytest.raises(ValueError, match="from --cpu-kernels"):
        requested_kernels("sse")


def test_the_demo_report_says_which_kernels_computed_it():
    from sqsd_ray.demo.pipeline import _kernels_line

    assert "AVX2, pinned" in _kernels_line({"requested": "avx2", "torch_capability": "AVX2"})
    assert "the AVX2 pin did not apply" in _kernels_line({"requested": "avx2", "torch_capability": "AVX512"})
    assert "the CPU's own" in _kernels_line({"requested": "native", "torch_capability": "AVX512"})


@x86_with_avx2
def test_sqsd_ray_demo_pins_before_anything_loads_torch(tmp_path):
    """The real CLI path up to the pipeline (stood in for, so that no demo runs): the demo computes with AVX2."""
    code = f"""
import json, sys, types
from pathlib import Path
stand_in = types.ModuleType("sqsd_ray.demo.pipeline")
class DemoSettings:
    def __init__(self, **settings):
        pass
def run_demo(settings):
    import torch
    report = Path({str(tmp_path)!r}) / "report.md"
    report.write_text(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability()}}))
    return report
stand_in.DemoSettings, stand_in.run_demo = DemoSettings, run_demo
sys.modules["sqsd_ray.demo.pipeline"] = stand_in
from sqsd_ray.cli import main
assert main(["demo", "--out", {str(tmp_path)!r}]) == 0
print(json.dumps({{}}))
"""
    _python(code)
    assert json.loads((tmp_path / "report.md").read_text()) == {"capability": "AVX2"}
    code_native = code.replace('["demo", "--out"', '["demo", "--cpu-kernels", "native", "--out"')
    _python(code_native)
    native = _python("import json, torch; print(json.dumps({'capability': torch.backends.cpu.get_cpu_capability()}))")
    assert json.loads((tmp_path / "report.md").read_text()) == native
