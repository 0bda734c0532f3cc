"""The training loop: ``train(cfg, out_dir) -> metrics``, called by the CLI, sweeps and tests alike."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bnrnn.checkpoint import set_rng_state
from bnrnn.config import load_config
from bnrnn.device import resolve_device
from bnrnn.durations import parse_duration
from bnrnn.errors import BnrnnError, CheckpointError, ConfigError, first_line
from bnrnn.optimizers import apply_hyperparameters, build_optimizer
from bnrnn.preemption import Preempted
from bnrnn.progress import Progress, progress_of
from bnrnn.provenance import code_version, machine
from bnrnn.run_loop import Run, run_length
from bnrnn.runfolder import (BEST, LAST, RunPlan, check_steps_left, make_writable_folder, plan_run, read_history,
                             record_event, requeued, unclosed_segment)
from bnrnn.runlog import last_logged_step
from bnrnn.runlock import RunLock, command_line
from bnrnn.tasks import build_task

log = logging.getLogger("bnrnn")


@dataclass
class Launch:
    """How ``bnrnn train`` started this job: what ``train`` cannot tell from the config alone."""

    overrides: list[str] | None = None  # the command line's overrides (None: the config is the whole intent)
    choices: dict[str, str] | None = None  # its config-group options (model=bnlstm, ...), for history.jsonl
    new_folder: bool = False  # the run folder did not exist before this launch
    created: Path | None = None  # the topmost folder this launch created for it (runs/ of a first run), if known
    began: float = field(default_factory=time.monotonic)  # when it started: trainer.max_time counts from here
    lock: RunLock | None = None  # the run folder's lock, where the launch took it already (bnrnn train's preflight)
    plan: RunPlan | None = None  # what the launch does, where bnrnn train's preflight decided it already




def train(cfg: DictConfig | dict, out_dir: str | Path, launch: Launch | None = None) -> dict[str, Any]:
    """Train one model on one task; write everything into ``out_dir``; return final metrics.

    The metrics dict holds the step count, the best validation metric and its step, and the
    test metrics of the best checkpoint (``test_<metric>``) when ``trainer.test_at_end``.
    Every error the user can fix is raised before the first step where it can be known
    (config, run folder, checkpoints, data); a run folder this launch created is then removed.
    """
    out_dir = Path(out_dir)
    launch = launch or Launch(new_folder=not out_dir.exists())
    plan = launch.plan or plan_run(load_config(cfg), out_dir, launch.overrides, lock_held=launch.lock is not None)
    lock = launch.lock
    if lock is None:
        make_writable_folder(out_dir, "the run folder")
        lock = RunLock(out_dir).acquire()  # if refused, nothing is touched: the folder is another live run's
    killed = killed_segment(out_dir) if plan.resume else None  # read before start() cuts metrics.jsonl back
    try:
        run = start(plan, out_dir)
    except (BnrnnError, KeyboardInterrupt) as exc:
        lock.release()
        if launch.new_folder:
            remove_new_folder(out_dir, launch.created)
        if isinstance(exc, KeyboardInterrupt):
            raise Preempted("interrupted during start-up, before the first step; nothing was trained",
                            signal.SIGINT) from None
        raise
    if killed:
        log.warning("the previous segment of this run (pid %s on %s, from step %s) ended without a record: it was "
                    "killed; it had logged up to step %s, and goes on from its checkpoint at step %d",
                    killed["pid"], killed["host"], killed["from_step"], killed["last_logged_step"], run.state.step)
    # The config-group options are the start's alone: a resume's command composes Hydra's
    # defaults (model=bnlstm, ...), which say nothing of the run it continues (its config.yaml
    # does, and "changes" says what the resume altered).
    choices = {} if plan.resume else {"choices": launch.choices}
    record_event(out_dir, "resume" if plan.resume else "start", run.state.step, command=command_line(),
                 changes=plan.changes, **choices, code=code_version(), machine=machine(run.device),
                 **({"restarted": plan.restart} if plan.restart else {}), **({"after_kill": killed} if killed else {}))
    if plan.config.trainer.max_time is not None:
        run.deadline = launch.began + parse_duration(plan.config.trainer.max_time)
    try:
        results = run.loop()
    except BaseException as exc:
        event = "stopped" if isinstance(exc, Preempted) else "failed"
        with suppress(OSError):  # a full disk cannot take this record either; the error says why
            record_event(out_dir, event, run.state.step, reason=str(exc) or type(exc).__name__)
        raise
    finally:
        run.close()
        lock.release()
    if results.get("stopped") == "max_time":
        record_event(out_dir, "max_time", run.state.step, reason=results["reason"], resume_with=results["resume_with"])
    else:
        record_event(out_dir, "finished", run.state.step)
    return results


def killed_segment(out_dir: Path) -> dict[str, Any] | None:
    """What history.jsonl and metrics.jsonl say of the run's last segment, where it ended
    without a closing record (killed: SIGKILL, the OOM killer, a lost machine); else None.
    The resume record keeps it, since the resume cuts the killed segment's records past its
    checkpoint out of metrics.jsonl, and the steps it ran beyond that are run again."""
    opened = unclosed_segment(read_history(out_dir))
    if opened is None:
        return None
    return {"event": opened.get("event"), "from_step": opened.get("step"), "time": opened.get("time"),
            "host": opened.get("host"), "pid": opened.get("pid"),
            "last_logged_step": last_logged_step(out_dir / "metrics.jsonl")}


def remove_new_folder(out_dir: Path, created: Path | None) -> None:
    """Remove a refused launch's new run folder (it holds only what this launch wrote), then
    each folder made to hold it, up to ``created``, where it is left empty (another launch
    may have put its own run there meanwhile)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    if created is None:
        return
    folder = out_dir.resolve().parent
    created = created.resolve()
    while folder == created or created in folder.parents:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            return
        folder = folder.parent


def start(plan: RunPlan, out_dir: Path) -> Run:
    """Build the task, model and optimiser of ``plan``, restored from its checkpoint on a resume."""
    cfg, tcfg = plan.config, plan.config.trainer
    device = resolve_device(cfg.device.name)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    task = build_task(cfg)
    task.keep_artifacts(out_dir)
    model = build_model(task, cfg, device)
    optimizer = build_optimizer(tcfg, model.parameters())
    state = Progress()
    ckpt_dir = out_dir / "checkpoints"
    if plan.restart:
        log.warning("%s", plan.restart)
    if plan.resume:
        if requeued() and not tcfg.resume:
            log.info("requeued by the scheduler (SLURM_RESTART_COUNT=%s): resuming from %s",
                     os.environ.get("SLURM_RESTART_COUNT"), ckpt_dir / LAST)
        state = restore(plan.checkpoint, ckpt_dir / LAST, model, optimizer, tcfg)
        changed = "; ".join(f"{key} {old} -> {new}" for key, (old, new) in plan.changes.items())
        log.info("resumed %s at step %d%s", out_dir, state.step, f" with {changed}" if changed else "")
        if plan.best_missing:
            check_steps_left(run_length(tcfg, task), state.step, ckpt_dir / BEST)
            log.warning("%s is missing: the best checkpoint is chosen again from the next validation", ckpt_dir / BEST)
            state.best_metric = state.best_step = None
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return Run(cfg, out_dir, task, model, optimizer, device, state, resumed=plan.resume,
               restarted=bool(plan.restart))


def build_model(task, cfg: DictConfig, device: torch.device) -> nn.Module:
    """The task's model on ``device``; a model too large for memory is one sentence, not an allocator's traceback."""
    try:
        return task.build_model(cfg.model).to(device)
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and "alloc" not in text:
            raise
        wanted = re.search(r"allocate (\d+) bytes", text)
        size = f" (one tensor alone needs {int(wanted.group(1)) / 2**30:,.1f} GiB)" if wanted else ""
        raise ConfigError(f"model.hidden_size={cfg.model.hidden_size}: the model does not fit in memory on "
                          f"{device}{size}; choose a smaller model.hidden_size") from None


def restore(payload: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            trainer_cfg: DictConfig) -> Progress:
    """Load a checkpoint's contents (read from ``path``) into ``model`` and ``optimizer`` (each
    copies onto its own device); the RNG states too; return the counters.

    (Whether the checkpoint fits the run's settings was decided by :func:`bnrnn.resume.resume_config`.)
    """
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} was written for a different model or optimiser ({first_line(exc)})") from exc
    apply_hyperparameters(optimizer, trainer_cfg)
    set_rng_state(payload["rng"])
    return progress_of(payload, path)


