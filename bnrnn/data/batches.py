"""Minibatches of fixed-length sequences, in an order that is a pure function of (seed, epoch).

Because the order is derived rather than stored, a resumed run finds its place from the step
counter alone: epoch = step // batches_per_epoch, position = step % batches_per_epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded for one epoch of one run."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class SequenceBatches:
    """Whole-sequence examples: inputs (N, T) or (N, T, I) float, labels (N,) (class indices,
    or a target value).

    Yields (x, y): x time-major (T, B, I) (I = 1 for (N, T) inputs), y (B,). Training batches are shuffled per epoch
    and the last incomplete batch is dropped (a tiny batch gives poor batch statistics);
    evaluation batches keep every example, in order.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool) -> None:
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError("inputs and labels differ in length")
        self.inputs = inputs
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle

    def with_batch_size(self, batch_size: int | None) -> SequenceBatches:
        """The same examples, shuffled alike, in batches of ``batch_size`` (at most every
        example; None or the same size: these batches themselves)."""
        if batch_size is None or batch_size == self.batch_size:
            return self
        return SequenceBatches(self.inputs, self.labels, min(batch_size, self.num_examples), self.shuffle)

    @property
    def num_examples(self) -> int:
        return self.inputs.shape[0]

    def __len__(self) -> int:
        if self.shuffle:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def iterate(self, epoch: int = 0, seed: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of one epoch from batch index ``start`` on."""
        if self.shuffle:
            order = torch.randperm(self.num_examples, generator=epoch_generator(seed, epoch))
        else:
            order = torch.arange(self.num_examples)
        for index in range(start, len(self)):
            rows = order[index * self.batch_size : (index + 1) * self.batch_size]
            x = self.inputs[rows]
            x = (x.unsqueeze(-1) if x.dim() == 2 else x).transpose(0, 1).contiguous()
            yield x, self.labels[rows]
