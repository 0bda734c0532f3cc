"""A split's sentences, one per sequence, in padded batches with their lengths.

A PTB line is a sentence. Each becomes the sequence ``EOL s_1 ... s_n EOL``: the inputs are
all but its last symbol, the targets all but its first, so a model reads from a line start
and predicts every symbol of the sentence and then its end (n + 1 predictions). Every
batch is (inputs, targets, lengths): inputs and targets (T, B) int64, time-major, T the
batch's longest sequence, the padding of targets ``IGNORE``; lengths (B,) int64.

Training (``shuffle``): the sentences of at most ``max_length`` predictions, in an order
that is a pure function of (seed, epoch), full batches only, so that a resumed run finds its
place from the step counter. A batch holds sentences drawn at random, or, ``bucketed``, of
about one length: each epoch's permutation is cut into pools of ``POOL`` batches, each pool
sorted by length and cut into batches, and the batches shuffled. Bucketing spares the
padding, and nearly every step's statistics then cover the whole batch, but a bucketed
batch's statistics tell how far its sentences are from their end, a cue that population
statistics do not carry: a BN-LSTM learns to read it and loses at inference
(docs/results/sentences.md). Random batches carry no such cue; their last steps run with a
few sentences, whose batch statistics the layer's ``stats_min_sequences`` replaces.
Evaluation: every sentence, longest first (the batches' padding is then small), the last
batch partial.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bnrnn.data.batches import epoch_generator
from bnrnn.data.streams import IGNORE
from bnrnn.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
POOL = 50  # batches per bucketing pool: sorted by length within it


def sentences_of(stream: torch.Tensor, eol: int) -> list[torch.Tensor]:
    """The sentences of ``stream`` (N,): the non-empty runs of ids between line ends."""
    ends = (stream == eol).nonzero().flatten().tolist()
    starts = [0] + [end + 1 for end in ends]
    return [stream[a:b] for a, b in zip(starts, ends + [stream.numel()]) if b > a]


class SentenceBatches:
    """The sentences of ``stream`` (N,) whose line ends are ``eol``, ``batch_size`` per batch.

    Args:
        max_length: keep only the sentences of at most this many predictions (their symbols
            plus the end); None keeps every one.
        shuffle: the training order (a fresh permutation each epoch, full batches only);
            False: longest first, every sentence, the last batch partial.
        bucketed: with ``shuffle``, batches of sentences of about one length.
    """

    def __init__(self, stream: torch.Tensor, eol: int, batch_size: int, max_length: int | None = None,
                 shuffle: bool = True, bucketed: bool = False, what: str = "the training split") -> None:
        every = sentences_of(stream, eol)
        kept = [s for s in every if max_length is None or s.numel() + 1 <= max_length]
        if len(kept) < (batch_size if shuffle else 1):
            raise DataError(f"{what} holds {len(kept)} sentences of at most {max_length} symbols with their end, "
                            f"fewer than one batch of {batch_size}")
        self.eol, self.batch_size, self.shuffle, self.bucketed = eol, batch_size, shuffle, bucketed
        self.sentences = kept
        self.skipped = len(every) - len(kept)
        self.lengths = torch.tensor([s.numel() + 1 for s in kept])  # predictions per sentence

    def __len__(self) -> int:
        full, rest = divmod(len(self.sentences), self.batch_size)
        return full if self.shuffle or not rest else full + 1

    def batch_rows(self, epoch: int, seed: int) -> list[torch.Tensor]:
        """Each batch's sentence indices, in the epoch's order (see the module's docstring)."""
        if not self.shuffle:
            order = torch.argsort(self.lengths, descending=True, stable=True)
            return list(order.split(self.batch_size))
        generator = epoch_generator(seed, epoch)
        order = torch.randperm(len(self.sentences), generator=generator)[:len(self) * self.batch_size]
        if not self.bucketed:
            return list(order.split(self.batch_size))
        batches = []
        for pool in order.split(POOL * self.batch_size):
            by_length = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches.extend(by_length.split(self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def iterate(self, epoch: int = 0, seed: int = 0, start: int = 0) -> Iterator[Batch]:
        """Batches from batch index ``start`` on: inputs, targets (T, B) and lengths (B,)."""
        for rows in self.batch_rows(epoch, seed)[start:]:
            yield self.batch(rows.tolist())

    def batch(self, rows: list[int]) -> Batch:
        lengths = self.lengths[rows]
        steps = int(lengths.max())
        inputs = torch.full((steps, len(rows)), self.eol, dtype=torch.long)
        targets = torch.full((steps, len(rows)), IGNORE, dtype=torch.long)
        for column, row in enumerate(rows):
            sentence = self.sentences[row]
            n = sentence.numel()
            inputs[1:n + 1, column] = sentence  # inputs[0] is the line start (EOL)
            targets[:n, column] = sentence
            targets[n, column] = self.eol  # the sentence's end, to be predicted
        return inputs, targets, lengths
