"""Where a benchmark's figures were made: the commit and the machine, recorded beside every published result."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def machine() -> dict:
    """CPU model, cores, torch version and threads, Python version, vector kernels."""
    import torch

    from sqsd_ray.cpu_kernels import cpu_flags

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return {"cpu": names[0] if names else platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            # the vector width the CPU offers and the one torch's kernels use (sqsd_ray.cpu_kernels pins it)
            "cpu_avx512": "avx512f" in cpu_flags(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def commit() -> str:
    """Short hash of the checked-out commit, with "+changes" when the tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--", "sqsd_ray")
                                                      else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
