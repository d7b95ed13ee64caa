"""The per-module reduction (Eq. 9–12) through ``torch.compile``: ``scoring.compile: auto | on | off``.

Eager, every LoRA module's backward hook dispatches ~20 small operators (casts, masks, five matmuls, three
einsums, a diagonal, a clamp) per pass; on a narrow model, and on any GPU, that dispatch is the cost. Compiled,
``kernel.project_module_stacked`` becomes one graph: the matmuls stay library calls, the rest is fused.

One compiled function serves every module: shapes are dynamic (``dynamic=True``), so the token count, the batch
size and the module's (d_out, d_in) do not recompile; only a dimension of size 1 (a batch of one, a single target)
is specialised, so a run compiles one or two graphs. ``auto`` follows a fixed rule (below: CUDA compiles, CPU does
not), never a timing taken at run time, so the same config picks the same kernel everywhere. When compiling fails (no C++ compiler for the CPU
backend, an unsupported device, a graph the compiler cannot follow), ``auto`` logs one line and the reduction runs
eagerly; ``on`` raises instead.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import ConfigError
from .kernel import project_module_stacked

log = logging.getLogger(__name__)

CompileSetting = Literal["auto", "on", "off"]

# ``auto``'s rule, from bench/kernel.py (e) (docs/benchmarks.md, "Compiled reduction"): on 2 CPU cores the compiled
# reduction dispatched 7x fewer operators per module but scored at 0.9-1.1x the eager speed (the model's own forward
# and backward dominate a CPU pass, and the compiled graph's call costs about what the fused operators save), after
# ~20 s of compiling. A GPU pass is the opposite case: thousands of launches of tiny kernels per batch. So auto
# compiles on CUDA and runs eagerly on CPU.
AUTO_COMPILES_ON = ("cuda",)


class CompileUnavailable(ConfigError):
    """``scoring.compile: on`` and the reduction cannot be compiled here."""


@dataclass
class CompileDecision:
    """What ``scoring.compile`` resolved to, and why (recorded in run.json)."""

    setting: str
    compiled: bool
    reason: str


def _cpu_compiler_missing() -> str | None:
    """The CPU backend (inductor) builds C++: the reason it cannot, or None."""
    compiler = os.environ.get("CXX", "g++")
    return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) for torch.compile's CPU backend"


def decide_compile(setting: CompileSetting, device: torch.device) -> CompileDecision:
    """Resolve ``scoring.compile`` on ``device``."""
    if setting == "off":
        return CompileDecision(setting, False, "scoring.compile: off")
    if device.type not in ("cpu", "cuda"):
        return _unavailable(setting, f"torch.compile is not used on {device.type}")
    if setting == "auto" and device.type not in AUTO_COMPILES_ON:
        return CompileDecision(setting, False, f"auto: eager on {device.type} (compiling does not pay there, "
                                               "docs/benchmarks.md)")
    if device.type == "cpu":
        missing = _cpu_compiler_missing()
        if missing:
            return _unavailable(setting, missing)
    return CompileDecision(setting, True, "scoring.compile: on" if setting == "on" else f"auto: {device.type}")


def _unavailable(setting: str, reason: str) -> CompileDecision:
    if setting == "on":
        raise CompileUnavailable(f"scoring.compile: on, but {reason}; use scoring.compile: auto or off")
    if setting == "auto":
        log.info("scoring.compile: auto runs the reduction eagerly: %s", reason)
    return CompileDecision(setting, False, reason)


class CompiledReduction:
    """``project_module_stacked`` through ``torch.compile``, falling back to eager (one logged line) if it fails."""

    def __init__(self, decision: CompileDecision):
        self.decision = decision
        self.calls = 0  # compiled calls made
        self._compiled = None
        try:  # e.g. a Python version the installed torch's compiler does not support
            self._compiled = torch.compile(project_module_stacked, dynamic=True)
        except Exception as err:  # noqa: BLE001 - any reason not to compile means: run eagerly (auto)
            self._fall_back(err)

    @property
    def active(self) -> bool:
        return self._compiled is not None

    def __call__(self, x, a, gu, A0, B0, right_A, right_B, token_mask):
        if self._compiled is not None:
            try:
                out = self._compiled(x, a, gu, A0, B0, right_A, right_B, token_mask)
            except torch.OutOfMemoryError:
                raise  # the batch's, not the compiler's: eager would not fit either
            except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
                self._fall_back(err)
            else:
                self.calls += 1
                return out
        return project_module_stacked(x, a, gu, A0, B0, right_A, right_B, token_mask)

    def _fall_back(self, err: Exception) -> None:
        reason = f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if self.decision.setting == "on":
            raise CompileUnavailable(f"scoring.compile: on, but {reason}; use scoring.compile: auto or off") from err
        log.warning("scoring.compile: %s; the reduction runs eagerly from here on", reason)
        self._compiled = None
        self.decision = CompileDecision(self.decision.setting, False, reason)
