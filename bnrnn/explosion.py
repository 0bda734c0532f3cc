"""A finite explosion of the gradient, named as it starts.

A non-finite step is skipped and counted (``trainer.max_bad_steps``), but a gradient can
explode and stay finite: on seqMNIST the presets' norms went from about 0.5 to 1e17-2e21
within a few hundred steps, clipping kept every update bounded, and the run collapsed to
chance with nothing said (docs/results/full-length.md). :class:`ExplosionWatch` compares each
step's norm with the median of the recent ones and says so once per ``cooldown`` steps.
"""

from __future__ import annotations

import statistics
from collections import deque

FACTOR = 1e3  # a norm this many times the recent median is an explosion, not noise
WINDOW = 200  # steps the median is taken over
MIN_HISTORY = 50  # steps seen before anything is judged


class ExplosionWatch:
    def __init__(self, cooldown: int, factor: float = FACTOR, window: int = WINDOW) -> None:
        self.cooldown, self.factor = cooldown, factor
        self.norms: deque[float] = deque(maxlen=window)
        self.last_warned: int | None = None

    def check(self, step: int, norm: float) -> float | None:
        """The recent median if ``norm`` (a finite gradient norm at ``step``) exceeds it by
        ``factor`` and no warning came in the last ``cooldown`` steps; else None."""
        median = statistics.median(self.norms) if len(self.norms) >= MIN_HISTORY else None
        self.norms.append(norm)
        if median is None or norm <= self.factor * median:
            return None
        if self.last_warned is not None and step - self.last_warned < self.cooldown:
            return None
        self.last_warned = step
        return median
