"""One logger for a run: TensorBoard scalars and a flat metrics.jsonl that reports read."""

from __future__ import annotations

import json
import os
import time
from contextlib import suppress
from pathlib import Path
from collections.abc import Callable
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """Writes ``<split>/<name>`` scalars against the global step and wall time.

    Each metrics.jsonl line is {"split", "step", "time", "elapsed", <metrics>}; ``elapsed`` is
    training wall-clock seconds, carried over a resume so curves against time stay continuous.
    On resume, records at or past ``purge_step`` (written by the interrupted run after its
    last checkpoint, and about to be redone) are dropped from both, so curves stay single.

    metrics.jsonl is line-buffered (each record reaches the OS as it is written, so even a
    SIGKILL loses nothing logged); TensorBoard is flushed at every validation and at exit.
    """

    def __init__(self, out_dir: Path, purge_step: int | None = None, elapsed_offset: float = 0.0) -> None:
        self.out_dir = out_dir
        self.writer = SummaryWriter(log_dir=str(out_dir), purge_step=purge_step, flush_secs=30)
        self.path = out_dir / "metrics.jsonl"
        if purge_step is not None and self.path.exists():
            keep_records(self.path, lambda record: record.get("step", 0) < purge_step)
        self.jsonl = open(self.path, "a", encoding="utf-8", buffering=1)
        self.start = time.monotonic() - elapsed_offset

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        """One record; a ``test`` record replaces the run's earlier one (a resumed finished run
        tests again: its test is one number, not a curve)."""
        if split == "test":
            self.jsonl.close()
            keep_records(self.path, lambda record: record.get("split") != "test")
            self.jsonl = open(self.path, "a", encoding="utf-8", buffering=1)
        now = time.time()
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{name}", value, step, walltime=now)
        record = {"split": split, "step": step, "time": now, "elapsed": round(self.elapsed, 3), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")

    def overlay_statistics_modes(self, metric: str) -> None:
        """A Custom Scalars chart per metric that overlays its validation modes
        (``valid/<metric>_batch``, ``_ema``, ``_reestimated``; tags are regular expressions),
        since TensorBoard otherwise draws each tag of a run in a chart of its own."""
        charts = {name: ["Multiline", [rf"valid/{name}_(batch|ema|reestimated)$"]] for name in (metric, "loss")}
        self.writer.add_custom_scalars({"validation by statistics": charts})

    def histograms(self, step: int, values: dict[str, Any]) -> None:
        """TensorBoard histograms (``<tag>`` -> a tensor of values) at ``step``; not in metrics.jsonl."""
        for tag, tensor in values.items():
            self.writer.add_histogram(tag, tensor, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """One HParams-tab entry for this run: its settings against its final metrics."""
        numeric = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if numeric:
            self.writer.add_hparams(hparams, numeric, run_name=".")

    def flush(self) -> None:
        self.writer.flush()
        self.jsonl.flush()

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.jsonl.close()


def last_logged_step(path: Path) -> int | None:
    """The highest step of any record in metrics.jsonl (None: no file, or no record)."""
    last = None
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with suppress(json.JSONDecodeError):  # a line cut short by a kill
                step = json.loads(line).get("step") if line.startswith("{") else None
                if isinstance(step, int) and (last is None or step > last):
                    last = step
    return last


def keep_records(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite metrics.jsonl with only the records ``keep`` accepts (and without torn lines)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and keep(record):
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
