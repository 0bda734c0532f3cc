"""Scoring a split with the normalisation statistics a user asks for.

A BN-LSTM can be evaluated three ways, and early in training they disagree by tens of points:

- ``batch``: each batch normalised with its own statistics, as in a training-mode forward
  (with the training's h0 noise, from a seeded RNG): what the authors' training script
  selected checkpoints on, and most likely what the paper's Fig. 2 shows;
- ``ema``: the population statistics kept as an exponential moving average during
  training (what the model deploys with; they lag the weights by about 1 / momentum steps);
- ``reestimated``: population statistics re-estimated with the weights frozen, as the plain
  average of the batch statistics of training-mode forwards over N training batches (the
  authors' final-number protocol, over the whole training set); the split is then scored
  with them, without noise.

Scoring never changes the training: re-estimation puts the EMA buffers back afterwards, and
the noise that scoring draws comes from a seeded RNG whose states are put back too, so a run
that validates this way reaches the same weights as one that does not.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bnrnn.config import STATISTICS_MODES as MODES
from bnrnn.nn.population import reestimate_population_statistics, time_norms

log = logging.getLogger("bnrnn")

DESCRIPTIONS = {
    "batch": "batch statistics",
    "ema": "EMA population statistics",
    "reestimated": "re-estimated population statistics",
}


def buffers_snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: nn.Module, snapshot: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), snapshot):
            buffer.copy_(saved)


@contextmanager
def population_kept(model: nn.Module) -> Iterator[None]:
    """Within the block the model's buffers (population statistics) may change; on leaving
    they are put back exactly as they were. (The RNG states are kept by :func:`seeded_rng`,
    around the only draws scoring makes.)"""
    buffers = buffers_snapshot(model)
    try:
        yield
    finally:
        restore_buffers(model, buffers)


def reestimate(task, model: nn.Module, device: torch.device, seed: int, max_batches: int | None = None,
               batch_size: int | None = None) -> int:
    """Re-estimate ``model``'s population statistics over the training batches of epoch 0 in
    batches of ``batch_size`` (default: the training batch size), or over their first
    ``max_batches``; returns the number of batches used (0: the model has no batch norm).

    The batches are a pure function of the seed, the same at every call. The layers draw
    their training-time h0 noise (from an RNG seeded with ``seed``; the global RNG states are
    put back afterwards), so that the statistics are those the weights were trained with.
    """
    if not time_norms(model):
        return 0
    batches = itertools.islice(task.training_batches(batch_size).iterate(0, seed), max_batches)
    with seeded_rng(seed, device):
        return reestimate_population_statistics(model, batches,
                                                lambda m, b, stats: task.statistics_pass(m, b, device, stats))


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Within the block the RNG (of the CPU and of ``device``) starts from ``seed``; the
    states are put back on leaving, so scoring draws the same noise at every call and the
    training's random stream does not move."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def score(task, model: nn.Module, split: str, device: torch.device, mode: str, *, seed: int = 0,
          max_batches: int | None = None, reestimate_batches: int | None = None,
          reestimate_batch_size: int | None = None) -> dict[str, Any]:
    """The task's metrics on ``split`` with the statistics of ``mode`` (one of MODES).

    ``max_batches`` limits the split (see the task's ``evaluate``). For ``reestimated``,
    ``reestimate_batches`` training batches of ``reestimate_batch_size`` (None: all of
    epoch 0, at the training batch size). The model is left in evaluation mode with its
    buffers and the RNG states as they were.
    """
    if mode not in MODES:
        raise ValueError(f"unknown statistics mode {mode!r}; choose one of {', '.join(MODES)}")
    model.eval()
    if mode == "reestimated":
        with population_kept(model):
            reestimate(task, model, device, seed, reestimate_batches, reestimate_batch_size)
            return task.evaluate(model, split, device, max_batches)
    if mode == "batch":
        # the statistics of a training-mode forward: with the training's h0 noise, seeded
        with seeded_rng(seed, device):
            return task.evaluate(model, split, device, max_batches, batch_stats=True)
    return task.evaluate(model, split, device, max_batches)


def score_modes(task, model: nn.Module, split: str, device: torch.device, modes: list[str] | tuple[str, ...],
                **options: Any) -> dict[str, dict[str, Any]]:
    """{mode: metrics} for each mode; a model without batch norm is scored once, under the
    key ``"none"`` (its modes are all the same function)."""
    if not time_norms(model):
        return {"none": timed(score, task, model, split, device, "ema", **options)}
    return {mode: timed(score, task, model, split, device, mode, **options) for mode in modes}


def timed(scorer, *args: Any, **options: Any) -> dict[str, Any]:
    """``scorer``'s metrics plus ``seconds``, the wall-clock time it took."""
    start = time.perf_counter()
    metrics = scorer(*args, **options)
    return {**metrics, "seconds": round(time.perf_counter() - start, 3)}


def flatten_modes(scores: dict[str, dict[str, Any]], select_on: str) -> dict[str, Any]:
    """One flat record of :func:`score_modes`' result: the plain metric keys (``loss``,
    ``accuracy`` / ``bpc``, ...) from ``select_on``, ``<metric>_<mode>`` for every mode, and
    ``stats`` naming the mode of the plain keys ("none" for a model without batch norm)."""
    if "none" in scores:  # no batch norm: scored once
        return {**scores["none"], "stats": "none"}
    flat: dict[str, Any] = dict(scores[select_on])
    for mode, metrics in scores.items():
        flat.update({f"{name}_{mode}": value for name, value in metrics.items() if name in SCORED})
    flat["stats"] = select_on
    return flat


# The numbers that differ between modes (the example and character counts do not).
SCORED = ("loss", "accuracy", "bpc", "seconds")
