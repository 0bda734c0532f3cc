"""Wall-clock budgets written as people write them: ``trainer.max_time=2h50m``.

Accepted forms: a number of seconds (``10200``, ``90.5``), units ``d``, ``h``, ``m``, ``s``
in that order (``2h50m``, ``45m``, ``1d6h``), or Lightning's ``DD:HH:MM:SS``
(``00:02:50:00``).
"""

from __future__ import annotations

import math
import re

_UNITS = re.compile(r"(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?"
                    r"(?:(?P<s>\d+(?:\.\d+)?)s)?")
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
FORMS = "a number of seconds, units such as 2h50m or 45m, or DD:HH:MM:SS"


def parse_duration(text: str | int | float) -> float:
    """Seconds in ``text``; ValueError naming the accepted forms if it is none of them or not
    positive."""
    seconds = _seconds(str(text).strip().lower().replace(" ", ""))
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a positive duration: {FORMS}")
    return seconds


def _seconds(text: str) -> float | None:
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", text):
        days, hours, minutes, seconds = (int(part) for part in text.split(":"))
        return days * 86400 + hours * 3600 + minutes * 60 + seconds
    match = _UNITS.fullmatch(text)
    if not text or not match:
        return None
    return sum(float(value) * _SECONDS[unit] for unit, value in match.groupdict().items() if value)


def format_duration(seconds: float) -> str:
    """``2h50m12s``, ``4m05s``, ``12s``: whole seconds, the largest unit first."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
