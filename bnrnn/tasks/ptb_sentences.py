"""Penn Treebank sentences: a character language model over one sentence per sequence.

The variable-length task (issue 30): each PTB line is a sequence of its own, read from a
line start, and the model predicts each symbol and then the sentence's end, so it must learn
where sentences end. Batches are padded, with each sequence's length: the recurrent layer's
batch statistics at step t cover only the sentences still running, and the padding enters
no loss, statistic or gradient (:class:`bnrnn.BNLSTM` with ``lengths``).

Scores: bits per character over every prediction of the split, and ``end_bpc``, the bits
spent on the sentence ends alone (how well the model knows that a sentence is over).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnrnn.data.ptb import EOL, PtbCorpus, load_ptb
from bnrnn.data.sentences import SentenceBatches
from bnrnn.data.streams import IGNORE
from bnrnn.nn.norms import Statistics
from bnrnn.schema import TaskConfig, setting
from bnrnn.tasks import register
from bnrnn.tasks.ptb import LN2, CharacterModelling, summed_nats


@dataclass
class PtbSentencesSettings(TaskConfig):
    """PTB's lines as sequences of their own, padded in batches. Training uses the sentences
    of at most max_length predictions (their symbols and the end: 91 % of the training
    split's lines at 200), in a fresh order every epoch, in random or bucketed batches;
    T_max = max_length. Validation and
    test score every sentence, longest first; steps past T_max reuse the last slot's
    population statistics."""

    name: str = "ptb_sentences"
    kind: str = "ptb_sentences"
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = setting(200, rule="positive",
                              fixed="the training sentences the checkpoint's place in the data refers to")
    # training batches of sentences of about one length (less padding; but their batch
    # statistics then tell the BN-LSTM where its sentences end, which population statistics
    # cannot: docs/results/sentences.md)
    bucketed: bool = setting(False, fixed="the training order the checkpoint's place in the data refers to")


@register
class PtbSentencesTask(CharacterModelling):
    kind = "ptb_sentences"
    Settings = PtbSentencesSettings
    presets = {"ptb_sentences": {}}

    @classmethod
    def check(cls, cfg: DictConfig, bad) -> None:
        if cfg.task.max_length < 2:
            bad("task.max_length", "at least 2 (a sentence of one symbol and its end)")

    @staticmethod
    def train_length_of(task_cfg: DictConfig) -> int:
        """T_max of a run with these task settings: the longest training sentence's steps."""
        return task_cfg.max_length

    def __init__(self, cfg: DictConfig) -> None:
        task = cfg.task
        self.name = task.name
        self.corpus: PtbCorpus = load_ptb(cfg.data.root, cfg.data.download)
        self.eol = self.corpus.vocab.index[EOL]
        self.batch_size, self.max_length, self.bucketed = task.batch_size, task.max_length, task.bucketed
        self.train = self.training_batches()
        self.splits = {split: SentenceBatches(getattr(self.corpus, split), self.eol, task.eval_batch_size,
                                              shuffle=False, what=f"the {split} split")
                       for split in ("valid", "test")}
        self.train_length = self.train_length_of(task)

    def training_batches(self, batch_size: int | None = None) -> SentenceBatches:
        return SentenceBatches(self.corpus.train, self.eol, batch_size or self.batch_size, self.max_length,
                               bucketed=self.bucketed)

    def train_loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets, lengths = batch
        logits, _ = model(inputs.to(device), lengths=lengths)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())  # IGNORE: the padding
        return loss, {"bpc": loss.detach() / LN2}

    def statistics_pass(self, model: nn.Module, batch, device: torch.device, stats: Statistics) -> None:
        inputs, _, lengths = batch
        model(inputs.to(device), stats=stats, lengths=lengths)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device, max_batches: int | None = None,
                 batch_stats: bool = False) -> dict[str, float]:
        """Bits per character over every prediction of the split's sentences, and over their
        ends alone (``end_bpc``). ``max_batches``: the first (longest) batches only.
        ``batch_stats``: every norm uses the statistics of the running sentences of the batch."""
        nats, count, end_nats, ends = 0.0, 0, 0.0, 0
        for index, (inputs, targets, lengths) in enumerate(self.splits[split].iterate()):
            if max_batches is not None and index >= max_batches:
                break
            logits, _ = model(inputs.to(device), lengths=lengths, stats=Statistics.BATCH if batch_stats else None)
            targets = targets.to(device)
            nats += summed_nats(logits, targets)
            count += int((targets != IGNORE).sum())
            at_end = torch.where(targets == self.eol, targets, torch.full_like(targets, IGNORE))
            end_nats += summed_nats(logits, at_end)
            ends += int((at_end != IGNORE).sum())
        return {"loss": nats / count, "bpc": nats / count / LN2, "end_bpc": end_nats / ends / LN2,
                "characters": count}
