"""Tasks: each owns its data splits, its model head, its training loss and its evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig
from torch import nn

from bnrnn.errors import ConfigError
from bnrnn.nn.norms import Statistics


class Task(Protocol):
    """What the trainer, the scorer and the evaluator need of a task."""

    name: str
    selection: tuple[str, str]  # (metric, "max" | "min"): how the best checkpoint is chosen
    train: object  # training batches: len() per epoch, iterate(epoch, seed, start)
    batch_size: int
    train_length: int  # steps of a training sequence (T_max)

    def build_model(self, model_cfg: DictConfig) -> nn.Module: ...

    def train_loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]: ...

    def training_batches(self, batch_size: int | None = None): ...

    def statistics_pass(self, model: nn.Module, batch, device: torch.device, stats: Statistics) -> None:
        """The forward over ``batch`` that gathers batch statistics with ``stats`` (re-estimation)."""

    def evaluate(self, model: nn.Module, split: str, device: torch.device, max_batches: int | None = None,
                 batch_stats: bool = False) -> dict[str, float]: ...

    def keep_artifacts(self, out_dir: Path) -> None:
        """Write what the run needs to be read again (pMNIST's pixel order, PTB's vocabulary),
        or check that the run's copies agree (DataError)."""


def task_class(kind: str) -> type:
    """The task class for ``task.kind`` (mnist | ptb); ConfigError for another."""
    if kind == "mnist":
        from bnrnn.tasks.mnist import MnistTask

        return MnistTask
    if kind == "ptb":
        from bnrnn.tasks.ptb import PtbTask

        return PtbTask
    raise ConfigError(f"task.kind={kind} is invalid: it must be one of mnist, ptb")


def build_task(cfg: DictConfig) -> Task:
    return task_class(cfg.task.kind)(cfg)
