"""Tasks: each owns its data splits, its model head, its training loss and its evaluation.

A task object offers:
    name, selection = (metric, "max"|"min")  -- how the best checkpoint is chosen
    train: batches with len() and iterate(epoch, seed, start)
    build_model(model_cfg) -> nn.Module
    train_loss(model, batch, device) -> (loss tensor, {metric: float})
    training_batches(batch_size=None): the training split at another batch size
    statistics_pass(model, batch, device) -- the forward that re-estimating population statistics runs
    evaluate(model, split, device, max_batches, batch_stats=False) -> {metric: float}
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def task_class(kind: str) -> type:
    """The task class for ``task.kind`` (mnist | ptb); its ``selection`` names the metric."""
    if kind == "mnist":
        from bnrnn.tasks.mnist import MnistTask

        return MnistTask
    from bnrnn.tasks.ptb import PtbTask

    return PtbTask


def build_task(cfg: DictConfig, out_dir: Path):
    return task_class(cfg.task.kind)(cfg, out_dir)
