"""The CPU's vector kernels, pinned so that two machines compute the demo alike.

torch's own kernels (ATen), MKL's BLAS and oneDNN each pick the widest vector instructions the CPU offers. A
machine with AVX-512 then adds floats in another order than one with AVX2 only, and the demo's fine-tunes amplify
that last-bit difference into other Table 1 figures (docs/demo.md, "Floating point alone": world 2's seed 0 on an
AVX-512 AMD EPYC gave SQSD Δ +68.2 with the CPU's own kernels and the published +11.8 with them pinned to AVX2).
Every x86-64 server CPU of the last decade has AVX2, so the demo pins all three libraries to it unless asked not
to (``--cpu-kernels native`` or ``SQSD_CPU_KERNELS=native``).

The pins are environment variables that each library reads once, when it first computes: they take effect only
when set before torch is imported, and the Ray workers a process starts afterwards inherit them (an attached
cluster's workers get them through the job's runtime_env, ``runtime.init_ray``). MKL's and oneDNN's are upper
bounds; torch's is not (it would run AVX2 kernels on a CPU without them), so it is set only where the CPU lists
AVX2 and FMA. On other CPUs (ARM) nothing is set.
"""

from __future__ import annotations

import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

ENV = "SQSD_CPU_KERNELS"
CHOICES = ("avx2", "native")
PINS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def requested_kernels(kernels: str | None = None) -> str:
    """``kernels``, else ``$SQSD_CPU_KERNELS``, else avx2; an unknown name is an error that lists the choices."""
    choice = (kernels or os.environ.get(ENV) or "avx2").lower()
    if choice not in CHOICES:
        raise ValueError(f"CPU kernels {choice!r} (from {'--cpu-kernels' if kernels else ENV}): choose one of "
                         f"{', '.join(CHOICES)}")
    return choice


def pin_cpu_kernels(kernels: str | None = None) -> str:
    """Pin torch, MKL and oneDNN to ``kernels`` (see ``requested_kernels``) for this process and the processes it
    starts; returns what was asked. Call it before torch is imported: afterwards it can only warn."""
    choice = requested_kernels(kernels)
    os.environ[ENV] = choice  # for the run's record, and for the processes this one starts
    loaded = "torch" in sys.modules
    if choice == "native":
        if not loaded:  # pins inherited from a parent process would otherwise stay in force
            for name in PINS["avx2"]:
                os.environ.pop(name, None)
        return choice
    pins = cpu_pins(choice)
    if loaded and any(os.environ.get(name) != value for name, value in pins.items()):
        log.warning("CPU kernels: torch was imported before they could be pinned to %s, so this process keeps the "
                    "CPU's own; set %s before Python starts to pin them", choice,
                    " ".join(f"{name}={value}" for name, value in pins.items()))
        return choice
    os.environ.update(pins)
    return choice


def cpu_pins(choice: str) -> dict[str, str]:
    """The environment of ``choice`` this CPU can take: none off x86-64; torch's only where AVX2 and FMA are listed."""
    if choice == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    flags = cpu_flags()
    return {name: value for name, value in PINS[choice].items()
            if name != "ATEN_CPU_CAPABILITY" or {"avx2", "fma"} <= flags}


def pinned(record: dict) -> bool:
    """Whether a run's record (``cpu_kernels_record``) shows every pin this CPU can take in force."""
    pins = record.get("pins")
    return bool(pins) and all(record.get(name) == value for name, value in pins.items())


def cpu_flags() -> set[str]:
    cpuinfo = "/proc/cpuinfo"
    if not os.path.isfile(cpuinfo):
        return set()  # no listing (macOS, Windows): torch's own choice is left alone
    with open(cpuinfo) as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def cpu_kernels_record() -> dict:
    """What this process computes with, for a run's record: torch's kernel level, the pins asked for on this CPU
    and those in its environment (read as they are: a record never fails a finished run)."""
    import torch

    requested = os.environ.get(ENV) or "avx2"
    return {"requested": requested, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "pins": cpu_pins(requested) if requested in CHOICES else {},
            **{name: os.environ.get(name) for name in PINS["avx2"]}}


__all__ = ["CHOICES", "ENV", "cpu_flags", "cpu_kernels_record", "cpu_pins", "pin_cpu_kernels", "pinned", "requested_kernels"]
