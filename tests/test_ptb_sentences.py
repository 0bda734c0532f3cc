"""The variable-length task: PTB sentences, one per sequence, padded with their lengths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnrnn.config import load_config
from bnrnn.data.sentences import SentenceBatches, sentences_of
from bnrnn.data.streams import IGNORE
from bnrnn.tasks.ptb_sentences import PtbSentencesTask
from bnrnn.train import train
from conftest import compose

EOL = 9


def stream(*sentences: list[int]) -> torch.Tensor:
    ids = []
    for sentence in sentences:
        ids += [*sentence, EOL]
    return torch.tensor(ids)


def test_sentences_are_the_runs_between_line_ends():
    found = sentences_of(torch.tensor([1, 2, EOL, EOL, 3, EOL, 4, 5]), EOL)
    assert [s.tolist() for s in found] == [[1, 2], [3], [4, 5]]  # an empty line is no sentence


def test_a_batch_reads_from_the_line_start_and_predicts_the_end():
    batches = SentenceBatches(stream([1, 2, 3], [4], [5, 6]), EOL, batch_size=3, shuffle=False)
    inputs, targets, lengths = next(batches.iterate())
    assert lengths.tolist() == [4, 3, 2]  # longest first: [1, 2, 3], [5, 6], [4]
    assert inputs.t().tolist() == [[EOL, 1, 2, 3], [EOL, 5, 6, EOL], [EOL, 4, EOL, EOL]]
    assert targets.t().tolist() == [[1, 2, 3, EOL], [5, 6, EOL, IGNORE], [4, EOL, IGNORE, IGNORE]]


def test_training_keeps_the_short_sentences_in_a_seeded_order_of_full_batches():
    data = stream(*[[1] * n for n in range(1, 12)])  # lengths 2..12 with the end
    batches = SentenceBatches(data, EOL, batch_size=4, max_length=8)
    assert len(batches.sentences) == 7 and batches.skipped == 4 and len(batches) == 1
    first = [b[2].tolist() for b in batches.iterate(epoch=0, seed=1)]
    assert first == [b[2].tolist() for b in batches.iterate(epoch=0, seed=1)]
    assert all(max(lengths) <= 8 for lengths in first)
    evaluation = SentenceBatches(data, EOL, batch_size=4, shuffle=False)
    assert len(evaluation) == 3 and sum(len(b[2]) for b in evaluation.iterate()) == 11  # every one, the last partial


@pytest.mark.parametrize("bucketed, spread_range", [(False, (25, 60)), (True, (0, 5))])
def test_training_batches_are_random_or_bucketed_by_length(bucketed, spread_range):
    many = SentenceBatches(stream(*[[1] * (n % 97 + 1) for n in range(4 * 120)]), EOL, batch_size=4,
                           bucketed=bucketed)
    batches = [lengths.tolist() for _, _, lengths in many.iterate(epoch=0, seed=1)]
    assert len(batches) == 120 and sorted(sum(batches, [])) == sorted(many.lengths.tolist())  # each once
    spread = sum(max(b) - min(b) for b in batches) / len(batches)  # random batches of 4 of 1..97: ~48
    assert spread_range[0] <= spread <= spread_range[1]


class UniformModel(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, tokens, state=None, t0=0, stats=None, lengths=None):
        return torch.zeros(*tokens.shape, self.vocab_size), state


@pytest.fixture
def sentences_cfg(fake_ptb):
    def make(*overrides: str):
        return compose([f"data.root={fake_ptb}", "data.download=false", "task=ptb_sentences", "model.hidden_size=8",
                        "task.batch_size=4", "task.eval_batch_size=5", "task.max_length=30", "trainer.log_every=1",
                        "trainer.eval_every=2", "trainer.progress=off", *overrides])
    return make


def test_a_uniform_model_scores_log2_of_the_vocabulary_on_every_prediction(sentences_cfg):
    task = PtbSentencesTask(load_config(sentences_cfg()))
    scores = task.evaluate(UniformModel(task.vocab_size), "valid", torch.device("cpu"))
    expected_count = sum(s.numel() + 1 for s in task.splits["valid"].sentences)
    assert scores["characters"] == expected_count
    assert scores["bpc"] == pytest.approx(math.log2(task.vocab_size))
    assert scores["end_bpc"] == pytest.approx(math.log2(task.vocab_size))


def test_the_bnlstm_trains_resumes_and_keeps_per_step_statistics(sentences_cfg, tmp_path):
    """A short run learns (valid bpc under the uniform's log2 50 = 5.64; the fake text's
    words are uniformly drawn letters, so not far under) and each of the 30
    statistics slots saw only running sentences: slot t's count is the batches that had a
    sentence longer than t."""
    run = tmp_path / "run"
    results = train(sentences_cfg("model=bnlstm", "trainer=adam", "trainer.lr=0.01", "trainer.max_steps=40",
                                  "trainer.eval_every=20", "trainer.test_at_end=false"), run)
    assert results["steps"] == 40 and results["valid_bpc"] < 5.5
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    tracked = state["rnn.cells.0.norm_h.num_batches_tracked"]
    assert tracked.shape == (30,) and tracked[0] == 40 and bool((tracked[1:] <= tracked[:-1]).all())
    again = train(sentences_cfg("model=bnlstm", "trainer=adam", "trainer.lr=0.01", "trainer.max_steps=42",
                                "trainer.eval_every=20", "trainer.test_at_end=false", "trainer.resume=true"), run)
    assert again["steps"] == 42
