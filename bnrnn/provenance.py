"""Which code ran: the commit of the source tree bnrnn is imported from, for history.jsonl."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

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
