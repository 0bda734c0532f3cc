"""Task heads around the recurrent layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from bnrnn.nn.norms import Statistics

if TYPE_CHECKING:
    from bnrnn.layer import BNLSTM

State = tuple[torch.Tensor, torch.Tensor]  # (h_n, c_n), each (D * L, B, H)


class SequenceClassifier(nn.Module):
    """Classify a whole sequence from the last hidden state (sequential / permuted MNIST):
    the last layer's, both directions concatenated for a bidirectional stack.

    forward: x (T, B, I) -> logits (B, C); ``stats``: the norms' statistics
    (:class:`~bnrnn.nn.norms.Statistics`; None: the train() / eval() convention).
    """

    def __init__(self, rnn: BNLSTM, num_classes: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.classifier = nn.Linear(rnn.output_size, num_classes)

    def forward(self, x: torch.Tensor, stats: Statistics | None = None) -> torch.Tensor:
        _, state = self.rnn(x, stats=stats)
        return self.classifier(self.rnn.final_hidden(state))


class CharLanguageModel(nn.Module):
    """Next-symbol prediction (Penn Treebank characters).

    forward: tokens (T, B) int64 -> logits (T, B, V) and the final state, so that a long
    sequence can be streamed in chunks (pass the state and the chunk's time offset back in);
    ``stats`` as for :class:`SequenceClassifier`; ``lengths`` (B,): a padded batch of
    sequences of these lengths (statistics over the running ones: :class:`bnrnn.BNLSTM`).
    """

    def __init__(self, rnn: BNLSTM, vocab_size: int, embedding_size: int | None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        # One-hot input is an embedding whose table is the identity; a learned table of the
        # same width is the more common choice and costs the same.
        self.embedding = nn.Embedding(vocab_size, embedding_size or vocab_size)
        self.rnn = rnn
        self.decoder = nn.Linear(rnn.output_size, vocab_size)

    def forward(self, tokens: torch.Tensor, state: State | None = None, t0: int = 0,
                stats: Statistics | None = None, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        output, state = self.rnn(self.embedding(tokens), state, lengths=lengths, stats=stats, t0=t0)
        return self.decoder(output), state
