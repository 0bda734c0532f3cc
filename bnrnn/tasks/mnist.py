"""Sequential and permuted MNIST: classify a 784-step pixel sequence from the last state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnrnn.data.batches import SequenceBatches
from bnrnn.data.mnist import NUM_CLASSES, SEQ_LEN, load_mnist, make_permutation, to_sequences
from bnrnn.errors import DataError, first_line
from bnrnn.models import build_rnn
from bnrnn.nn import SequenceClassifier
from bnrnn.nn.norms import Statistics
from bnrnn.schema import TaskConfig, setting
from bnrnn.tasks import register

PERMUTATION_FILE = "permutation.pt"
STATISTICS_CHUNK = 112  # steps per piece when re-estimating (784 = 7 x 112)


PIXEL_ORDER = "the pixel order the checkpoint was trained on"


@dataclass
class MnistSettings(TaskConfig):
    """Sequential MNIST: 784 steps, one pixel per step in [0, 1]; 50k train / 10k valid / 10k test."""

    # pMNIST: one fixed pixel permutation drawn from permutation_seed (saved with the run);
    # permutation_with_replacement=true reproduces the authors' randint(0, 784, 784) draw
    permute: bool = setting(False, fixed=PIXEL_ORDER)
    permutation_seed: int = setting(0, rule="non_negative", fixed=PIXEL_ORDER)
    permutation_with_replacement: bool = setting(False, fixed=PIXEL_ORDER)
    # validation images, taken from the end of the 60k training file
    valid_size: int = setting(10000, rule="positive",
                              fixed="the training / validation split the checkpoint was trained and selected on")
    # use only the first N training examples (quick runs)
    train_limit: Optional[int] = setting(None, rule="positive_or_null",
                                         fixed="the training set the checkpoint's place in the data refers to")


@register
class MnistTask:
    kind = "mnist"
    Settings = MnistSettings
    presets = {"seqmnist": {"permute": False}, "pmnist": {"permute": True}}
    selection = ("accuracy", "max")
    language_model = False

    @classmethod
    def check(cls, cfg: DictConfig, bad) -> None:
        pass

    def __init__(self, cfg: DictConfig) -> None:
        task = cfg.task
        self.name = task.name
        self.permutation_seed = task.permutation_seed
        arrays = load_mnist(cfg.data.root, cfg.data.download)
        order = make_permutation(task.permutation_seed, SEQ_LEN, task.permutation_with_replacement) if task.permute else None
        self.order = order  # (784,) int64 for pMNIST, None for seqMNIST
        train_all = to_sequences(arrays.train_images, order)
        n_train = train_all.shape[0] - task.valid_size
        if n_train < task.batch_size:
            raise DataError(
                f"task.valid_size={task.valid_size} leaves {max(n_train, 0)} of {train_all.shape[0]} "
                f"training images, fewer than one batch of {task.batch_size}"
            )
        limit = min(task.train_limit or n_train, n_train)
        if limit < task.batch_size:
            raise DataError(
                f"task.train_limit={task.train_limit} leaves {limit} training images, fewer than one batch of "
                f"task.batch_size={task.batch_size}: an epoch would have no step"
            )
        self.train = SequenceBatches(train_all[:limit], arrays.train_labels[:limit], task.batch_size, shuffle=True)
        self.splits = {
            "valid": SequenceBatches(train_all[n_train:], arrays.train_labels[n_train:], task.eval_batch_size, False),
            "test": SequenceBatches(to_sequences(arrays.test_images, order), arrays.test_labels, task.eval_batch_size, False),
        }
        self.train_length = SEQ_LEN
        self.batch_size = task.batch_size

    def keep_artifacts(self, out_dir: Path) -> None:
        """pMNIST: save the pixel order with the run (permutation.pt), or, when the run holds
        one, refuse to go on with another (DataError)."""
        if self.order is None:
            return
        saved = out_dir / PERMUTATION_FILE
        if saved.is_file():
            try:
                kept = torch.load(saved, weights_only=True)
            except Exception as exc:  # torch's unpickler and zip reader raise several kinds
                raise DataError(f"{saved} is not a readable pixel order ({first_line(exc).split('. ')[0]}); delete "
                                f"it, and the order is drawn again from task.permutation_seed="
                                f"{self.permutation_seed}") from None
            if not isinstance(kept, torch.Tensor) or not torch.equal(kept, self.order):
                raise DataError(
                    f"{saved} holds a different pixel order than task.permutation_seed={self.permutation_seed} "
                    f"draws; use the run's original seed or a new run folder"
                )
        else:
            torch.save(self.order, saved)

    def training_batches(self, batch_size: int | None = None) -> SequenceBatches:
        """The training split in shuffled batches of ``batch_size`` (default: the training
        batch size), e.g. the authors' batches of 5000 to re-estimate population statistics."""
        return self.train.with_batch_size(batch_size)

    def build_model(self, model_cfg: DictConfig) -> nn.Module:
        return SequenceClassifier(build_rnn(model_cfg, 1, self.train_length), NUM_CLASSES)

    def train_loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(1) == y).float().mean()
        return loss, {"accuracy": accuracy}

    def statistics_pass(self, model: nn.Module, batch, device: torch.device, stats: Statistics) -> None:
        """The forward that gathers batch statistics (re-estimation): the recurrent layer
        alone, in pieces of STATISTICS_CHUNK steps (the same statistics as one pass, in a
        fraction of the memory at the authors' batches of 5000)."""
        x, _ = batch
        model.rnn.forward_in_chunks(x.to(device), STATISTICS_CHUNK, stats=stats)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device, max_batches: int | None = None,
                 batch_stats: bool = False) -> dict[str, float]:
        """Mean loss and accuracy over the split (or its first ``max_batches`` batches of
        ``task.eval_batch_size``), with the model in evaluation mode.

        ``batch_stats``: every norm uses the statistics of the batch at hand instead of the
        population's. Such a score depends on how the batches are formed, so they are fixed:
        consecutive examples of the split in file order, in batches of the *training* batch
        size (each step's statistics then come from as many examples as in training), the
        last one possibly smaller; ``max_batches`` still covers the same examples.
        """
        examples = self.splits[split]
        limit = None if max_batches is None else max_batches * examples.batch_size
        if batch_stats:
            examples = SequenceBatches(examples.inputs, examples.labels, self.batch_size, False)
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in examples.iterate():
            if limit is not None:
                if count >= limit:
                    break
                x, y = x[:, : limit - count], y[: limit - count]
            x, y = x.to(device), y.to(device)
            logits = model(x, stats=Statistics.BATCH if batch_stats else None)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.shape[0]
        return {"loss": loss_sum / count, "accuracy": correct / count, "examples": count}
