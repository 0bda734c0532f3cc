"""One live writer per run folder.

Two processes training into one folder (the same command run twice, or a resume started
while the first still runs) would duplicate or erase each other's records and overwrite
each other's checkpoints. The first takes an exclusive ``flock`` on ``<run>/.lock`` and
writes who it is into the file; the second is refused with that name.

The kernel drops a ``flock`` when its holder exits, however it exits (kill -9 included),
so a lock left by a dead process is simply taken over: staleness needs no guessing from
PIDs. The file itself stays (deleting it would let a third process lock a new file while
a second still waits on the old one); only the lock on it means anything.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from bnrnn.errors import ConfigError

LOCK_FILE = ".lock"


class RunBusyError(ConfigError):
    """Another live process is writing to the run folder."""


def command_line() -> list[str]:
    """This process's command, as the user typed it (``bnrnn train ...``)."""
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def describe_holder(path: Path) -> str:
    """'pid 123 on host h, since 10:02:03, running: bnrnn train ...' from the lock file."""
    try:
        info = json.loads(path.read_text())
        command = " ".join(info.get("command", []))
        return (f"pid {info['pid']} on {info['host']}, since {info['since']}"
                + (f", running: {command}" if command else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def busy_error(run_dir: Path) -> RunBusyError:
    return RunBusyError(
        f"another bnrnn process is writing to {run_dir} ({describe_holder(run_dir / LOCK_FILE)}); "
        f"wait for it to finish or stop it, or choose another hydra.run.dir"
    )


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def check_free(run_dir: Path) -> None:
    """RunBusyError if a live process holds the run's lock; writes nothing (for pre-launch checks)."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or none we may open): nobody has locked it
    try:
        if not _try_lock(fd):
            raise busy_error(run_dir)
    finally:
        os.close(fd)  # closing drops the probe's lock


class RunLock:
    """Held from before a run writes anything until the process ends or :meth:`release`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise busy_error(self.run_dir)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command_line()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
