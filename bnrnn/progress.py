"""The counters a checkpoint carries besides the weights: where the run is, its best so far,
its clock, and the training metrics not yet logged."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bnrnn.errors import CheckpointError


@dataclass
class Progress:
    """Counters that a checkpoint carries."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    elapsed: float = 0.0
    valid_seconds: float = 0.0  # of elapsed, the time spent validating (the rest trained)
    # The training metrics summed since the last logged record: saved with the checkpoint so
    # that a run resumed between two records logs the same averages as an uninterrupted one.
    window: dict[str, float] = field(default_factory=dict)
    window_steps: int = 0

    def add_to_window(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.window[key] = self.window.get(key, 0.0) + value
        self.window_steps += 1

    def take_window(self) -> dict[str, float]:
        """The window's averages; the window starts again."""
        averaged = {key: value / self.window_steps for key, value in self.window.items()}
        self.window, self.window_steps = {}, 0
        return averaged


def progress_of(payload: dict[str, Any], path: Path) -> Progress:
    """A checkpoint's counters; CheckpointError naming ``path`` if it holds counters this
    version does not know (a newer bnrnn wrote it: resuming would drop them silently)."""
    unknown = sorted(set(payload["progress"]) - {f.name for f in fields(Progress)})
    if unknown:
        raise CheckpointError(f"{path} holds counters this version does not know ({', '.join(unknown)}): it was "
                              f"written by a newer bnrnn; upgrade bnrnn to resume it")
    return Progress(**payload["progress"])
