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
# on a CPU whose own kernels are AVX2 already, "pinned" and "native" compute alike: only the environment tells them apart
WIDER_THAN_AVX2 = " avx512f" in FLAGS


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
import os, torch
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "env": {name: os.environ.get(name) for name in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                                  "ONEDNN_MAX_CPU_ISA")}}))
"""


@x86_with_avx2
def test_pinned_torch_uses_avx2_and_native_keeps_the_cpus_own():
    native = _python("import json, torch; print(json.dumps({'capability': torch.backends.cpu.get_cpu_capability()}))")
    pinned = _python(CAPABILITY)  # the default
    assert pinned == {"capability": "AVX2", "env": PINS["avx2"]}
    # native also drops pins inherited from the shell
    own = _python(CAPABILITY, **{ENV: "native"}, **PINS["avx2"])
    assert own == {"capability": native["capability"], "env": dict.fromkeys(PINS["avx2"])}
    if WIDER_THAN_AVX2:
        assert native["capability"] != "AVX2"


def test_after_torch_is_imported_the_pin_only_warns(monkeypatch, caplog):
    import torch  # noqa: F401  (already imported in this process: the point of the test)

    monkeypatch.setenv(ENV, "avx2")  # so that monkeypatch restores it: pin_cpu_kernels sets it
    for name in PINS["avx2"]:
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

    in_force = {"requested": "avx2", "torch_capability": "AVX2", "pins": PINS["avx2"], **PINS["avx2"]}
    assert "AVX2, pinned" in _kernels_line(in_force)
    # AVX2 by the CPU's own choice, not by the pin: not called pinned
    unset = {**in_force, **dict.fromkeys(PINS["avx2"])}
    assert "the AVX2 pin did not apply" in _kernels_line(unset)
    assert "the AVX2 pin did not apply" in _kernels_line({**unset, "torch_capability": "AVX512"})
    assert "the CPU's own" in _kernels_line({"requested": "native", "torch_capability": "AVX512", "pins": {}})


def test_torch_is_pinned_only_on_cpus_that_list_avx2_and_fma(monkeypatch):
    from sqsd_ray import cpu_kernels

    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"sse4_2", "avx"})
    assert cpu_kernels.cpu_pins("avx2") == {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx2", "fma"})
    assert cpu_kernels.cpu_pins("avx2") == PINS["avx2"]
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "aarch64")
    assert cpu_kernels.cpu_pins("avx2") == {}


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
    if not WIDER_THAN_AVX2:
        return  # native is AVX2 too here
    code_native = code.replace('["demo", "--out"', '["demo", "--cpu-kernels", "native", "--out"')
    _python(code_native)
    native = _python("import json, torch; print(json.dumps({'capability': torch.backends.cpu.get_cpu_capability()}))")
    assert json.loads((tmp_path / "report.md").read_text()) == native
