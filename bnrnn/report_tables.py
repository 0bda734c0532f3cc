"""The tables of ``bnrnn report``: each run beside the paper, validation by statistics mode,
and the time to a result."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnrnn.paper import PAPER_TEST, validation_curve
from bnrnn.scoring import DESCRIPTIONS, MODES

if TYPE_CHECKING:
    from bnrnn.report import Run

TABLE_STEPS = (1000, 5000, 10000)
MODE_TABLE_STEPS = (1000, 2000, 5000, 10000)
LONG_STEPS = (25000, 50000, 100000)  # columns added where a run has validated that far (the paper's length)


def columns(runs: list[Run], steps: tuple[int, ...]) -> tuple[int, ...]:
    """``steps``, and each of LONG_STEPS that some run has validated at or past."""
    reached = max((run.last_valid_step for run in runs), default=0)
    return steps + tuple(step for step in LONG_STEPS if step <= reached)


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


# Time to a result: the first validation reaching these numbers (plain metric).
TARGETS = {"accuracy": (0.8, 0.9, 0.95, 0.98), "bpc": (1.8, 1.6, 1.5, 1.4)}


def seconds_per_step(run: Run) -> float | None:
    """Training seconds per step: the median over consecutive training records with no
    validation (or resume) between them, so that evaluation time is not counted."""
    marks = sorted((r["step"], r.get("split"), r.get("elapsed")) for r in run.records
                   if r.get("split") in ("train", "valid") and isinstance(r.get("elapsed"), (int, float)))
    rates = []
    for (s0, k0, e0), (s1, k1, e1) in zip(marks, marks[1:]):
        if k0 == k1 == "train" and s1 > s0 and e1 > e0:
            rates.append((e1 - e0) / (s1 - s0))
    if not rates:
        return None
    rates.sort()
    return rates[len(rates) // 2]


def reaches(run: Run, value: float, target: float) -> bool:
    return value >= target if run.selection[1] == "max" else value <= target


def time_to(run: Run, metric: str, target: float) -> str:
    """'step (minutes)' of the first validation at or past ``target``, or '-'."""
    for step, elapsed, value in run.curve("valid", metric):
        if reaches(run, value, target):
            return f"{step} ({elapsed / 60:.0f} min)"
    return "-"


def paper_step_to(run: Run, target: float) -> str:
    """The first step at which the paper's curve for the run's task and model reaches
    ``target`` (its plotted vertices), '-' where it never does, '' where it drew none."""
    curve = validation_curve(run.task, run.model)
    if curve is None:
        return ""
    step = next((x for x, y in zip(curve.x, curve.y) if reaches(run, y, target)), None)
    return "-" if step is None else f"{step:.0f}"


def ours_and_paper(run: Run, step: int, metric: str) -> str:
    """'ours / paper' at one step ('-' for a number that is missing)."""
    curve = validation_curve(run.task, run.model)
    paper = curve.at(step) if curve is not None else None
    return f"{format_metric(metric, run.valid_at(step, metric))} / {format_metric(metric, paper)}"


def markdown_table(runs: list[Run]) -> str:
    table_steps = columns(runs, TABLE_STEPS)
    at_steps = " | ".join(f"valid at {step // 1000}k: ours / paper" for step in table_steps)
    lines = [f"| task | run | steps | best valid (step) | test | paper (test) | test - paper | {at_steps} | "
             f"valid at the last validation (step): ours / paper | s / step | status |",
             "|---|---|---:|---|---|---|---|" + "---|" * len(table_steps) + "---|---:|---|"]
    for run in runs:
        steps = run.last_step
        best, best_step = best_validation(run)
        test = test_value(run)
        paper = PAPER_TEST.get((run.task, run.model))
        if run.results:
            status = "finished"
        elif best is None:
            status = "no validation yet"
        else:
            status = "partial (no results.json: running or stopped)"
        if run.torn_lines:
            status += f"; {run.torn_lines} unreadable log line(s) skipped"
        metric = run.selection[0]
        best_text = f"{format_metric(metric, best)} ({best_step})" if best is not None else "-"
        at = " | ".join(ours_and_paper(run, step, metric) for step in table_steps)
        last = run.last_valid_step
        lines.append(f"| {run.task} | {run.label} | {steps} | {best_text} | {format_metric(metric, test)} | "
                     f"{format_metric(metric, paper)} | {format_delta(metric, test, paper)} | {at} | "
                     f"{ours_and_paper(run, last, metric)} ({last}) | {format_seconds(seconds_per_step(run))} | "
                     f"{status} |")
    return "\n".join(lines) + "\n"


def format_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


def time_table(runs: list[Run]) -> str:
    """Seconds per training step and the step (and training time, evaluation included) at
    which the plain validation number first reached each target, beside the step at which
    the paper's curve first did."""
    lines = []
    for task in dict.fromkeys(run.task for run in runs):
        group = [run for run in runs if run.task == task]
        metric = group[0].selection[0]
        targets = TARGETS.get(metric, ())
        heads = " | ".join(f"first at {format_metric(metric, t)}: step (time); paper" for t in targets)
        lines += [f"| task | run | s / training step | {heads} |", "|---|---|---:|" + "---|" * len(targets)]
        for run in group:
            cells = " | ".join(time_to(run, metric, t) + (f"; {paper}" if (paper := paper_step_to(run, t)) else "")
                               for t in targets)
            lines.append(f"| {task} | {run.label} | {format_seconds(seconds_per_step(run))} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def modes_table(runs: list[Run]) -> str:
    """Validation in every statistics mode a run logged, at MODE_TABLE_STEPS (and the long
    steps reached) and at the mode's last validation, below the paper's curve for the same
    task and model."""
    mode_steps = columns(runs, MODE_TABLE_STEPS)
    header = " | ".join(f"{step // 1000}k" for step in mode_steps)
    lines = [f"| task | run | statistics | {header} | last |", "|---|---|---|" + "---:|" * (len(mode_steps) + 1)]
    papers_done = set()
    for run in runs:
        metric = run.selection[0]
        curve = validation_curve(run.task, run.model)
        if curve is not None and (run.task, run.model) not in papers_done:
            papers_done.add((run.task, run.model))
            cells = " | ".join(format_metric(metric, curve.at(step)) for step in mode_steps)
            lines.append(f"| {run.task} | {curve.label} | most likely batch | {cells} | - |")
        for key, name in mode_keys(run, metric):
            cells = " | ".join(format_metric(metric, run.valid_at(step, key)) for step in mode_steps)
            logged = run.curve("valid", key)
            last = f"{format_metric(metric, logged[-1][2])} ({logged[-1][0]})" if logged else "-"
            lines.append(f"| {run.task} | {run.label} | {name} | {cells} | {last} |")
    return "\n".join(lines) + "\n"


def mode_keys(run: Run, metric: str) -> list[tuple[str, str]]:
    """(record key, statistics named) of each mode the run logged; the plain key when it
    logged one number only (a model without batch norm, or an older log)."""
    logged = [(f"{metric}_{mode}", DESCRIPTIONS[mode]) for mode in MODES if run.curve("valid", f"{metric}_{mode}")]
    if logged:
        return logged
    return [(metric, "none (no batch norm)" if run.stats == "none" else "as logged")]
