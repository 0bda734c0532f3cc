"""Errors meant for the person at the terminal: printed as one sentence, no traceback."""

import os
from pathlib import Path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): library
    errors often go on for several lines, and a user error is one sentence."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class BnrnnError(Exception):
    """A problem the user can fix (bad config value, missing data, unusable checkpoint)."""


class ConfigError(BnrnnError):
    """A configuration value is of the wrong type or out of range."""


class DataError(BnrnnError):
    """Data files are missing, corrupt or inconsistent."""


class CheckpointError(BnrnnError):
    """A checkpoint cannot be read or does not fit the run."""


class StorageError(BnrnnError):
    """A file of the run could not be written (a full disk, a quota)."""


# errno values that mean "no room to write": a full disk, a quota, a file size limit
NO_ROOM = (28, 122, 27)  # ENOSPC, EDQUOT, EFBIG


def is_no_room(exc: BaseException) -> bool:
    """An OSError for lack of space, or torch's zip writer failing on one (it names no errno)."""
    if isinstance(exc, OSError):
        return exc.errno in NO_ROOM
    return isinstance(exc, RuntimeError) and "file write failed" in str(exc)


def link_problem(path) -> str | None:
    """Why ``path``, or a folder on the way to it, is a symbolic link that leads nowhere: 'X is a
    symbolic link to Y, which does not exist', or '... that loops back on itself'; None if
    no link on the way is broken. (``exists()`` is False for both, and ``mkdir`` then says
    "File exists", ``resolve`` raises.)"""
    path = Path(path)
    for step in [*reversed(path.parents), path]:
        if not step.is_symlink():
            continue
        try:
            step.stat()
        except OSError as exc:
            if exc.errno == 40:  # ELOOP
                return f"{step} is a symbolic link that loops back on itself"
            return f"{step} is a symbolic link to {os.readlink(step)}, which does not exist"
    return None
