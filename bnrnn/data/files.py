"""Looking for and reading data files, with one sentence for what the user can fix.

``Path.is_file`` raises PermissionError (a traceback) when a folder on the way cannot be
searched, and a file that cannot be opened is not the same problem as a corrupt one:
the first needs ``chmod`` or another ``data.root``, the second a fresh download.
"""

from __future__ import annotations

import errno
from pathlib import Path

from bnrnn.errors import DataError


def cannot_read(path: Path, exc: OSError) -> DataError:
    """The DataError for a file or folder the process may not read."""
    reason = exc.strerror or type(exc).__name__
    return DataError(f"cannot read {path} ({reason}); check its permissions or set data.root to a readable copy")


def is_present(path: Path) -> bool:
    """``path.is_file()``, except that a folder we may not search is an error, not absence."""
    try:
        return path.is_file()
    except PermissionError as exc:
        raise cannot_read(Path(exc.filename or path), exc) from exc


def read_bytes(path: Path) -> bytes:
    """The file's bytes; DataError if it cannot be opened (permissions, a folder, I/O)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.EIO):
            raise cannot_read(path, exc) from exc
        raise DataError(f"cannot read {path} ({exc.strerror or exc})") from exc
