"""Penn Treebank characters: next-symbol prediction scored in bits per character."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnrnn.data.ptb import PtbCorpus, Vocabulary, load_ptb
from bnrnn.data.streams import IGNORE, LengthBatches, StreamBatches, WindowBatches
from bnrnn.errors import DataError
from bnrnn.models import build_rnn
from bnrnn.nn import CharLanguageModel
from bnrnn.nn.norms import Statistics
from bnrnn.schema import TaskConfig, setting
from bnrnn.tasks import register

VOCAB_FILE = "vocab.json"
LN2 = math.log(2.0)


def summed_nats(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Total cross-entropy in nats of logits (T, B, V) against targets (T, B), IGNORE skipped.

    Summed in float64: a float32 sum over a split's ~400k predictions drifts by about 1e-6 bpc.
    """
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.double().sum().item()


def language_model(model_cfg: DictConfig, vocab_size: int, train_length: int) -> CharLanguageModel:
    """The character language model: input width the embedding's (one-hot: the vocabulary's),
    T_max the training windows' input steps."""
    width = model_cfg.embedding_size or vocab_size
    return CharLanguageModel(build_rnn(model_cfg, width, train_length), vocab_size, model_cfg.embedding_size)


def keep_vocabulary(vocab: Vocabulary, out_dir: Path) -> None:
    """Save the vocabulary with the run (vocab.json); a resumed run must see the same one."""
    saved = out_dir / VOCAB_FILE
    if saved.is_file():
        if Vocabulary.load(saved) != vocab:
            raise DataError(f"{saved} differs from the vocabulary of the training split now in data.root")
    else:
        vocab.save(saved)


class CharacterModelling:
    """What the tasks on PTB's characters share (windows: :class:`PtbTask`; sentences:
    :class:`bnrnn.tasks.ptb_sentences.PtbSentencesTask`): bpc as the selection metric, the
    character language model over ``self.corpus``'s vocabulary, and the vocabulary kept
    with the run."""

    selection = ("bpc", "min")
    language_model = True
    corpus: PtbCorpus
    train_length: int

    def keep_artifacts(self, out_dir: Path) -> None:
        keep_vocabulary(self.corpus.vocab, out_dir)

    @property
    def vocab_size(self) -> int:
        return len(self.corpus.vocab)

    def build_model(self, model_cfg: DictConfig) -> nn.Module:
        return language_model(model_cfg, self.vocab_size, self.train_length)


@dataclass
class PtbSettings(TaskConfig):
    """Penn Treebank characters (Mikolov's split, 50 symbols with the line end), in bits per
    character. Training: windows of seq_len symbols (seq_len - 1 predictions) cut at a fresh
    random offset every epoch; T_max = seq_len - 1. Validation and test stream through the
    whole split as eval_batch_size parallel pieces, eval_chunk steps at a time, the state
    carried over (eval_batch_size=1: the split as one long sequence, as the paper's test)."""

    name: str = "ptb"
    kind: str = "ptb"
    batch_size: int = 64
    eval_batch_size: int = 64
    seq_len: int = setting(100, rule="positive",
                           fixed="the training windows the checkpoint's place in the data refers to")
    eval_chunk: int = setting(100, rule="positive")


@register
class PtbTask(CharacterModelling):
    kind = "ptb"
    Settings = PtbSettings
    presets = {"ptb": {}}

    @classmethod
    def check(cls, cfg: DictConfig, bad) -> None:
        if cfg.task.seq_len < 2:
            bad("task.seq_len", "at least 2 for PTB (a window of L characters gives L - 1 predictions)")

    def __init__(self, cfg: DictConfig) -> None:
        task = cfg.task
        self.name = task.name
        self.corpus: PtbCorpus = load_ptb(cfg.data.root, cfg.data.download)
        self.train = WindowBatches(self.corpus.train, task.seq_len, task.batch_size)
        self.splits = {
            split: StreamBatches(getattr(self.corpus, split), task.eval_batch_size, task.eval_chunk)
            for split in ("valid", "test")
        }
        self.batch_size = task.batch_size
        self.seq_len = task.seq_len
        self.train_length = self.train_length_of(task)

    @staticmethod
    def train_length_of(task_cfg: DictConfig) -> int:
        """T_max of a run with these task settings: the training windows' input steps."""
        return task_cfg.seq_len - 1

    def training_batches(self, batch_size: int | None = None) -> WindowBatches:
        """The training windows in batches of ``batch_size`` (default: the training batch size)."""
        if batch_size is None or batch_size == self.batch_size:
            return self.train
        return WindowBatches(self.corpus.train, self.seq_len, batch_size)

    def train_loss(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = (t.to(device, non_blocking=True) for t in batch)
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss, {"bpc": loss.detach() / LN2}

    def statistics_pass(self, model: nn.Module, batch, device: torch.device, stats: Statistics) -> None:
        """The forward that gathers batch statistics (re-estimation; windows are short)."""
        inputs, _ = batch
        model(inputs.to(device), stats=stats)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device, max_batches: int | None = None,
                 batch_stats: bool = False) -> dict[str, float]:
        """Bits per character over the whole split, streamed with the state carried over.

        ``max_batches`` limits the number of chunks (a quick partial validation).
        ``batch_stats``: every norm uses the statistics of the batch at hand: each chunk's
        ``task.eval_batch_size`` parallel pieces of the stream, step by step (the same
        batches as with population statistics).
        """
        nats, count, state = 0.0, 0, None
        for index, (inputs, targets, t0) in enumerate(self.splits[split].iterate()):
            if max_batches is not None and index >= max_batches:
                break
            logits, state = model(inputs.to(device), state, t0, stats=Statistics.BATCH if batch_stats else None)
            targets = targets.to(device)
            nats += summed_nats(logits, targets)
            count += int((targets != IGNORE).sum())
        return {"loss": nats / count, "bpc": nats / count / LN2, "characters": count}

    @torch.no_grad()
    def check_lengths(self, split: str, lengths: list[int], batch_size: int | None = None) -> None:
        """DataError, before any scoring, if a length leaves ``split`` less than one batch."""
        for length in lengths:
            try:
                LengthBatches(getattr(self.corpus, split), length, batch_size or self.batch_size)
            except DataError as exc:
                raise DataError(f"--lengths {length} is too long for the {split} split: {exc}") from None

    def evaluate_lengths(
        self, model: nn.Module, split: str, lengths: list[int], device: torch.device, batch_size: int | None = None
    ) -> list[dict[str, float]]:
        """Paper Fig. 3b: bpc on sequences of each length, from the initial state, with
        population statistics and with each batch's own statistics (weights frozen)."""
        model.eval()
        rows = []
        for length in lengths:
            batches = LengthBatches(getattr(self.corpus, split), length, batch_size or self.batch_size)
            row = {"length": length, "sequences": len(batches) * batches.batch_size}
            for mode in ("population", "batch"):
                nats, count = 0.0, 0
                stats = Statistics.BATCH if mode == "batch" else Statistics.POPULATION
                for inputs, targets in batches.iterate():
                    logits, _ = model(inputs.to(device), stats=stats)
                    nats += summed_nats(logits, targets.to(device))
                    count += targets.numel()
                row[f"bpc_{mode}"] = nats / count / LN2
            rows.append(row)
        return rows
