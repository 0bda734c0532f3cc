"""One logger for a run: TensorBoard scalars and a flat metrics.jsonl that reports read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """Writes ``<split>/<name>`` scalars against the global step and wall time.

    Each metrics.jsonl line is {"split", "step", "time", "elapsed", <metrics>}; ``elapsed`` is
    training wall-clock seconds, carried over a resume so curves against time stay continuous.
    On resume, TensorBoard events past ``purge_step`` (from the interrupted run) are dropped.
    """

    def __init__(self, out_dir: Path, purge_step: int | None = None, elapsed_offset: float = 0.0) -> None:
        self.out_dir = out_dir
        self.writer = SummaryWriter(log_dir=str(out_dir), purge_step=purge_step)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.start = time.monotonic() - elapsed_offset

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        now = time.time()
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{name}", value, step, walltime=now)
        record = {"split": split, "step": step, "time": now, "elapsed": round(self.elapsed, 3), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self.writer.flush()
        self.jsonl.flush()

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.jsonl.close()
