"""A run folder's state, and what a launch into it may do, decided before anything is written.

:func:`plan_run` decides once per launch: ``bnrnn train``'s preflight plans a single run
before Hydra creates or writes anything and hands the plan to :func:`bnrnn.train.train`; a
sweep's jobs are all checked there before the first starts, and each is planned as it
starts (the Python API's ``train(cfg, run_dir)`` plans its own). It writes nothing. It
refuses:

- a folder that cannot be made or written (a file in the way, no permission);
- a folder another live process is writing to (:mod:`bnrnn.runlock`);
- a folder that already holds a run, unless ``trainer.resume=true``;
- a resume with an unreadable ``last.pt`` or ``best.pt``, or a refused change of settings
  (:mod:`bnrnn.resume`).

A run that stopped before its first checkpoint has nothing to lose: the same command, a
resume or a scheduler's requeue starts it again from step 0, and says so. A resume into a
folder that holds no run at all (a sweep's job that never started) starts it too.

Each launch and each end is appended to ``history.jsonl``: what ran, from which step, with
which accepted changes, and how it ended.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bnrnn.errors import CheckpointError, ConfigError, link_problem
from bnrnn.resume import CONFIG_FILE, resume_config
from bnrnn.runlock import check_free
from bnrnn.schema import normalized_terms

LAST, BEST = "last.pt", "best.pt"
HISTORY_FILE = "history.jsonl"
RESULTS_FILE = "results.json"
# Any of these marks a folder that a run has written to.
RUN_MARKERS = (CONFIG_FILE, HISTORY_FILE, "metrics.jsonl", f"checkpoints/{LAST}", RESULTS_FILE)


@dataclass
class RunPlan:
    """What a launch will do: the config it runs with, whether it resumes, what it changes."""

    config: DictConfig
    resume: bool
    changes: dict[str, list] = field(default_factory=dict)
    best_missing: bool = False  # resuming a run whose best.pt has gone: the best restarts
    restart: str | None = None  # why a folder's records are begun again from step 0 (no checkpoint to go on from)
    checkpoint: dict[str, Any] | None = None  # last.pt's contents (CPU tensors), read once for a resume


def requeued() -> bool:
    """True in a SLURM job that the scheduler restarted (preempted and requeued, e.g. by the
    submitit launcher): the same command then continues its run instead of refusing it."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / marker).exists() for marker in RUN_MARKERS)


def check_output_location(run_dir: Path) -> None:
    """ConfigError if ``run_dir`` cannot be created or written: a file in the way, a broken
    symbolic link, no permission."""
    broken = link_problem(run_dir)
    if broken:
        raise ConfigError(f"the run folder {run_dir} cannot be used: {broken}; choose another hydra.run.dir")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == run_dir else f"cannot be created: {existing} is a file"
        raise ConfigError(f"the run folder {run_dir} {where}; choose another hydra.run.dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == run_dir else f" ({existing} is not writable)"
        raise ConfigError(f"the run folder {run_dir} is not writable{where}; choose another hydra.run.dir")


def make_writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` (``what`` names it for the user: "the run folder", "--out") and check
    that files can be written there; ConfigError with the reason otherwise."""
    broken = link_problem(folder)
    if broken:
        raise ConfigError(f"{what} {folder} cannot be used: {broken}")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {folder} cannot be written to ({reason}: {exc.filename or folder})") from exc


def checkpoint_file(run_dir: Path, which: str) -> Path:
    """The run's ``which`` ("best" or "last") checkpoint for a reader (eval, sample, the
    statistics plot): checkpoints/<which>.pt, or, for "best" where the run has none, the
    published RUN/best.pt (bnrnn.published: a finished run as a fresh clone of the repository
    holds it). Missing both, the usual place, for the error to name."""
    kept = run_dir / "checkpoints" / f"{which}.pt"
    published = run_dir / BEST
    return published if which == "best" and not kept.exists() and published.is_file() else kept


def check_best(path: Path) -> None:
    from bnrnn.checkpoint import load_checkpoint

    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}; delete it to resume, and the best checkpoint is chosen again from the next validation"
        ) from exc


def plan_run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None, lock_held: bool = False) -> RunPlan:
    """Decide what a launch of ``cfg`` into ``run_dir`` does; raise the one-sentence error if
    it must not run. ``overrides``: the command line's (None: ``cfg`` is the whole intent);
    ``lock_held``: this process holds the folder's lock already (``bnrnn train``'s preflight)."""
    plan = decide(cfg, run_dir, overrides, lock_held)
    check_backend(plan.config)
    return plan


def check_backend(cfg: DictConfig) -> None:
    """ConfigError if the run's device does not exist here, or its named backend cannot run
    on it (``model.backend=triton`` on a CPU): found before the run writes anything, and
    before a resume saves the setting into config.yaml."""
    import torch

    from bnrnn.device import resolve_device
    from bnrnn.nn import backends

    device = resolve_device(cfg.device.name)
    backend = backends.registered()[cfg.model.backend] if cfg.model.backend != backends.AUTO else None
    if backend is None:
        return
    if not backend.computes(cfg.model.norm if normalized_terms(cfg.model) else None):
        raise ConfigError(f"model.backend={backend.name} cannot run model.norm={cfg.model.norm}: it computes "
                          f"{' and '.join(backend.norms)} norm; use model.backend=auto, which picks the fastest "
                          f"backend that can")
    reason = backend.cannot_run(torch.zeros(1, 1, 1, device=device))
    if reason is not None:
        raise ConfigError(f"model.backend={backend.name} cannot run on {device}: {reason}; use model.backend=auto, "
                          f"which picks the fastest backend that can")


def decide(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, lock_held: bool) -> RunPlan:
    check_output_location(run_dir)
    if not lock_held:
        check_free(run_dir)
    last = run_dir / "checkpoints" / LAST
    resume = cfg.trainer.resume or (requeued() and last.exists())
    if not resume:
        if (run_dir / RESULTS_FILE).exists():
            raise ConfigError(
                f"{run_dir} already holds a finished run; pass trainer.resume=true with a larger trainer.max_steps to "
                f"extend it, or choose another hydra.run.dir"
            )
        if holds_run(run_dir) and last.exists():
            raise ConfigError(f"{run_dir} already holds a run; pass trainer.resume=true to continue it, "
                              f"or choose another hydra.run.dir")
    elif last.exists():
        return plan_resume(cfg, run_dir, overrides)
    elif (run_dir / RESULTS_FILE).exists():
        raise CheckpointError(f"{run_dir} holds a finished run but no {LAST}; nothing to resume from")
    if holds_run(run_dir):
        return RunPlan(cfg, resume=False, restart=f"{run_dir} stopped before its first checkpoint, so nothing of it "
                                                  f"can go on: starting it again from step 0")
    if resume:
        return RunPlan(cfg, resume=False, restart=f"{run_dir} holds no run to resume: starting a new one")
    return RunPlan(cfg, resume=False)


def plan_resume(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> RunPlan:
    """The plan of a resume from ``run_dir/checkpoints/last.pt`` (which exists)."""
    last = run_dir / "checkpoints" / LAST
    # Imported here: torch takes seconds to import, and a launch refused above should not wait for it.
    from bnrnn.checkpoint import load_checkpoint

    from bnrnn.progress import progress_of

    payload = load_checkpoint(last)
    progress_of(payload, last)  # counters of a newer version: refused here, before anything is written
    best = run_dir / "checkpoints" / BEST
    if best.exists():
        check_best(best)
    effective, changes = resume_config(cfg, run_dir, payload.get("config", {}), overrides, saved_choices(run_dir))
    best_missing = payload["progress"].get("best_step") is not None and not best.exists()
    if best_missing:
        check_steps_left(effective.trainer.max_steps, payload["progress"]["step"], best)
    return RunPlan(effective, resume=True, changes=changes, best_missing=best_missing, checkpoint=payload)


def check_steps_left(max_steps: int | None, step: int, best: Path) -> None:
    """A run whose best checkpoint has gone chooses another from its next validation; a run
    with no step left would have none, and would end with no best and no test (CheckpointError).
    (``max_steps`` None: a length in epochs, checked once the data is loaded.)"""
    if max_steps is not None and step >= max_steps:
        raise CheckpointError(
            f"{best} is missing and the run has trained all its {max_steps} steps, so no validation is left to "
            f"choose another best checkpoint; put best.pt back, or pass a larger trainer.max_steps to train on"
        )


def saved_choices(run_dir: Path) -> dict[str, str]:
    """The config-group options the run was made with (``{"model": "bnlstm", ...}``): from its
    first launch in history.jsonl, else from Hydra's record of it; {} if neither says."""
    for record in read_history(run_dir):
        if record.get("choices"):
            return record["choices"]
    try:
        return dict(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices)
    except Exception:  # absent or unreadable: the groups are then compared key by key
        return {}


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# The events that open and close a segment (one process's stretch of a run) in history.jsonl.
SEGMENT_OPENS = ("start", "resume")
SEGMENT_CLOSES = ("finished", "stopped", "failed", "max_time")


def unclosed_segment(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The opening record of the last segment where no record closes it, else None.

    A process writes its closing record on every way out it sees (the end, a budget, a
    signal, an error); one that has none was killed where it could not (SIGKILL, the OOM
    killer, a lost machine). Only meaningful while no process holds the run."""
    for record in reversed(history):
        if record.get("event") in SEGMENT_CLOSES:
            return None
        if record.get("event") in SEGMENT_OPENS:
            return record
    return None


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir`` with its own saved settings
    (config.yaml), to paste into a POSIX shell whatever the folder's name holds: the path is
    quoted for Hydra where it has more than plain path characters (a sweep job's folder holds
    ``=`` and ``,``, which Hydra would read as a sweep), and the argument for the shell."""
    path = str(run_dir.resolve())
    plain = re.fullmatch(r"[\w./@%+:-]+", path)
    quote = "'" if "'" not in path else '"'
    argument = f"hydra.run.dir={path}" if plain else f"hydra.run.dir={quote}{path}{quote}"
    if not plain and not re.search(r'["$`\\!]', argument):
        argument = f'"{argument}"'  # reads better than shlex's '...'"'"'...'
    else:
        argument = shlex.quote(argument)
    return f"bnrnn train {argument} trainer.resume=true"


def record_event(run_dir: Path, event: str, step: int, **details: Any) -> None:
    """Append one line to history.jsonl: event (start, resume, finished, stopped, failed),
    step, time, host, pid, and ``details`` (the command, accepted changes, the reason...)."""
    record = {"event": event, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": socket.gethostname(), "pid": os.getpid(), **details}
    with open(run_dir / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
