"""The adding problem (Hochreiter and Schmidhuber, 1997), made offline from a seed.

Each step carries two inputs: a value drawn uniformly from [0, 1) and a marker that is 1 at
exactly two steps, one in each half of the sequence, and 0 elsewhere. The target is the sum
of the two marked values, read from the last state. Predicting the mean sum (1.0) scores a
mean squared error of 1/6 (0.167), the variance of a sum of two uniform values; a model
that has learned the task reaches well under 0.01. A prediction within 0.04 of the target
counts as correct (``accuracy``).

This module and ``conf/task/adding.yaml`` are the whole task: the schema, the trainer, the
report and ``bnrnn eval`` find it through :func:`bnrnn.tasks.register`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnrnn.data.batches import SequenceBatches
from bnrnn.models import build_rnn
from bnrnn.nn import SequenceClassifier
from bnrnn.nn.norms import Statistics
from bnrnn.schema import TaskConfig, setting
from bnrnn.tasks import register

TOLERANCE = 0.04  # |prediction - target| under this counts as correct
SPLIT_OFFSETS = {"train": 0, "valid": 1, "test": 2}  # each split drawn from its own seed


@dataclass
class AddingSettings(TaskConfig):
    name: str = "adding"
    kind: str = "adding"
    batch_size: int = 50
    eval_batch_size: int = 500
    length: int = setting(100, rule="positive", fixed="the sequences the checkpoint was trained on")
    train_size: int = setting(20000, rule="positive", fixed="the training set the checkpoint was trained on")
    eval_size: int = setting(2000, rule="positive")  # examples in each of the validation and test sets
    data_seed: int = setting(0, rule="non_negative", fixed="the training set the checkpoint was trained on")


def make_examples(count: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sequences: inputs (count, length, 2) (value, marker), targets (count,)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(count, length, generator=generator)
    half = max(length // 2, 1)
    first = torch.randint(0, half, (count,), generator=generator)
    second = torch.randint(half, length, (count,), generator=generator) if length > 1 else first
    markers = torch.zeros(count, length)
    rows = torch.arange(count)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = (values * markers).sum(dim=1)
    return torch.stack((values, markers), dim=2), targets


@register
class AddingTask:
    kind = "adding"
    Settings = AddingSettings
    presets = {"adding": {}}
    selection = ("mse", "min")
    language_model = False

    @classmethod
    def check(cls, cfg: DictConfig, bad) -> None:
        if cfg.task.length < 2:
            bad("task.length", "at least 2 (the two marked steps lie in different halves)")
        if cfg.task.train_size < cfg.task.batch_size:
            bad("task.train_size", f"at least task.batch_size ({cfg.task.batch_size}): an epoch needs a step")

    def __init__(self, cfg: DictConfig) -> None:
        task = cfg.task
        self.name = task.name
        self.batch_size = task.batch_size
        self.train_length = task.length

        def split(name: str, count: int, batch_size: int, shuffle: bool) -> SequenceBatches:
            inputs, targets = make_examples(count, task.length, 3 * task.data_seed + SPLIT_OFFSETS[name])
            return SequenceBatches(inputs, targets, batch_size, shuffle)

        self.train = split("train", task.train_size, task.batch_size, True)
        self.splits = {name: split(name, task.eval_size, task.eval_batch_size, False) for name in ("valid", "test")}

    def keep_artifacts(self, out_dir: Path) -> None:
        """Nothing to keep: the data is a function of the run's settings."""

    def training_batches(self, batch_size: int | None = None) -> SequenceBatches:
        return self.train.with_batch_size(batch_size)

    def build_model(self, model_cfg: DictConfig) -> nn.Module:
        return SequenceClassifier(build_rnn(model_cfg, 2, self.train_length), 1)  # one output: the sum

    def train_loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        prediction = model(x).squeeze(1)
        loss = F.mse_loss(prediction, y)
        return loss, {"mse": loss.detach(), "accuracy": ((prediction - y).abs() < TOLERANCE).float().mean()}

    def statistics_pass(self, model: nn.Module, batch, device: torch.device, stats: Statistics) -> None:
        x, _ = batch
        model.rnn(x.to(device), stats=stats)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device, max_batches: int | None = None,
                 batch_stats: bool = False) -> dict[str, float]:
        """Mean squared error and accuracy within :data:`TOLERANCE` over the split (or its first
        ``max_batches`` batches), the model in evaluation mode; ``batch_stats``: every batch
        normalised with its own statistics, in batches of the training batch size."""
        examples = self.splits[split]
        if batch_stats:
            examples = SequenceBatches(examples.inputs, examples.labels, self.batch_size, False)
        limit = None if max_batches is None else max_batches * self.splits[split].batch_size
        squared, correct, count = 0.0, 0, 0
        for x, y in examples.iterate():
            if limit is not None and count >= limit:
                break
            x, y = x.to(device), y.to(device)
            prediction = model(x, stats=Statistics.BATCH if batch_stats else None).squeeze(1)
            squared += F.mse_loss(prediction, y, reduction="sum").item()
            correct += ((prediction - y).abs() < TOLERANCE).sum().item()
            count += y.shape[0]
        return {"loss": squared / count, "mse": squared / count, "accuracy": correct / count, "examples": count}
