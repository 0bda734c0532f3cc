"""The paper's numbers and plotted curves, to hold our runs against.

The curves are the vertices of the learning curves in the vector PDFs of Cooijmans et al.
(2017), shipped in ``bnrnn/paper_curves/`` with their README (source, axis fit, caveats).
On MNIST one iteration is one batch of 100, on PTB one batch of 64: the paper presets' batch
sizes, so the paper's iterations are our steps.

Which statistics Fig. 2 validated with is not written anywhere; the authors' script
selected checkpoints on batch statistics, so the curves are most likely batch-statistics
ones, and we label and log them so (``valid/<metric>`` and ``valid/<metric>_batch``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bnrnn.errors import BnrnnError

CURVES_DIR = Path(__file__).resolve().parent / "paper_curves"

# Test numbers (Table 1 / section 5; see PAPER.md).
PAPER_TEST = {
    ("seqmnist", "lstm"): 0.989, ("seqmnist", "bnlstm"): 0.990,
    ("pmnist", "lstm"): 0.902, ("pmnist", "bnlstm"): 0.954,
    ("ptb", "lstm"): 1.38, ("ptb", "bnlstm"): 1.32,
}

# (task, model) -> (file, series, figure) of the validation curve.
VALIDATION_CURVES = {
    ("seqmnist", "lstm"): ("fig2_seqmnist_valid.csv", "lstm", "Fig. 2"),
    ("seqmnist", "bnlstm"): ("fig2_seqmnist_valid.csv", "bn_lstm", "Fig. 2"),
    ("pmnist", "lstm"): ("fig2_pmnist_valid.csv", "lstm", "Fig. 2"),
    ("pmnist", "bnlstm"): ("fig2_pmnist_valid.csv", "bn_lstm", "Fig. 2"),
    ("ptb", "lstm"): ("fig3a_ptb_valid.csv", "LSTM", "Fig. 3a"),
    ("ptb", "bnlstm"): ("fig3a_ptb_valid.csv", "BN-LSTM", "Fig. 3a"),
}
MODEL_NAMES = {"lstm": "LSTM", "bnlstm": "BN-LSTM"}
# Fig. 3b's series: test bpc against sequence length.
LENGTH_SERIES = {
    "lstm": "LSTM",
    "population": "BN-LSTM, population statistics",
    "batch": "BN-LSTM, batch statistics",
}


@dataclass(frozen=True)
class PaperCurve:
    """One plotted curve: x (iterations = our steps, or sequence lengths) against y."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]

    def at(self, x: float) -> float | None:
        """The curve at ``x``, linear between vertices (matplotlib dropped a few vertices on
        straight stretches); None outside the plotted range."""
        if not self.x or x < self.x[0] or x > self.x[-1]:
            return None
        for (x0, y0), (x1, y1) in zip(zip(self.x, self.y), zip(self.x[1:], self.y[1:])):
            if x0 <= x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return self.y[-1]


@lru_cache(maxsize=None)
def read_series(file: str) -> dict[str, PaperCurve]:
    """Every series of one shipped CSV (columns: series, x, value), sorted by x."""
    points: dict[str, list[tuple[float, float]]] = {}
    with open(CURVES_DIR / file, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)  # header
        for series, x, value in reader:
            points.setdefault(series, []).append((float(x), float(value)))
    return {name: PaperCurve(name, *map(tuple, zip(*sorted(p)))) for name, p in points.items()}


def validation_curve(task: str, model: str) -> PaperCurve | None:
    """The paper's validation curve for a task and model (accuracy on MNIST, bpc on PTB), or
    None where the paper drew none (e.g. BN-input)."""
    entry = VALIDATION_CURVES.get((task, model))
    if entry is None:
        return None
    file, series, figure = entry
    curve = read_series(file)[series]
    return PaperCurve(f"paper: {MODEL_NAMES[model]} ({figure})", curve.x, curve.y)


def length_curves() -> dict[str, PaperCurve]:
    """Fig. 3b: {"lstm" | "population" | "batch": test bpc against sequence length}."""
    series = read_series("fig3b_ptb_lengths.csv")
    return {key: PaperCurve(f"paper: {name}", series[name].x, series[name].y) for key, name in LENGTH_SERIES.items()}


def write_tensorboard(out_dir: str | Path) -> list[Path]:
    """The paper's curves as TensorBoard runs ``<out_dir>/<task>-<model>``, under our tags
    (``valid/accuracy`` and ``valid/accuracy_batch``, or ``valid/bpc`` ...), so that
    ``tensorboard --logdir runs`` draws them over a user's runs; Fig. 3b under ``fig3b/bpc``
    as ``bnrnn eval --lengths`` writes it. Returns the run folders written."""
    from torch.utils.tensorboard import SummaryWriter

    from bnrnn.runfolder import holds_run, make_writable_folder

    out_dir = Path(out_dir)
    make_writable_folder(out_dir, "the output folder (--out)")  # a file or a broken link in the way: one sentence
    folders = [out_dir / f"{task}-{model}" for task, model in VALIDATION_CURVES] + [out_dir / "ptb-lengths"]
    for folder in folders:
        if holds_run(folder):  # the paper's curves must never mix into one of our runs
            raise BnrnnError(f"{folder} holds a bnrnn run; write the paper's curves elsewhere with --out")
    written = []
    for (task, model) in VALIDATION_CURVES:
        curve = validation_curve(task, model)
        metric = "bpc" if task == "ptb" else "accuracy"
        folder = out_dir / f"{task}-{model}"
        with SummaryWriter(str(folder)) as writer:
            for step, value in zip(curve.x, curve.y):
                for tag in (f"valid/{metric}", f"valid/{metric}_batch"):
                    writer.add_scalar(tag, value, int(step))
        written.append(folder)
    folder = out_dir / "ptb-lengths"
    with SummaryWriter(str(folder)) as writer:
        for key, curve in length_curves().items():
            for length, value in zip(curve.x, curve.y):
                writer.add_scalars("fig3b/bpc", {f"paper_{key}": value}, int(length))
    written.append(folder)
    return written
