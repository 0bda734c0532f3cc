"""``bnrnn report RUN_OR_SWEEP... --out DIR``: the paper's comparison figures and table from run logs.

Reads each run's ``metrics.jsonl`` (whatever has been logged so far: runs still going or
crashed are reported as far as they got), ``config.yaml`` and ``results.json`` and writes

- ``<task>.png``: validation accuracy / bpc against training steps and against training
  wall-clock time, one line per run, labelled by model and by the settings that differ
  between the runs (per-step gains can vanish on the clock); on the steps panel the other
  statistics modes a run validated with (dotted) and the paper's curve for each task and
  model present (black, from :mod:`bnrnn.paper`);
- ``report.md``: one row per run with its best validation and final test numbers beside the
  paper's (PAPER.md), with the difference, and "ours / paper" at 1k, 5k and 10k steps and
  at the run's last step; then every statistics mode at 1k, 2k, 5k, 10k steps and the last,
  with the paper's row.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bnrnn.config import read_yaml_mapping, schema_for, with_current_names
from bnrnn.schema import TaskConfig
from bnrnn.errors import BnrnnError
from bnrnn.paper import validation_curve
from bnrnn.runfolder import make_writable_folder, saved_choices
from bnrnn.scoring import DESCRIPTIONS, MODES
from bnrnn.tasks import task_class, task_kinds
from bnrnn.report_tables import best_validation, markdown_table, modes_table, time_table

log = logging.getLogger("bnrnn")

# Steps at which report.md holds our validation number against the paper's.
# The model presets as the tables and legends name them.
MODEL_LABELS = {"lstm": "LSTM", "bnlstm": "BN-LSTM", "bnlstm_input": "BN-input LSTM", "lnlstm": "LN-LSTM"}
# Settings that never distinguish runs in a legend (paths, bookkeeping).
IGNORED_KEYS = ("data.", "trainer.resume", "trainer.progress", "device.", "trainer.eval_batches", "model.backend",
                "model.cuda_graphs",
                "trainer.test_at_end", "trainer.log_every", "trainer.checkpoint_every", "trainer.max_bad_steps",
                "trainer.eval_every", "trainer.max_steps", "trainer.max_epochs", "trainer.reestimate",
                "trainer.valid_", "trainer.select_on", "trainer.max_time")


@dataclass
class Run:
    """One run folder's logs."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict)
    torn_lines: int = 0
    label: str = ""
    choices: dict[str, Any] = field(default_factory=dict)  # the config groups it was made with (trainer=...)

    @property
    def task(self) -> str:
        return str(self.config.get("task", {}).get("name", "?"))

    @property
    def selection(self) -> tuple[str, str]:
        """(metric, "max" | "min"): the task's own model-selection rule."""
        kind = str(self.config.get("task", {}).get("kind", TaskConfig.kind))
        return task_class(kind if kind in task_kinds() else TaskConfig.kind).selection

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name", "?"))

    @property
    def model_label(self) -> str:
        """The model as the report names it: "BN-LSTM", "LN-LSTM", ... (else the config's name)."""
        return MODEL_LABELS.get(self.model, self.model)

    @property
    def normalised(self) -> bool:
        """Whether any term is normalised (batch or layer norm): drawn solid."""
        switches = self.config.get("model", {}).get("normalize", {})
        return any(bool(v) for v in switches.values()) if switches else "bn" in self.model

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.records if r.get("split") == "train"), default=0)

    @property
    def last_valid_step(self) -> int:
        """The step of the run's last validation (0 if none): a run stopped between two
        validations has trained past it."""
        return max((r["step"] for r in self.records if r.get("split") == "valid"), default=0)

    @property
    def stats(self) -> str | None:
        """The statistics of the plain validation numbers ("batch", ..., "none"; None in
        logs older than the statistics modes)."""
        return next((r.get("stats") for r in self.records if r.get("split") == "valid"), None)

    def valid_at(self, step: int, metric: str) -> float | None:
        """The validation ``metric`` logged at exactly ``step``, or None."""
        return next((v for s, _, v in self.curve("valid", metric) if s == step), None)

    def curve(self, split: str, metric: str) -> list[tuple[int, float, float]]:
        """(step, elapsed seconds, value) of every ``split`` record holding ``metric``."""
        return [(r["step"], r.get("elapsed", math.nan), r[metric]) for r in self.records
                if r.get("split") == split and isinstance(r.get(metric), (int, float))]


SECTIONS = ("task", "model", "trainer", "device", "data")  # a run config's groups of settings


def read_run(path: Path) -> Run:
    """One run folder's logs. Records that are not objects with an integer step (a torn line,
    a hand edit) are skipped and counted; BnrnnError if the folder's config is unreadable."""
    config_file = path / "config.yaml"
    if not config_file.exists():
        config_file = path / ".hydra" / "config.yaml"
    config = {}
    if config_file.exists():
        saved = read_yaml_mapping(config_file, "fix it, or leave the run out of the report")
        config = OmegaConf.to_container(with_current_names(saved))
        for section, value in config.items():
            if section in SECTIONS and not isinstance(value, dict):
                raise BnrnnError(f"{config_file}: '{section}: {value}' is not a section of settings (a mapping such "
                                 f"as {section}: {{name: ...}}); fix it, or leave the run out of the report")
    records, skipped = [], 0
    for line in (path / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
            records.append(record)
        else:
            skipped += 1
    results = {}
    if (path / "results.json").exists():
        try:
            results = json.loads((path / "results.json").read_text())
        except json.JSONDecodeError:
            pass
        if not isinstance(results, dict):
            log.warning("%s holds no results object; the run's test numbers are left out", path / "results.json")
            results = {}
    if skipped:
        log.warning("%s: %d line(s) skipped (not a record with an integer step)", path / "metrics.jsonl", skipped)
    return Run(path, config, records, results, skipped, choices=saved_choices(path))


def find_runs(paths: list[Path]) -> list[Run]:
    """Every folder holding a metrics.jsonl at or below the given paths, in path order. A folder
    that cannot be read is left out with a warning: one bad run must not sink the report."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise BnrnnError(f"{path} does not exist")
        found += sorted(p.parent for p in path.rglob("metrics.jsonl"))
    runs, left_out = [], 0
    for folder in dict.fromkeys(found):
        try:
            runs.append(read_run(folder))
        except (BnrnnError, OSError) as exc:
            log.warning("left out of the report: %s", exc)
            left_out += 1
    if left_out and not runs:
        raise BnrnnError(f"none of the {left_out} run folder(s) under {', '.join(map(str, paths))} could be read "
                         f"(the warnings above say why)")
    return runs


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
    # A key a run's version did not have yet (model.num_layers) had its default there.
    defaults = flatten(OmegaConf.to_container(schema_for()))
    for task in {run.task for run in runs}:
        group = [run for run in runs if run.task == task]
        flat = [{**defaults, **flatten(run.config)} for run in group]
        keys = sorted({k for f in flat for k in f})
        def varies(key: str, runs_flat: list[dict[str, Any]]) -> bool:
            # Among the runs that have the key: a run logged before a key existed differs in
            # nothing there.
            return len({json.dumps(f[key], sort_keys=True) for f in runs_flat if key in f}) > 1

        def set_by_model(key: str) -> bool:
            """Constant within each model: a model preset's default (h0_noise of bnlstm), not a sweep axis."""
            names = {f.get("model.name") for f in flat}
            return all(not varies(key, [f for f in flat if f.get("model.name") == name]) for name in names)

        differing = [k for k in keys if not k.startswith(IGNORED_KEYS) and k != "model.name"
                     and varies(k, flat) and not set_by_model(k)]
        named = chosen_groups(group, flat, differing)
        differing = [k for k in differing if k.split(".")[0] not in named]
        for run, f in zip(group, flat):
            extras = [f"{name}={run.choices[name]}" for name in named]
            extras += [f"{k.split('.')[-1] if k.startswith(('model.', 'trainer.', 'task.')) else k}={f[k]}"
                       for k in differing if not k.startswith("model.normalize.") and k in f]
            run.label = " ".join([run.model_label, *extras])
        labels = [run.label for run in group]
        for run in group:  # still ambiguous (e.g. same settings, two folders): add the folder
            if labels.count(run.label) > 1:
                run.label = f"{run.label} ({run.path.name})"


def chosen_groups(group: list[Run], flat: list[dict[str, Any]], differing: list[str]) -> list[str]:
    """The config groups (other than the model, which the label names already) whose option
    differs between the runs and accounts for every differing key of its section: runs with
    the same option agree on them. They are named as the option (trainer=rmsprop_authors),
    as typed on the command line, rather than as the settings it sets (momentum=0.0 ...)."""
    named = []
    for section in dict.fromkeys(k.split(".")[0] for k in differing):
        if section == "model" or any(section not in run.choices for run in group):
            continue
        options = [str(run.choices[section]) for run in group]
        if len(set(options)) < 2:
            continue
        keys = [k for k in differing if k.split(".")[0] == section]
        by_option: dict[str, set[str]] = {}
        for option, f in zip(options, flat):
            by_option.setdefault(option, set()).add(json.dumps([f.get(k) for k in keys], sort_keys=True))
        if all(len(values) == 1 for values in by_option.values()):
            named.append(section)
    return named


METRIC_LABELS = {"accuracy": "validation accuracy (%)", "bpc": "validation bits per character"}


def figure_title(task: str, metric: str, paper: bool, modes: bool) -> str:
    """The figure's title, with a key to the line styles it holds: the paper's black lines and
    the other statistics' dotted lines only where they were drawn."""
    key = ["solid: normalised, dashed: plain LSTM"]
    if paper:
        key.append("black: the paper")
    title = f"{task}: validation {metric} ({'; '.join(key)}"
    if modes:
        title += ";\ndotted / dash-dotted: EMA / re-estimated statistics"
    return title + ")"


# Runs this long get a third panel: the second half of the steps, enlarged (at the paper's
# length the curves sit within a point or two of each other, a sliver of the full panel).
ZOOM_FROM_STEPS = 20000


@dataclass
class Plotted:
    """What plot_task drew: the steps panel's lines ({label: (x, y)}, as plotted) and the
    enlarged panel's (x limits, y limits), None where there is none."""

    lines: dict[str, tuple[list[float], list[float]]]
    zoom: tuple[tuple[float, float], tuple[float, float]] | None


def plot_task(task: str, runs: list[Run], path: Path) -> Plotted | None:
    """Validation metric against steps and against wall-clock time, with the paper's curves
    on the steps panels; None if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, _ = runs[0].selection
    curves = [(run, run.curve("valid", metric)) for run in runs]
    curves = [(run, c) for run, c in curves if c]
    if not curves:
        return None
    scale = 100 if metric == "accuracy" else 1
    last_step = max(run.last_step for run, _ in curves)
    zoomed = metric == "accuracy" and last_step >= ZOOM_FROM_STEPS
    fig, axes = plt.subplots(1, 3 if zoomed else 2, figsize=(17 if zoomed else 12, 4.8))
    by_step, by_time, step_panels = axes[0], axes[-1], axes[:-1]
    drew_paper = drew_modes = False
    for model in dict.fromkeys(run.model for run, _ in curves):
        paper = validation_curve(task, model)
        if paper is None:
            continue
        limit = 1.05 * last_step
        keep = [(x, y) for x, y in zip(paper.x, paper.y) if x <= limit]
        if paper.at(limit) is not None and (not keep or keep[-1][0] < limit):
            keep.append((limit, paper.at(limit)))  # the line runs to the panel's edge
        if keep:
            xs, ys = zip(*keep)
            for ax in step_panels:
                ax.plot(xs, [scale * y for y in ys], color="black", lw=1.2, ls="-" if "bn" in model else "--",
                        alpha=0.75, label=paper.label)
            drew_paper = True
    for run, curve in curves:
        steps, seconds, values = zip(*curve)
        style = "-" if run.normalised else "--"
        marker = "." if len(steps) < 30 else None
        stats = f" ({DESCRIPTIONS.get(run.stats, run.stats)})" if run.stats not in (None, "none") else ""
        (line,) = by_step.plot(steps, [scale * v for v in values], style, marker=marker, label=run.label + stats)
        for ax in (*step_panels[1:], by_time):
            ax.plot([s / 60 for s in seconds] if ax is by_time else steps, [scale * v for v in values], style,
                    marker=marker, color=line.get_color(), label=run.label)
        for mode, mode_style in zip(MODES, ("--", ":", "-.")):
            other = run.curve("valid", f"{metric}_{mode}")
            if mode != run.stats and other:
                s_, _, v_ = zip(*other)
                for ax in step_panels:
                    ax.plot(s_, [scale * v for v in v_], mode_style, color=line.get_color(), alpha=0.6, lw=1.2,
                            label=f"{run.label} ({DESCRIPTIONS[mode]})")
                drew_modes = True
    if metric != "accuracy":  # e.g. the paper's bpc starts at log2(50) = 5.6: keep our range readable
        worst = max(v for _, curve in curves for _, _, v in curve)
        best = min(v for _, curve in curves for _, _, v in curve)
        by_step.set_ylim(top=worst + 0.15 * (worst - best or 1.0))
    zoom = enlarge(step_panels[1], last_step) if zoomed else None
    ylabel = METRIC_LABELS.get(metric, f"validation {metric}")
    for ax in axes:
        ax.set_xlabel("training time (minutes)" if ax is by_time else "training steps")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = by_step.get_legend_handles_labels()
    columns = 1 if max(map(len, labels)) > 60 else (3 if zoomed else 2)  # long labels (many settings) one a row
    rows = math.ceil(len(labels) / columns)
    height = 4.8 + 0.2 * rows
    fig.set_size_inches(17 if zoomed else 12, height)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small", frameon=False)
    fig.suptitle(figure_title(task, metric, drew_paper, drew_modes), fontsize="medium")
    fig.tight_layout(rect=(0, (0.2 * rows + 0.3) / height, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)
    lines = {line.get_label(): (list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
             for line in by_step.get_lines()}
    return Plotted(lines, zoom)


def enlarge(ax, last_step: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Limit ``ax`` to the second half of the steps, and its y axis to where the lines drawn
    there lie: from their 5th percentile (a single dip, such as the paper's at 92.5k, goes off
    the panel rather than flatten the rest) to their top. Returns (x limits, y limits)."""
    xlim = (last_step / 2, 1.05 * last_step)
    values = sorted(y for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())
                    if xlim[0] <= x <= xlim[1])
    if values:
        ylim = (values[len(values) // 20] - 0.5, min(values[-1] + 0.3, 100.2))
        ax.set_ylim(*ylim)
    else:
        ylim = ax.get_ylim()
    ax.set_xlim(*xlim)
    ax.set_title(f"steps {xlim[0] / 1000:.0f}k-{last_step / 1000:.0f}k, enlarged", fontsize="small")
    return xlim, tuple(map(float, ylim))


def make_report(paths: list[Path], out_dir: Path) -> dict[str, Any]:
    """Write the figures and report.md; returns what was written. BnrnnError if no run is found."""
    runs = find_runs(paths)
    if not runs:
        raise BnrnnError(f"no runs found under {', '.join(map(str, paths))} (a run folder holds metrics.jsonl)")
    make_writable_folder(out_dir, "the output folder (--out)")
    assign_labels(runs)
    figures, plotted, zoomed = [], {}, {}
    for task in sorted({run.task for run in runs}):
        path = out_dir / f"{task}.png"
        drawn = plot_task(task, [run for run in runs if run.task == task], path)
        if drawn is not None:
            figures.append(path)
            plotted[task], zoomed[task] = drawn.lines, drawn.zoom
    table = markdown_table(runs)
    body = ["# bnrnn report", "", table, "## Validation by statistics", "",
            "The paper's curves are read from its figures (bnrnn/paper_curves/README.md); which statistics "
            "they were validated with is not written, most likely batch statistics.", "", modes_table(runs),
            "## Time to a result", "",
            "Seconds per training step (median between log records, evaluation excluded) and the first "
            "validation that reached each number, with the training time to it (evaluation included); after "
            "the semicolon, the first step at which the paper's curve reached it.", "",
            time_table(runs)]
    body += [f"![{p.stem}]({p.name})" for p in figures]
    no_curve = [run.label for run in runs if best_validation(run)[0] is None]
    if no_curve:
        body.append(f"\nNo validation logged yet for: {', '.join(no_curve)}.")
    (out_dir / "report.md").write_text("\n".join(body) + "\n")
    return {"runs": len(runs), "figures": [str(p) for p in figures], "table": table, "plotted": plotted,
            "zoomed": zoomed}
