"""Which code ran, and on what: the commit of the source tree bnrnn is imported from, and the
machine (CPU, vector instructions, threads, GPU), for history.jsonl."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import bnrnn

SOURCE = Path(bnrnn.__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """{"version", "commit", "dirty"}: bnrnn's version, and where bnrnn runs from a git
    checkout (an editable install, a worktree), its HEAD commit and whether tracked files
    differ from it or new files sit beside them (uncommitted code ran too). Without git: the version alone."""
    found: dict[str, Any] = {"version": bnrnn.__version__}
    top = _git("rev-parse", "--show-toplevel")
    # Only the checkout bnrnn itself sits in: a wheel installed in a venv inside some other
    # repository must not report that repository's commit.
    commit = _git("rev-parse", "HEAD") if top and Path(top).resolve() == SOURCE else None
    if commit:
        status = _git("status", "--porcelain")
        found.update(commit=commit, dirty=bool(status) if status is not None else None)
    return found


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """What a segment of a run ran on: the CPU and the vector instructions torch's kernels use
    on it (AVX2, AVX512: float summation order, hence the run's arithmetic, can follow them and
    the thread count), its cores, torch's threads and version, and the GPU where one is used."""
    found: dict[str, Any] = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                             "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    return found
