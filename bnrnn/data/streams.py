"""Batches cut from one long stream of symbol ids (character-level language modelling).

Every batch is (inputs, targets), both time-major (T, B) int64, targets = inputs shifted by
one position. Three cuts:

- :class:`WindowBatches` (training, the paper's setup): non-overlapping windows of
  ``window`` symbols (``window - 1`` predictions each), starting at an offset drawn afresh
  every epoch, shuffled into batches. Like :class:`~bnrnn.data.batches.SequenceBatches`
  the order is a pure function of (seed, epoch), so a resumed run finds its place from the
  step counter.
- :class:`StreamBatches` (validation, test): the split as ``streams`` contiguous pieces
  read side by side in chunks, the state carried from chunk to chunk; every prediction of
  the split is made exactly once (padding targets are ``IGNORE``).
- :class:`LengthBatches` (the length-generalisation experiment): non-overlapping sequences
  of a given length, each from the initial state, in full batches only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bnrnn.data.batches import epoch_generator
from bnrnn.errors import DataError

IGNORE = -100  # F.cross_entropy's default ignore_index

Batch = tuple[torch.Tensor, torch.Tensor]


class WindowBatches:
    """Training windows of ``window`` symbols from ``stream`` (N,), ``batch_size`` per batch.

    An epoch draws an offset o in [0, window) and cuts windows at o, o + window, ...; the
    number of windows, ``(N - window + 1) // window``, is the same for every offset, so no
    window crosses the end of the stream and every epoch has ``len(self)`` batches.
    """

    def __init__(self, stream: torch.Tensor, window: int, batch_size: int, what: str = "the training split") -> None:
        if window < 2:
            raise DataError(f"task.seq_len={window} is too short: a window needs at least 2 symbols")
        if window > stream.numel():
            raise DataError(f"task.seq_len={window} is longer than {what} ({stream.numel()} symbols)")
        self.stream = stream
        self.window = window
        self.batch_size = batch_size
        self.num_windows = (stream.numel() - window + 1) // window
        if self.num_windows < batch_size:
            raise DataError(
                f"{what} ({stream.numel()} symbols) holds only {self.num_windows} windows of task.seq_len="
                f"{window}, fewer than one batch of task.batch_size={batch_size}"
            )

    def __len__(self) -> int:
        return self.num_windows // self.batch_size

    def epoch_plan(self, epoch: int, seed: int) -> tuple[int, torch.Tensor]:
        """The epoch's offset and window order (num_windows,), both from (seed, epoch)."""
        generator = epoch_generator(seed, epoch)
        offset = int(torch.randint(0, self.window, (1,), generator=generator))
        return offset, torch.randperm(self.num_windows, generator=generator)

    def iterate(self, epoch: int = 0, seed: int = 0, start: int = 0) -> Iterator[Batch]:
        """Batches of one epoch from batch index ``start`` on: inputs, targets (window-1, B)."""
        offset, order = self.epoch_plan(epoch, seed)
        windows = self.stream[offset : offset + self.num_windows * self.window].view(self.num_windows, self.window)
        for index in range(start, len(self)):
            rows = windows[order[index * self.batch_size : (index + 1) * self.batch_size]].t()
            yield rows[:-1].contiguous(), rows[1:].contiguous()


class StreamBatches:
    """A whole split read as ``streams`` parallel pieces, ``chunk`` steps at a time.

    The N - 1 predictions of the stream are divided into ``streams`` contiguous pieces of
    ceil((N - 1) / streams) steps (the last piece padded with IGNORE targets). Iterating
    yields (inputs, targets, t0) with inputs/targets (chunk, streams) and t0 the time
    index of the chunk's first step within each piece. With ``streams=1`` the split is one
    long sequence, as the paper evaluated its test set.
    """

    def __init__(self, stream: torch.Tensor, streams: int, chunk: int) -> None:
        predictions = stream.numel() - 1
        if predictions < 1:
            raise DataError("a split needs at least 2 symbols to predict one")
        self.streams = min(streams, predictions)
        self.chunk = chunk
        self.length = -(-predictions // self.streams)
        inputs = torch.zeros(self.streams * self.length, dtype=torch.long)
        targets = torch.full((self.streams * self.length,), IGNORE, dtype=torch.long)
        inputs[:predictions] = stream[:-1]
        targets[:predictions] = stream[1:]
        # (streams, length) -> time-major (length, streams)
        self.inputs = inputs.view(self.streams, self.length).t().contiguous()
        self.targets = targets.view(self.streams, self.length).t().contiguous()
        self.predictions = predictions

    def __len__(self) -> int:
        return -(-self.length // self.chunk)

    def iterate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for t0 in range(0, self.length, self.chunk):
            yield self.inputs[t0 : t0 + self.chunk], self.targets[t0 : t0 + self.chunk], t0


class LengthBatches:
    """Non-overlapping sequences of ``length`` predictions, ``batch_size`` per batch.

    Sequence k reads symbols k*length .. (k+1)*length (inputs the first ``length``, targets
    the last ``length``). Only full batches are kept, so that batch statistics are always
    taken over ``batch_size`` sequences and both statistics modes see the same predictions.
    """

    def __init__(self, stream: torch.Tensor, length: int, batch_size: int) -> None:
        count = (stream.numel() - 1) // length
        self.num_batches = count // batch_size
        if self.num_batches == 0:
            raise DataError(
                f"the split ({stream.numel()} symbols) holds {count} sequences of length {length}, "
                f"fewer than one batch of {batch_size}"
            )
        used = self.num_batches * batch_size
        self.inputs = stream[: used * length].view(used, length)
        self.targets = stream[1 : used * length + 1].view(used, length)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.num_batches

    def iterate(self) -> Iterator[Batch]:
        for index in range(self.num_batches):
            rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
            yield self.inputs[rows].t().contiguous(), self.targets[rows].t().contiguous()
