"""Errors meant for the person at the terminal: printed as one sentence, no traceback."""


class BnrnnError(Exception):
    """A problem the user can fix (bad config value, missing data, unusable checkpoint)."""


class ConfigError(BnrnnError):
    """A configuration value is of the wrong type or out of range."""


class DataError(BnrnnError):
    """Data files are missing, corrupt or inconsistent."""


class CheckpointError(BnrnnError):
    """A checkpoint cannot be read or does not fit the run."""
