"""Sequential and permuted MNIST: classify a 784-step pixel sequence from the last state."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnrnn.data.batches import SequenceBatches
from bnrnn.data.mnist import NUM_CLASSES, SEQ_LEN, load_mnist, make_permutation, to_sequences
from bnrnn.errors import DataError
from bnrnn.models import build_rnn
from bnrnn.nn import SequenceClassifier

PERMUTATION_FILE = "permutation.pt"


def run_permutation(task_cfg: DictConfig, out_dir: Path) -> torch.Tensor:
    """The pixel order of this run: drawn from permutation_seed and saved in the run folder.

    A resumed run reads the saved order back and refuses to go on if the config now draws a
    different one.
    """
    order = make_permutation(task_cfg.permutation_seed, SEQ_LEN, task_cfg.permutation_with_replacement)
    saved = out_dir / PERMUTATION_FILE
    if saved.is_file():
        previous = torch.load(saved, weights_only=True)
        if not torch.equal(previous, order):
            raise DataError(
                f"{saved} holds a different pixel order than task.permutation_seed="
                f"{task_cfg.permutation_seed} draws; use the run's original seed or a new run folder"
            )
    else:
        torch.save(order, saved)
    return order


class MnistTask:
    selection = ("accuracy", "max")

    def __init__(self, cfg: DictConfig, out_dir: Path) -> None:
        task = cfg.task
        self.name = task.name
        arrays = load_mnist(cfg.data.root, cfg.data.download)
        order = run_permutation(task, out_dir) if task.permute else None
        train_all = to_sequences(arrays.train_images, order)
        n_train = train_all.shape[0] - task.valid_size
        if n_train < task.batch_size:
            raise DataError(
                f"task.valid_size={task.valid_size} leaves {max(n_train, 0)} of {train_all.shape[0]} "
                f"training images, fewer than one batch of {task.batch_size}"
            )
        limit = min(task.train_limit or n_train, n_train)
        self.train = SequenceBatches(train_all[:limit], arrays.train_labels[:limit], task.batch_size, shuffle=True)
        self.splits = {
            "valid": SequenceBatches(train_all[n_train:], arrays.train_labels[n_train:], task.eval_batch_size, False),
            "test": SequenceBatches(to_sequences(arrays.test_images, order), arrays.test_labels, task.eval_batch_size, False),
        }
        self.train_length = SEQ_LEN

    def build_model(self, model_cfg: DictConfig) -> nn.Module:
        return SequenceClassifier(build_rnn(model_cfg, 1, self.train_length), NUM_CLASSES)

    def train_loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(1) == y).float().mean()
        return loss, {"accuracy": accuracy}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device, max_batches: int | None = None) -> dict[str, float]:
        """Mean loss and accuracy over the split (or its first ``max_batches`` batches)."""
        loss_sum, correct, count = 0.0, 0, 0
        for index, (x, y) in enumerate(self.splits[split].iterate()):
            if max_batches is not None and index >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.shape[0]
        return {"loss": loss_sum / count, "accuracy": correct / count, "examples": count}
