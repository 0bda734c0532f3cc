"""The training loop: ``train(cfg, out_dir) -> metrics``, called by the CLI, sweeps and tests alike."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
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
from bnrnn.errors import BnrnnError, CheckpointError, ConfigError
from bnrnn.preemption import Preempted, StopRequest
from bnrnn.runlog import RunLogger
from bnrnn.scoring import DESCRIPTIONS, buffers_snapshot, flatten_modes, restore_buffers, score_modes
from bnrnn.tasks import build_task

log = logging.getLogger("bnrnn")

LAST, BEST = "last.pt", "best.pt"
DIAGNOSTICS = "diagnostics"


class DivergedError(BnrnnError):
    """Too many consecutive non-finite steps."""


@dataclass
class Progress:
    """Counters that a checkpoint carries."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    elapsed: float = 0.0


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


def ensure_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"the output folder {out_dir} is not writable ({exc.strerror})") from exc


def gamma_summary(model: nn.Module) -> dict[str, float]:
    """Mean gamma of each normalisation (x, h, c): watching these shows saturation coming."""
    rnn = getattr(model, "rnn", None)
    out = {}
    for term in ("x", "h", "c"):
        bn = getattr(rnn, f"bn_{term}", None)
        if bn is not None:
            out[f"gamma_{term}_mean"] = bn.weight.detach().abs().mean().item()
    return out


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
    log.warning("step %d: non-finite loss %s / gradient norm %s (in %s); update skipped; likely cause: %s; see %s",
                step, report["loss"], report["grad_norm"], ", ".join(report["nonfinite_grads"][:5]) or "-",
                report["likely_cause"], path)
    return report


# The settings a sweep varies, shown in TensorBoard's HParams tab against the final metrics.
HPARAM_KEYS = ("task.name", "model.name", "model.hidden_size", "model.gamma_init", "model.momentum", "model.h0_noise",
               "model.bn.x", "model.bn.h", "model.bn.c", "trainer.optimizer", "trainer.lr", "trainer.clip_norm",
               "task.batch_size", "seed")


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    values = {key: OmegaConf.select(cfg, key) for key in HPARAM_KEYS}
    return {key: ("none" if value is None else value) for key, value in values.items()}


def requeued() -> bool:
    """True in a SLURM job that the scheduler restarted (preempted and requeued, e.g. by the
    submitit launcher): the same command then continues its run instead of refusing it."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def progress_enabled(setting: str) -> bool:
    if setting == "auto":
        return sys.stderr.isatty()
    return setting == "on"


def train(cfg: DictConfig | dict, out_dir: str | Path) -> dict[str, Any]:
    """Train one model on one task; write everything into ``out_dir``; return final metrics.

    The metrics dict holds the step count, the best validation metric and its step, and the
    test metrics of the best checkpoint (``test_<metric>``) when ``trainer.test_at_end``.
    """
    cfg = load_config(cfg)
    out_dir = Path(out_dir)
    ensure_writable(out_dir)
    tcfg = cfg.trainer
    device = resolve_device(cfg.device.name)
    ckpt_dir = out_dir / "checkpoints"
    resume = tcfg.resume or (requeued() and (ckpt_dir / LAST).exists())
    if resume and not tcfg.resume:
        log.info("requeued by the scheduler (SLURM_RESTART_COUNT=%s): resuming from %s",
                 os.environ.get("SLURM_RESTART_COUNT"), ckpt_dir / LAST)
    if not resume and (ckpt_dir / LAST).exists():
        raise ConfigError(
            f"{out_dir} already holds a run; pass trainer.resume=true to continue it, or choose "
            f"another hydra.run.dir"
        )
    if resume and not (ckpt_dir / LAST).exists():
        raise CheckpointError(f"trainer.resume=true but {ckpt_dir / LAST} does not exist; nothing to resume")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    task = build_task(cfg, out_dir)
    model = task.build_model(cfg.model).to(device)
    optimizer = build_optimizer(tcfg, model.parameters())
    metric, mode = task.selection
    steps_per_epoch = len(task.train)
    max_steps = tcfg.max_steps or tcfg.max_epochs * steps_per_epoch
    state = Progress()

    if resume:
        state = restore(ckpt_dir / LAST, model, optimizer, device, cfg)
        log.info("resumed %s at step %d", out_dir, state.step)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    logger = RunLogger(out_dir, purge_step=state.step + 1 if resume else None, elapsed_offset=state.elapsed)
    logger.overlay_statistics_modes(metric)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s / %s: %d parameters, %d steps (%d per epoch) on %s -> %s",
             task.name, cfg.model.name, n_params, max_steps, steps_per_epoch, device, out_dir)

    def checkpoint(name: str) -> None:
        state.elapsed = logger.elapsed
        save_checkpoint(ckpt_dir / name, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "progress": vars(state).copy(),
            "rng": rng_state(),
            "config": OmegaConf.to_container(cfg),
        })

    def validate() -> dict[str, float]:
        """Score the validation split in each of ``trainer.valid_stats``; the best checkpoint
        follows the ``trainer.select_on`` number."""
        scores = score_modes(task, model, "valid", device, tcfg.valid_stats, seed=cfg.seed,
                             max_batches=tcfg.eval_batches, reestimate_batches=tcfg.valid_reestimate_batches)
        model.train()
        metrics = flatten_modes(scores, tcfg.select_on)
        if is_better(metrics[metric], state.best_metric, mode):
            state.best_metric, state.best_step = metrics[metric], state.step
            checkpoint(BEST)
        metrics["best_" + metric] = state.best_metric
        logger.log("valid", state.step, metrics)
        checkpoint(LAST)
        logger.flush()
        log.info("step %d: valid %s %.4f (loss %.4f%s), best %.4f at step %d", state.step, metric, metrics[metric],
                 metrics["loss"], modes_note(scores, metrics["stats"], metric), state.best_metric, state.best_step)
        return metrics

    params = list(model.parameters())
    clip = tcfg.clip_norm if tcfg.clip_norm is not None else math.inf
    bad_steps = 0
    window: dict[str, float] = {}
    window_steps = 0
    bar = tqdm(total=max_steps, initial=state.step, disable=not progress_enabled(tcfg.progress),
               dynamic_ncols=True, desc=f"{task.name}/{cfg.model.name}")
    model.train()
    stop = StopRequest()

    def stop_if_requested() -> None:
        """Between steps: on SIGTERM/SIGINT, checkpoint the completed steps and stop."""
        if stop.requested:
            checkpoint(LAST)
            logger.flush()
            raise Preempted(
                f"stopped by {stop.name} after step {state.step}; checkpoint written to {ckpt_dir / LAST}; "
                f"continue with the same command plus hydra.run.dir={out_dir} trainer.resume=true",
                stop.signum,
            )

    try:
        with stop:
            while state.step < max_steps:
                epoch, start = divmod(state.step, steps_per_epoch)
                for batch in task.train.iterate(epoch, cfg.seed, start):
                    stop_if_requested()
                    snapshot = buffers_snapshot(model)
                    loss, batch_metrics = task.train_loss(model, batch, device)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    # The norm first, clipping only when it is finite: clipping an inf norm would
                    # turn every gradient into NaN and hide which parameters overflowed.
                    grad_norm = total_gradient_norm([p.grad for p in params if p.grad is not None])
                    if torch.isfinite(grad_norm):
                        torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm)
                    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                        bad_steps += 1
                        report = report_skipped_step(model, loss, grad_norm, batch, state.step + 1, bad_steps, out_dir, logger)
                        restore_buffers(model, snapshot)  # the population must not see this step either
                        if bad_steps >= tcfg.max_bad_steps:
                            raise DivergedError(
                                f"training diverged: {bad_steps} consecutive steps with a non-finite loss or "
                                f"gradient (last at step {state.step + 1}); likely cause: "
                                f"{report['likely_cause']}; diagnostics in {out_dir / DIAGNOSTICS}; "
                                f"the last good checkpoint is {ckpt_dir / LAST}"
                            )
                        continue
                    bad_steps = 0
                    optimizer.step()
                    state.step += 1
                    bar.update(1)

                    values = {"loss": loss.item(), "grad_norm": grad_norm.item()}
                    values.update({k: float(v) for k, v in batch_metrics.items()})
                    for k, v in values.items():
                        window[k] = window.get(k, 0.0) + v
                    window_steps += 1
                    if state.step % tcfg.log_every == 0 or state.step == max_steps:
                        averaged = {k: v / window_steps for k, v in window.items()}
                        averaged["lr"] = optimizer.param_groups[0]["lr"]
                        averaged["epoch"] = state.step / steps_per_epoch
                        averaged.update(gamma_summary(model))
                        logger.log("train", state.step, averaged)
                        bar.set_postfix(loss=f"{averaged['loss']:.3f}")
                        window, window_steps = {}, 0
                    if state.step % tcfg.eval_every == 0 or state.step == max_steps:
                        validate()
                    elif tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0:
                        checkpoint(LAST)
                    if state.step >= max_steps:
                        break
                stop_if_requested()
            results = finish(cfg, task, model, device, ckpt_dir, state, logger)
    finally:
        bar.close()
        logger.close()
    return results


# Settings a run cannot change on resume: the checkpoint would not mean the same thing.
# (Others, e.g. trainer.max_steps or trainer.lr, may change: extending a run is common.)
FIXED_ON_RESUME = ("task.name", "model.name", "model.hidden_size", "model.bn.x", "model.bn.h", "model.bn.c",
                   "trainer.optimizer")


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
            cfg: DictConfig) -> Progress:
    payload = load_checkpoint(path, map_location=device)
    saved = OmegaConf.create(payload.get("config", {}))
    changed = [
        f"{key} {OmegaConf.select(saved, key)} -> {OmegaConf.select(cfg, key)}" for key in FIXED_ON_RESUME
        if OmegaConf.select(saved, key) != OmegaConf.select(cfg, key)
    ]
    if changed:
        raise CheckpointError(f"{path} was written for a different run ({'; '.join(changed)}); "
                              f"resume with the original settings or start a new run folder")
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path} was written for a different model or optimiser ({first})") from exc
    set_rng_state(payload["rng"])
    return Progress(**payload["progress"])


def modes_note(scores: dict[str, dict[str, Any]], chosen: str, metric: str) -> str:
    """'; batch statistics; EMA population statistics 0.3010, ...': which statistics the
    logged number is, then the other modes' numbers, for a log line."""
    if chosen == "none":
        return ""
    others = ", ".join(f"{DESCRIPTIONS[m]} {v[metric]:.4f}" for m, v in scores.items() if m != chosen)
    return f"; {DESCRIPTIONS[chosen]}" + (f"; {others}" if others else "")


def finish(cfg, task, model, device, ckpt_dir: Path, state: Progress, logger: RunLogger) -> dict[str, Any]:
    """Test the best checkpoint (by validation) and write results.json."""
    metric, _ = task.selection
    results: dict[str, Any] = {
        "task": cfg.task.name, "model": cfg.model.name, "steps": state.step,
        "best_step": state.best_step, f"valid_{metric}": state.best_metric, "select_on": cfg.trainer.select_on,
        "elapsed": round(logger.elapsed, 1),
    }
    tcfg = cfg.trainer
    if tcfg.test_at_end and (ckpt_dir / BEST).exists():
        model.load_state_dict(load_checkpoint(ckpt_dir / BEST, map_location=device)["model"])
        # The authors' protocol (trainer.reestimate_stats): the headline test number with the
        # population statistics re-estimated over the training set; EMA and batch-statistics
        # numbers are kept beside it.
        final = "reestimated" if tcfg.reestimate_stats else "ema"
        modes = ["ema", "batch"] + (["reestimated"] if tcfg.reestimate_stats else [])
        scores = score_modes(task, model, "test", device, modes, seed=cfg.seed,
                             reestimate_batches=tcfg.reestimate_batches, reestimate_batch_size=tcfg.reestimate_batch_size)
        test = flatten_modes(scores, final)
        logger.log("test", state.best_step, test)
        results.update({f"test_{k}": v for k, v in test.items()})
        log.info("test (best checkpoint, step %s): %s %.4f%s", state.best_step, metric, test[metric],
                 modes_note(scores, test["stats"], metric))
    logger.hparams(hparams_of(cfg), {k: v for k, v in results.items() if k.startswith(("valid_", "test_"))})
    out_dir = ckpt_dir.parent
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out_dir / "results.json")
    return results
