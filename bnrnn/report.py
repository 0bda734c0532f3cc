"""``bnrnn report RUN_OR_SWEEP... --out DIR``: the paper's comparison figures and table from run logs.

Reads each run's ``metrics.jsonl`` (whatever has been logged so far: runs still going or
crashed are reported as far as they got), ``config.yaml`` and ``results.json`` and writes

- ``<task>.png``: validation accuracy / bpc against training steps and against training
  wall-clock time, one line per run, labelled by model and by the settings that differ
  between the runs (per-step gains can vanish on the clock);
- ``report.md``: one row per run with its best validation and final test numbers beside the
  paper's (PAPER.md), with the difference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bnrnn.errors import BnrnnError
from bnrnn.tasks import task_class

# Test numbers of Cooijmans et al. (2017), Table 1 / section 5 (see PAPER.md).
PAPER = {
    ("seqmnist", "lstm"): 0.989, ("seqmnist", "bnlstm"): 0.990,
    ("pmnist", "lstm"): 0.902, ("pmnist", "bnlstm"): 0.954,
    ("ptb", "lstm"): 1.38, ("ptb", "bnlstm"): 1.32,
}
# Settings that never distinguish runs in a legend (paths, bookkeeping).
IGNORED_KEYS = ("data.", "trainer.resume", "trainer.progress", "device.", "trainer.eval_batches", "model.fused",
                "model.gpu_kernels", "model.cuda_graphs",
                "trainer.test_at_end", "trainer.log_every", "trainer.checkpoint_every", "trainer.max_bad_steps")


@dataclass
class Run:
    """One run folder's logs."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict)
    torn_lines: int = 0
    label: str = ""

    @property
    def task(self) -> str:
        return str(self.config.get("task", {}).get("name", "?"))

    @property
    def selection(self) -> tuple[str, str]:
        """(metric, "max" | "min"): the task's own model-selection rule."""
        return task_class(str(self.config.get("task", {}).get("kind", "mnist"))).selection

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name", "?"))

    def curve(self, split: str, metric: str) -> list[tuple[int, float, float]]:
        """(step, elapsed seconds, value) of every ``split`` record holding ``metric``."""
        return [(r["step"], r.get("elapsed", math.nan), r[metric]) for r in self.records
                if r.get("split") == split and isinstance(r.get(metric), (int, float))]


def read_run(path: Path) -> Run:
    config_file = path / "config.yaml"
    if not config_file.exists():
        config_file = path / ".hydra" / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.exists() else {}
    records, torn = [], 0
    for line in (path / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1  # a line cut short by a crash
    results = {}
    if (path / "results.json").exists():
        try:
            results = json.loads((path / "results.json").read_text())
        except json.JSONDecodeError:
            pass
    return Run(path, config, records, results, torn)


def find_runs(paths: list[Path]) -> list[Run]:
    """Every folder holding a metrics.jsonl at or below the given paths, in path order."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise BnrnnError(f"{path} does not exist")
        found += sorted(p.parent for p in path.rglob("metrics.jsonl"))
    unique = list(dict.fromkeys(found))
    return [read_run(p) for p in unique]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def assign_labels(runs: list[Run]) -> None:
    """Model name plus the settings that differ between the runs of the same task."""
    for task in {run.task for run in runs}:
        group = [run for run in runs if run.task == task]
        flat = [flatten(run.config) for run in group]
        keys = sorted({k for f in flat for k in f})
        def varies(key: str, runs_flat: list[dict[str, Any]]) -> bool:
            return len({json.dumps(f.get(key), sort_keys=True) for f in runs_flat}) > 1

        def set_by_model(key: str) -> bool:
            """Constant within each model: a model preset's default (h0_noise of bnlstm), not a sweep axis."""
            names = {f.get("model.name") for f in flat}
            return all(not varies(key, [f for f in flat if f.get("model.name") == name]) for name in names)

        differing = [k for k in keys if not k.startswith(IGNORED_KEYS) and k != "model.name"
                     and varies(k, flat) and not set_by_model(k)]
        for run, f in zip(group, flat):
            extras = [f"{k.split('.')[-1] if k.startswith(('model.', 'trainer.', 'task.')) else k}={f.get(k)}"
                      for k in differing if not k.startswith("model.bn.")]
            run.label = " ".join([run.model, *extras])
        labels = [run.label for run in group]
        for run in group:  # still ambiguous (e.g. same settings, two folders): add the folder
            if labels.count(run.label) > 1:
                run.label = f"{run.label} ({run.path.name})"


def best_validation(run: Run) -> tuple[float | None, int | None]:
    metric, mode = run.selection
    curve = run.curve("valid", metric)
    if not curve:
        return None, None
    pick = max if mode == "max" else min
    step, _, value = pick(curve, key=lambda point: point[2])
    return value, step


def test_value(run: Run) -> float | None:
    metric, _ = run.selection
    value = run.results.get(f"test_{metric}")
    if value is None:
        tests = run.curve("test", metric)
        value = tests[-1][2] if tests else None
    return value


def format_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f} %" if metric == "accuracy" else f"{value:.3f}"


def format_delta(metric: str, ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None:
        return "-"
    delta = ours - paper
    return f"{100 * delta:+.2f} pt" if metric == "accuracy" else f"{delta:+.3f}"


def markdown_table(runs: list[Run]) -> str:
    lines = ["| task | run | steps | best valid (step) | test | paper (test) | test - paper | status |",
             "|---|---|---:|---|---|---|---|---|"]
    for run in runs:
        train_steps = [r["step"] for r in run.records if r.get("split") == "train"]
        steps = max(train_steps, default=0)
        best, best_step = best_validation(run)
        test = test_value(run)
        paper = PAPER.get((run.task, run.model))
        if run.results:
            status = "finished"
        elif best is None:
            status = "no validation yet"
        else:
            status = "partial (no results.json: running or stopped)"
        if run.torn_lines:
            status += f"; {run.torn_lines} torn log line(s) skipped"
        metric = run.selection[0]
        best_text = f"{format_metric(metric, best)} ({best_step})" if best is not None else "-"
        lines.append(f"| {run.task} | {run.label} | {steps} | {best_text} | {format_metric(metric, test)} | "
                     f"{format_metric(metric, paper)} | {format_delta(metric, test, paper)} | {status} |")
    return "\n".join(lines) + "\n"


def plot_task(task: str, runs: list[Run], path: Path) -> bool:
    """Validation metric against steps and against wall-clock time; False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, _ = runs[0].selection
    curves = [(run, run.curve("valid", metric)) for run in runs]
    curves = [(run, c) for run, c in curves if c]
    if not curves:
        return False
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.25 * len(curves)))
    for run, curve in curves:
        steps, seconds, values = zip(*curve)
        scale = 100 if metric == "accuracy" else 1
        style = "-" if "bn" in run.model else "--"
        by_step.plot(steps, [scale * v for v in values], style, marker="." if len(steps) < 30 else None, label=run.label)
        by_time.plot([s / 60 for s in seconds], [scale * v for v in values], style,
                     marker="." if len(steps) < 30 else None, label=run.label)
    ylabel = "validation accuracy (%)" if metric == "accuracy" else "validation bits per character"
    for ax, xlabel in ((by_step, "training steps"), (by_time, "training time (minutes)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = by_step.get_legend_handles_labels()
    rows = math.ceil(len(labels) / 2)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize="small", frameon=False)
    fig.suptitle(f"{task}: validation {metric} (solid: batch-normalised, dashed: plain LSTM)")
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_report(paths: list[Path], out_dir: Path) -> dict[str, Any]:
    """Write the figures and report.md; returns what was written. BnrnnError if no run is found."""
    runs = find_runs(paths)
    if not runs:
        raise BnrnnError(f"no runs found under {', '.join(map(str, paths))} (a run folder holds metrics.jsonl)")
    assign_labels(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for task in sorted({run.task for run in runs}):
        path = out_dir / f"{task}.png"
        if plot_task(task, [run for run in runs if run.task == task], path):
            figures.append(path)
    table = markdown_table(runs)
    body = ["# bnrnn report", "", table]
    body += [f"![{p.stem}]({p.name})" for p in figures]
    no_curve = [run.label for run in runs if best_validation(run)[0] is None]
    if no_curve:
        body.append(f"\nNo validation logged yet for: {', '.join(no_curve)}.")
    (out_dir / "report.md").write_text("\n".join(body) + "\n")
    return {"runs": len(runs), "figures": [str(p) for p in figures], "table": table}
