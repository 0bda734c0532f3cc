"""Errors meant for the person at the terminal: printed as one sentence, no traceback."""


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
