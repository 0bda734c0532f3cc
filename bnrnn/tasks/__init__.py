"""Tasks: each owns its settings, its data splits, its model head, its training loss and its
evaluation, in one module of this package that registers its class (:func:`register`).

A new task is that module plus one YAML file in ``conf/task/`` (docs/layout.md's recipe):
the config schema, the checks, the trainer, ``bnrnn eval`` and ``bnrnn report`` all ask the
registry, and no list elsewhere names the tasks.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from omegaconf import DictConfig
from torch import nn

from bnrnn.errors import ConfigError
from bnrnn.nn.norms import Statistics


class Task(Protocol):
    """What the trainer, the scorer and the evaluator need of a task."""

    kind: ClassVar[str]  # task.kind, the registry's key
    Settings: ClassVar[type]  # its keys: a dataclass extending bnrnn.schema.TaskConfig
    # task.name -> the keys that make a preset that task, e.g. {"pmnist": {"permute": True}}:
    # an override must not turn a preset into another task while its name says this one
    presets: ClassVar[dict[str, dict]]
    selection: ClassVar[tuple[str, str]]  # (metric, "max" | "min"): how the best checkpoint is chosen
    language_model: ClassVar[bool]  # predicts the next symbol (no reverse direction; bnrnn sample)
    name: str
    train: object  # training batches: len() per epoch, iterate(epoch, seed, start)
    batch_size: int
    train_length: int  # steps of a training sequence (T_max)

    @classmethod
    def check(cls, cfg: DictConfig, bad) -> None:
        """The task's own rules between keys: ``bad(key, rule)`` raises ConfigError."""

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


TASKS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: the task ``task.kind=<cls.kind>`` builds."""
    TASKS[cls.kind] = cls
    return cls


def _discover() -> None:
    """Import every module of this package once, so that each registers its task."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def task_classes() -> list[type]:
    _discover()
    return list(TASKS.values())


def task_kinds() -> tuple[str, ...]:
    """The registered kinds, sorted: the order modules import one another in is no order."""
    return tuple(sorted(cls.kind for cls in task_classes()))


def task_class(kind: str) -> type:
    """The task class for ``task.kind``; ConfigError naming the registered kinds for another."""
    _discover()
    if kind not in TASKS:
        raise ConfigError(f"task.kind={kind} is invalid: it must be one of {', '.join(task_kinds())}")
    return TASKS[kind]


def build_task(cfg: DictConfig) -> Task:
    return task_class(cfg.task.kind)(cfg)
