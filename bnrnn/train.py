"""The training loop: ``train(cfg, out_dir) -> metrics``, called by the CLI, sweeps and tests alike."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from bnrnn.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from bnrnn.config import load_config
from bnrnn.device import resolve_device
from bnrnn.diagnostics import divergence_report
from bnrnn.durations import format_duration, parse_duration
from bnrnn.explosion import ExplosionWatch
from bnrnn.errors import BnrnnError, CheckpointError, ConfigError, StorageError, first_line, is_no_room
from bnrnn.nn.stack import norm_name
from bnrnn.progress import Progress, progress_of
from bnrnn.preemption import Preempted, StopRequest
from bnrnn.provenance import code_version
from bnrnn.runfolder import (BEST, LAST, RunPlan, check_steps_left, make_writable_folder, plan_run, record_event, requeued,
                             resume_command)
from bnrnn.runlock import RunLock, command_line
from bnrnn.runlog import RunLogger
from bnrnn.scoring import DESCRIPTIONS, buffers_snapshot, flatten_modes, restore_buffers, score_modes
from bnrnn.tasks import build_task

log = logging.getLogger("bnrnn")

DIAGNOSTICS = "diagnostics"


class DivergedError(BnrnnError):
    """Too many consecutive non-finite steps."""


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


def build_optimizer(trainer: DictConfig, params) -> torch.optim.Optimizer:
    if trainer.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=trainer.lr, alpha=trainer.rmsprop_alpha, eps=trainer.rmsprop_eps, momentum=trainer.momentum,
            weight_decay=trainer.weight_decay,
        )
    if trainer.optimizer == "adam":
        return torch.optim.Adam(params, lr=trainer.lr, betas=tuple(trainer.betas), weight_decay=trainer.weight_decay)
    return torch.optim.SGD(params, lr=trainer.lr, momentum=trainer.momentum, weight_decay=trainer.weight_decay)


def is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def norms_by_term(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """("x" | "h" | "c", norm) for each normalisation of the model's recurrent layer; in a
    stack of layers or directions the term names the layer too ("x_layer2_reverse")."""
    rnn = getattr(model, "rnn", None)
    if rnn is None:
        return []
    single = len(rnn.layers) == 1
    return [(norm_name(term, None if single else label), norm)
            for layer, label in zip(rnn.layers, rnn.labels)
            for term, norm in (("x", layer.bn_x), ("h", layer.bn_h), ("c", layer.bn_c)) if norm is not None]


def gamma_summary(model: nn.Module) -> dict[str, float]:
    """Mean gamma of each normalisation (x, h, c): watching these shows saturation coming."""
    return {f"gamma_{term}_mean": bn.weight.detach().abs().mean().item() for term, bn in norms_by_term(model)}


def norm_histograms(model: nn.Module) -> dict[str, torch.Tensor]:
    """What to watch of each norm (x, h, c) as histograms: gamma over its features (shrinking
    or saturating gammas are the paper's Fig. 6), and the population variance of each time
    step averaged over the features (its first steps move, then it settles)."""
    out = {}
    for term, bn in norms_by_term(model):
        out[f"norms/gamma_{term}"] = bn.weight.detach().cpu()
        if bn.keeps_population:  # batch norm keeps population statistics; layer norm none
            out[f"norms/population_var_{term}_per_step"] = bn.running_var.detach().mean(dim=1).cpu()
    return out


@contextmanager
def batch_variance_watch(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each BN_h of the model keeps the per-step batch variance of W_h h
    (averaged over its features) of the first sequence evaluated with batch statistics (up
    to T_max steps); on
    leaving, the dict yielded holds them as ``norms/batch_var_<term>_per_step`` (T,) for
    TensorBoard's histograms (none where no sequence was evaluated so)."""
    watched = [(term, bn) for term, bn in norms_by_term(model) if term.startswith("h") and bn.keeps_population]
    found: dict[str, torch.Tensor] = {}
    for _, bn in watched:
        bn.watch_variance()
    try:
        yield found
    finally:
        for term, bn in watched:
            variance = bn.watched_variance()
            if variance is not None:
                found[f"norms/batch_var_{term}_per_step"] = variance


def total_gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together; non-finite only if a gradient is.

    An exploding (but finite) gradient, e.g. 1e35 after 784 steps of a vanilla LSTM, has a
    squared norm beyond float32's range: measured in float32 the norm would be inf and the
    step would be skipped although clipping can rescue it. Such norms are measured again in
    float64.
    """
    norm = torch.nn.utils.get_total_norm(grads)
    if not torch.isfinite(norm) and all(torch.isfinite(g).all() for g in grads):
        norm = torch.nn.utils.get_total_norm([g.double() for g in grads])
    return norm


def report_skipped_step(model: nn.Module, loss, grad_norm, batch, step: int, attempt: int, out_dir: Path,
                        logger: RunLogger) -> dict:
    """Write the diagnostics of a non-finite step to diagnostics/step-N-tryK.json (K counts the
    consecutive failed tries at step N, each on the next batch), and log a summary."""
    report = divergence_report(model, loss, grad_norm, batch, step)
    path = out_dir / DIAGNOSTICS / f"step-{step:08d}-try{attempt}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    logger.log("diverge", step, {
        "nonfinite_step": 1, "loss": report["loss"], "grad_norm": report["grad_norm"],
        "nonfinite_grads": report["nonfinite_grads"], "likely_cause": report["likely_cause"],
        "diagnostics": str(path),
    })
    logger.flush()
    # Name what was not finite: a finite loss with an overflowing gradient is another problem.
    what = "loss and gradient" if not torch.isfinite(loss) else "gradient (the loss was finite)"
    log.warning("step %d: non-finite %s: loss %s, gradient norm %s (non-finite in %s); update skipped; likely cause: "
                "%s; see %s", step, what, report["loss"], report["grad_norm"],
                ", ".join(report["nonfinite_grads"][:5]) or "-", report["likely_cause"], path)
    return report


# The settings a sweep varies, shown in TensorBoard's HParams tab against the final metrics.
HPARAM_KEYS = ("task.name", "model.name", "model.hidden_size", "model.gamma_init", "model.momentum", "model.h0_noise",
               "model.bn.x", "model.bn.h", "model.bn.c", "trainer.optimizer", "trainer.lr", "trainer.clip_norm",
               "task.batch_size", "seed")


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    values = {key: OmegaConf.select(cfg, key) for key in HPARAM_KEYS}
    return {key: ("none" if value is None else value) for key, value in values.items()}


def progress_enabled(setting: str) -> bool:
    if setting == "auto":
        return sys.stderr.isatty()
    return setting == "on"


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
    record_event(out_dir, "resume" if plan.resume else "start", run.state.step, command=command_line(),
                 changes=plan.changes, choices=launch.choices, code=code_version(),
                 **({"restarted": plan.restart} if plan.restart else {}))
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


def run_length(tcfg: DictConfig, task) -> int:
    """The run's length in steps: trainer.max_steps, or trainer.max_epochs of the task's epochs."""
    return tcfg.max_steps or tcfg.max_epochs * len(task.train)


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


class Run:
    """One run being trained: the loop, validation, checkpoints and the final test."""

    def __init__(self, cfg: DictConfig, out_dir: Path, task, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, state: Progress, resumed: bool, restarted: bool = False) -> None:
        """``restarted``: the folder holds the records of an attempt that never checkpointed,
        which this one replaces (from step 1 on, as a resume replaces those past its step)."""
        self.cfg, self.tcfg, self.out_dir = cfg, cfg.trainer, out_dir
        self.task, self.model, self.optimizer, self.device, self.state = task, model, optimizer, device, state
        self.ckpt_dir = out_dir / "checkpoints"
        self.metric, self.mode = task.selection
        self.steps_per_epoch = len(task.train)
        self.max_steps = run_length(self.tcfg, task)
        self.saved_step = state.step if resumed else None  # the step of checkpoints/last.pt
        self.logger = RunLogger(out_dir, purge_step=state.step + 1 if resumed or restarted else None,
                                elapsed_offset=state.elapsed)
        self.logger.overlay_statistics_modes(self.metric)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("%s / %s: %d parameters, %d steps (%d per epoch) on %s -> %s", task.name, cfg.model.name, n_params,
                 self.max_steps, self.steps_per_epoch, device, out_dir)
        self.bar = tqdm(total=self.max_steps, initial=state.step, disable=not progress_enabled(self.tcfg.progress),
                        dynamic_ncols=True, desc=f"{task.name}/{cfg.model.name}")
        self.stop = StopRequest()
        self.bad_steps = 0  # consecutive non-finite steps
        self.params = list(model.parameters())
        self.clip = self.tcfg.clip_norm if self.tcfg.clip_norm is not None else math.inf
        self.deadline: float | None = None  # time.monotonic() past which the run stops (trainer.max_time)
        self.explosion = ExplosionWatch(cooldown=self.tcfg.eval_every)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()

    def checkpoint(self, name: str) -> None:
        self.state.elapsed = self.logger.elapsed
        with self.stop.deferred():
            self.write_checkpoint(name)
            if name == LAST:
                self.saved_step = self.state.step

    def write_checkpoint(self, name: str) -> None:
        save_checkpoint(self.ckpt_dir / name, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": vars(self.state).copy(),
            "rng": rng_state(),
            "config": OmegaConf.to_container(self.cfg),
        })

    def last_checkpoint_note(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint is {self.ckpt_dir / LAST} (step {self.saved_step})"

    def continue_note(self) -> str:
        """Where the run stands and the command (quoted for any folder name) that goes on with it."""
        if self.saved_step is None:
            return f"no checkpoint was written yet; start it again with: {resume_command(self.out_dir)}"
        return f"{self.last_checkpoint_note()}; continue with: {resume_command(self.out_dir)}"

    def modes_now(self) -> list[str]:
        """The statistics modes of this step's validation: every mode of ``trainer.valid_stats``
        every ``trainer.valid_stats_every`` steps and at the last step, ``select_on`` alone
        in between (the selection rule's mode, at every validation)."""
        every, step = self.tcfg.valid_stats_every, self.state.step
        if every is None or step % every == 0 or step == self.max_steps:
            return list(self.tcfg.valid_stats)
        return [self.tcfg.select_on]

    def validate(self) -> dict[str, float]:
        """Score the validation split in the modes of :meth:`modes_now`; the best checkpoint
        follows the ``trainer.select_on`` number. Logs the time it took (``seconds``, and each
        mode's ``seconds_<mode>``) and the validations' share of the run so far
        (``overhead``: validation time over training time)."""
        state, metric, tcfg = self.state, self.metric, self.tcfg
        began = time.monotonic()
        with batch_variance_watch(self.model) as batch_variances:
            scores = score_modes(self.task, self.model, "valid", self.device, self.modes_now(), seed=self.cfg.seed,
                                 max_batches=tcfg.eval_batches, reestimate_batches=tcfg.valid_reestimate_batches)
        self.model.train()
        metrics = flatten_modes(scores, tcfg.select_on)
        if is_better(metrics[metric], state.best_metric, self.mode):
            state.best_metric, state.best_step = metrics[metric], state.step
            self.checkpoint(BEST)
        metrics["best_" + metric] = state.best_metric
        self.logger.histograms(state.step, {**norm_histograms(self.model), **batch_variances})
        spent = time.monotonic() - began
        state.valid_seconds += spent
        metrics["seconds"] = round(spent, 3)
        metrics["overhead"] = round(validation_overhead(self.logger.elapsed, state.valid_seconds), 4)
        self.logger.log("valid", state.step, metrics)
        self.checkpoint(LAST)
        self.logger.flush()
        log.info("step %d: valid %s %.4f (loss %.4f%s), best %.4f at step %d", state.step, metric, metrics[metric],
                 metrics["loss"], modes_note(scores, metrics["stats"], metric), state.best_metric, state.best_step)
        return metrics

    def stop_if_requested(self) -> None:
        """Between steps: on SIGTERM/SIGINT, checkpoint the completed steps and stop."""
        if self.stop.requested:
            self.checkpoint(LAST)
            self.logger.flush()
            raise Preempted(f"stopped by {self.stop.name} after step {self.state.step}; {self.continue_note()}",
                            self.stop.signum)

    def loop(self) -> dict[str, Any]:
        """Train to ``max_steps``, validating every ``eval_every``; then test the best checkpoint."""
        state = self.state
        self.model.train()
        try:
            with self.stop:
                while state.step < self.max_steps:
                    epoch, begin = divmod(state.step, self.steps_per_epoch)
                    for batch in self.task.train.iterate(epoch, self.cfg.seed, begin):
                        self.stop_if_requested()
                        self.guarded_step(batch)
                        if state.step >= self.max_steps:
                            break
                        if self.out_of_time():
                            return self.stop_for_time()
                    self.stop_if_requested()
                self.stop.stop_at_once(
                    f"stopped by {{signal}} during the final test; the training is complete ({self.last_checkpoint_note()}); "
                    f"test it with: {resume_command(self.out_dir)}"
                )
                return finish(self.cfg, self.task, self.model, self.device, self.ckpt_dir, state, self.logger,
                              self.stop)
        except KeyboardInterrupt:
            raise Preempted(f"stopped at once by Ctrl-C during step {state.step + 1}; {self.continue_note()}",
                            signal.SIGINT) from None
        except OSError as exc:
            if not is_no_room(exc):
                raise
            raise StorageError(f"cannot write {exc.filename or 'a record of the run'} ({os.strerror(exc.errno)}); "
                               f"{self.continue_note()}, once there is room") from None
        except StorageError as exc:
            raise StorageError(f"{exc}; {self.continue_note()}, once there is room") from None

    def warn_if_exploding(self, step: int, norm: float) -> None:
        """A warning, and an ``exploding`` record in history.jsonl, when the gradient norm jumps
        far above its recent median while staying finite (:mod:`bnrnn.explosion`)."""
        median = self.explosion.check(step, norm)
        if median is None:
            return
        best = f"the best checkpoint is step {self.state.best_step}" if self.state.best_step else "no best checkpoint yet"
        log.warning("step %d: the gradient norm is %.3g, %.0fx its recent median %.3g: the training is exploding "
                    "(clipping bounds each update, but its direction is the exploding part's); %s; "
                    "scripts/gradient_by_step.py shows where it comes from", step, norm, norm / median, median, best)
        record_event(self.out_dir, "exploding", step, grad_norm=norm, recent_median=median,
                     best_step=self.state.best_step)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def stop_for_time(self) -> dict[str, Any]:
        """The planned stop of ``trainer.max_time``, at a step boundary: the checkpoint of the
        steps done, one line with the step and the command that continues the run; the
        results so far, with ``stopped`` = "max_time" (the caller exits 0)."""
        state = self.state
        if self.saved_step != state.step:
            self.checkpoint(LAST)
        self.logger.flush()
        resume_with = resume_command(self.out_dir)
        reason = (f"trainer.max_time={self.tcfg.max_time} reached after {format_duration(self.logger.elapsed)} of "
                  f"training in all: stopped at step {state.step} of {self.max_steps}")
        log.info("%s; checkpoint written to %s; continue with: %s", reason, self.ckpt_dir / LAST, resume_with)
        return {**progress_results(self.cfg, self.task, state), "stopped": "max_time", "reason": reason,
                "resume_with": resume_with}

    def guarded_step(self, batch) -> None:
        """One optimiser step on ``batch``, skipped (with diagnostics) if its loss or gradient is
        not finite; DivergedError after ``trainer.max_bad_steps`` such steps in a row."""
        state, tcfg, model = self.state, self.tcfg, self.model
        params = self.params
        snapshot = buffers_snapshot(model)
        loss, batch_metrics = self.task.train_loss(model, batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The norm first, clipping only when it is finite: clipping an inf norm would
        # turn every gradient into NaN and hide which parameters overflowed.
        grad_norm = total_gradient_norm([p.grad for p in params if p.grad is not None])
        if torch.isfinite(grad_norm):
            torch.nn.utils.clip_grads_with_norm_(params, self.clip, grad_norm)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            self.bad_steps += 1
            report = report_skipped_step(model, loss, grad_norm, batch, state.step + 1, self.bad_steps, self.out_dir,
                                         self.logger)
            restore_buffers(model, snapshot)  # the population must not see this step either
            if self.bad_steps >= tcfg.max_bad_steps:
                raise DivergedError(
                    f"training diverged: {self.bad_steps} consecutive steps with a non-finite loss or "
                    f"gradient (last at step {state.step + 1}); likely cause: "
                    f"{report['likely_cause']}; diagnostics in {self.out_dir / DIAGNOSTICS}; "
                    f"{self.last_checkpoint_note()}"
                )
            return
        self.bad_steps = 0
        norm = grad_norm.item()  # one device sync serves the watch and the log
        self.warn_if_exploding(state.step + 1, norm)
        self.optimizer.step()
        state.step += 1
        self.bar.update(1)
        values = {"loss": loss.item(), "grad_norm": norm}
        values.update({k: float(v) for k, v in batch_metrics.items()})
        state.add_to_window(values)
        if state.step % tcfg.log_every == 0 or state.step == self.max_steps:
            averaged = state.take_window()
            averaged["lr"] = self.optimizer.param_groups[0]["lr"]
            averaged["epoch"] = state.step / self.steps_per_epoch
            averaged.update(gamma_summary(model))
            self.logger.log("train", state.step, averaged)
            self.bar.set_postfix(loss=f"{averaged['loss']:.3f}")
        if state.step % tcfg.eval_every == 0 or state.step == self.max_steps:
            self.validate()
        elif tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0:
            self.checkpoint(LAST)


def validation_overhead(elapsed: float, valid_seconds: float) -> float:
    """Validation time over training time (the rest of the run's time): 0.08 = validating cost
    8 % on top of the training."""
    training = max(elapsed - valid_seconds, 1e-9)
    return valid_seconds / training


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


def apply_hyperparameters(optimizer: torch.optim.Optimizer, trainer_cfg: DictConfig) -> None:
    """Set the config's lr, momentum, betas... on a restored optimiser.

    ``load_state_dict`` brings back the hyperparameters saved with the state; without this a
    resume with a new ``trainer.lr`` would go on at the old one while config.yaml says otherwise.
    """
    dummy = torch.zeros(1, requires_grad=True)
    settings = {k: v for k, v in build_optimizer(trainer_cfg, [dummy]).param_groups[0].items() if k != "params"}
    for group in optimizer.param_groups:
        group.update(settings)
        if isinstance(optimizer, torch.optim.RMSprop) and group["momentum"] > 0:
            # momentum switched on by the resume: RMSprop makes the buffer only for a fresh state
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def modes_note(scores: dict[str, dict[str, Any]], chosen: str, metric: str) -> str:
    """'; batch statistics; EMA population statistics 0.3010, ...': which statistics the
    logged number is, then the other modes' numbers, for a log line."""
    if chosen == "none":
        return ""
    others = ", ".join(f"{DESCRIPTIONS[m]} {v[metric]:.4f}" for m, v in scores.items() if m != chosen)
    return f"; {DESCRIPTIONS[chosen]}" + (f"; {others}" if others else "")


def progress_results(cfg, task, state: Progress) -> dict[str, Any]:
    """What a run's results say of its training so far: task, model, steps, and the best
    validation number with its step."""
    metric, _ = task.selection
    return {"task": cfg.task.name, "model": cfg.model.name, "steps": state.step, "best_step": state.best_step,
            f"valid_{metric}": state.best_metric}


def finish(cfg, task, model, device, ckpt_dir: Path, state: Progress, logger: RunLogger,
           stop: StopRequest) -> dict[str, Any]:
    """Test the best checkpoint (by validation) and write results.json; a stop signal during
    the test (``stop``, in its at-once mode) leaves no results.json."""
    metric, _ = task.selection
    results: dict[str, Any] = {
        **progress_results(cfg, task, state), "select_on": cfg.trainer.select_on,
        "elapsed": round(logger.elapsed, 1), "validation_seconds": round(state.valid_seconds, 1),
        "validation_overhead": round(validation_overhead(logger.elapsed, state.valid_seconds), 4),
    }
    tcfg = cfg.trainer
    if tcfg.test_at_end and (ckpt_dir / BEST).exists():
        with stop.deferred():  # a log record: see StopRequest.deferred
            log.info("testing the best checkpoint (step %s) on the test set", state.best_step)
        model.load_state_dict(load_checkpoint(ckpt_dir / BEST, map_location=device)["model"])
        # The authors' protocol (trainer.reestimate_stats): the headline test number with the
        # population statistics re-estimated over the training set; EMA and batch-statistics
        # numbers are kept beside it.
        final = "reestimated" if tcfg.reestimate_stats else "ema"
        modes = ["ema", "batch"] + (["reestimated"] if tcfg.reestimate_stats else [])
        scores = score_modes(task, model, "test", device, modes, seed=cfg.seed,
                             reestimate_batches=tcfg.reestimate_batches, reestimate_batch_size=tcfg.reestimate_batch_size)
        stop.raise_if_stopped()  # a stop whose raise something swallowed
        test = flatten_modes(scores, final)
        logger.log("test", state.best_step, test)
        results.update({f"test_{k}": v for k, v in test.items()})
        with stop.deferred():
            log.info("test (best checkpoint, step %s): %s %.4f%s", state.best_step, metric, test[metric],
                     modes_note(scores, test["stats"], metric))
    logger.hparams(hparams_of(cfg), {k: v for k, v in results.items() if k.startswith(("valid_", "test_"))})
    out_dir = ckpt_dir.parent
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out_dir / "results.json")
    return results
