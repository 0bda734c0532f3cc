"""One run being trained (:class:`Run`): the guarded step, validation on its schedule,
checkpoints, the planned stop of ``trainer.max_time``, and the final test."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from bnrnn.checkpoint import load_checkpoint, rng_state, save_checkpoint
from bnrnn.device import precision_context
from bnrnn.durations import format_duration
from bnrnn.errors import BnrnnError, StorageError, is_no_room
from bnrnn.explosion import ExplosionWatch
from bnrnn.monitoring import (DIAGNOSTICS, batch_variance_watch, gamma_summary, norm_histograms, report_skipped_step,
                              total_gradient_norm)
from bnrnn.preemption import Preempted, StopRequest
from bnrnn.progress import Progress
from bnrnn.runfolder import BEST, LAST, record_event, resume_command
from bnrnn.runlog import RunLogger
from bnrnn.scoring import DESCRIPTIONS, buffers_snapshot, flatten_modes, restore_buffers, score_modes

log = logging.getLogger("bnrnn")


def is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class DivergedError(BnrnnError):
    """Too many consecutive non-finite steps."""


# The settings a sweep varies, shown in TensorBoard's HParams tab against the final metrics.
HPARAM_KEYS = ("task.name", "model.name", "model.hidden_size", "model.gamma_init", "model.stats_momentum",
               "model.h0_noise", "model.normalize.x", "model.normalize.h", "model.normalize.c", "trainer.optimizer",
               "trainer.lr", "trainer.clip_norm", "task.batch_size", "seed")


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    values = {key: OmegaConf.select(cfg, key) for key in HPARAM_KEYS}
    return {key: ("none" if value is None else value) for key, value in values.items()}


def progress_enabled(setting: str) -> bool:
    if setting == "auto":
        return sys.stderr.isatty()
    return setting == "on"


def run_length(tcfg: DictConfig, task) -> int:
    """The run's length in steps: trainer.max_steps, or trainer.max_epochs of the task's epochs."""
    return tcfg.max_steps or tcfg.max_epochs * len(task.train)


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
        with batch_variance_watch(self.model) as batch_variances, precision_context(self.device, tcfg.precision):
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
        with precision_context(self.device, tcfg.precision):
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
        with precision_context(device, tcfg.precision):
            scores = score_modes(task, model, "test", device, modes, seed=cfg.seed, reestimate_batches=tcfg.reestimate_batches,
                                 reestimate_batch_size=tcfg.reestimate_batch_size)
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
