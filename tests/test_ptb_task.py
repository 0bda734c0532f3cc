"""The PTB task end to end: bpc, training, re-estimation, resume and `bnrnn eval`."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from bnrnn.errors import DataError
from bnrnn.evaluate import evaluate_run
from bnrnn.tasks.ptb import PtbTask
from bnrnn.train import train
from conftest import assert_same_final_weights

MODELS = ["lstm", "bnlstm_input", "bnlstm"]


class UniformModel(nn.Module):
    """Predicts the uniform distribution over V symbols: logits (T, B, V) of zeros."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, tokens, state=None, t0=0, stats=None):
        return torch.zeros(*tokens.shape, self.vocab_size) + 0 * self.dummy, state


@pytest.mark.parametrize("streams", [1, 3, 64])
def test_a_uniform_model_scores_log2_of_the_vocabulary(small_ptb_cfg, tmp_path, streams):
    from bnrnn.config import load_config

    task = PtbTask(load_config(small_ptb_cfg(f"task.eval_batch_size={streams}")))
    model = UniformModel(task.vocab_size)
    assert task.vocab_size == 50
    for split in ("valid", "test"):
        metrics = task.evaluate(model, split, torch.device("cpu"))
        assert abs(metrics["bpc"] - math.log2(50)) < 1e-6
        assert metrics["characters"] == getattr(task.corpus, split).numel() - 1
    loss, values = task.train_loss(model, next(task.train.iterate(0, 1)), torch.device("cpu"))
    assert abs(float(values["bpc"]) - math.log2(50)) < 1e-6
    assert abs(loss.item() - math.log(50)) < 1e-6


@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_on_ptb(small_ptb_cfg, tmp_path, model):
    results = train(small_ptb_cfg(f"model={model}", "trainer.max_steps=2"), tmp_path)
    assert results["steps"] == 2 and results["task"] == "ptb"
    assert 3.0 < results["valid_bpc"] < 7.0 and 3.0 < results["test_bpc"] < 7.0
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == 50 and vocab[0] == "\n"
    state = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["model"]
    if model != "lstm":
        assert state["rnn.cells.0.norm_x.running_mean"].shape == (19, 32)  # T_max = seq_len - 1 slots, 4H
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "train", "valid", "test"]
    assert all(r["bpc"] == pytest.approx(r["loss"] / math.log(2)) for r in records)


def test_the_best_checkpoint_is_chosen_by_lowest_validation_bpc(small_ptb_cfg, tmp_path):
    results = train(small_ptb_cfg("model=lstm", "trainer=adam", "trainer.lr=0.02", "trainer.max_steps=8",
                                  "trainer.eval_every=2"), tmp_path)
    valid = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "valid"]
    best = min(valid, key=lambda r: r["bpc"])
    assert results["best_step"] == best["step"] and results["valid_bpc"] == best["bpc"]
    assert valid[-1]["best_bpc"] == best["bpc"]


def test_reestimation_switch_tests_with_both_statistics(small_ptb_cfg, tmp_path):
    results = train(small_ptb_cfg("model=bnlstm", "trainer.max_steps=2", "trainer.reestimate_stats=true",
                                  "trainer.reestimate_batches=3"), tmp_path)
    assert results["test_stats"] == "reestimated"
    assert results["test_bpc"] == results["test_bpc_reestimated"]
    assert len({results["test_bpc_ema"], results["test_bpc_batch"], results["test_bpc_reestimated"]}) == 3


def test_reestimation_is_a_no_op_for_the_vanilla_lstm(small_ptb_cfg, tmp_path):
    results = train(small_ptb_cfg("model=lstm", "trainer.max_steps=2", "trainer.reestimate_stats=true"), tmp_path)
    assert results["test_stats"] == "none" and "test_bpc" in results
    assert not any(key.startswith("test_bpc_") for key in results)


def test_a_resumed_ptb_run_matches_an_uninterrupted_one(small_ptb_cfg, tmp_path):
    # 4 windows per batch, (4010 - 19) // 20 = 199 windows: 49 steps an epoch; cross one.
    overrides = ("model=bnlstm", "trainer.test_at_end=false", "trainer.eval_every=25")
    train(small_ptb_cfg(*overrides, "trainer.max_steps=52"), tmp_path / "straight")
    train(small_ptb_cfg(*overrides, "trainer.max_steps=25"), tmp_path / "resumed")
    train(small_ptb_cfg(*overrides, "trainer.max_steps=52", "trainer.resume=true"), tmp_path / "resumed")
    assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed")


def test_fig3b_table_holds_the_papers_points():
    from bnrnn.evaluate import lengths_table

    table = lengths_table([{"length": 100, "sequences": 8, "bpc_population": 2.0, "bpc_batch": 2.1}])
    assert table.splitlines()[2] == "| 100 | 8 | 2.0000 | 2.1000 | 1.398 | 1.420 |"


def test_eval_reestimates_and_sweeps_lengths(small_ptb_cfg, tmp_path):
    train(small_ptb_cfg("model=bnlstm", "trainer.max_steps=2"), tmp_path / "run")
    result = evaluate_run(tmp_path / "run", reestimate_stats=True, lengths=[10, 19, 40], batch_size=4)
    assert result["ema"]["characters"] == result["reestimated"]["characters"]
    assert [row["length"] for row in result["lengths"]] == [10, 19, 40]
    for row in result["lengths"]:
        assert 3.0 < row["bpc_population"] < 7.0 and 3.0 < row["bpc_batch"] < 7.0
        assert row["bpc_population"] != row["bpc_batch"]
    table = (tmp_path / "run/eval/lengths.md").read_text().splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| 10 |")
    assert "paper, population" in table[0]
    assert table[2].endswith("| - | - |")  # the paper's Fig. 3b starts at length 100
    assert result["batch"]["characters"] == result["ema"]["characters"]
    assert json.loads((tmp_path / "run/eval/eval.json").read_text())["lengths"] == result["lengths"]
    # The population statistics in the checkpoint were not changed by the evaluation.
    before = torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)["model"]
    assert before["rnn.cells.0.norm_h.num_batches_tracked"][0] == 2


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bnrnn.cli", *args], capture_output=True, text=True, timeout=300)


def test_eval_command_prints_the_scores(small_ptb_cfg, tmp_path):
    train(small_ptb_cfg("model=lstm", "trainer.max_steps=2"), tmp_path / "run")
    result = run_cli("eval", str(tmp_path / "run"), "--lengths", "10,20", "--batch-size", "4", "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr
    assert "test (ema statistics): loss" in result.stdout
    assert "| 20 |" in result.stdout and (tmp_path / "e/lengths.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["eval", "/nonexistent/run"], "is not a bnrnn run folder"),
    (["eval", "RUN", "--lengths", "ten"], "is not 'paper' or a comma-separated list"),
    (["eval", "RUN", "--reestimate-batches", "0"], "--reestimate-batches must be positive"),
    (["eval", "RUN", "--checkpoint", "middle"], "invalid choice: 'middle'"),
])
def test_eval_command_rejects_bad_input(small_ptb_cfg, tmp_path, args, message):
    args = [str(tmp_path) if a == "RUN" else a for a in args]
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_resume_against_a_different_vocabulary_is_refused(small_ptb_cfg, tmp_path):
    train(small_ptb_cfg("trainer.max_steps=2"), tmp_path / "run")
    vocab_file = tmp_path / "run" / "vocab.json"
    symbols = json.loads(vocab_file.read_text())
    vocab_file.write_text(json.dumps(symbols[::-1] if isinstance(symbols, list) else {"symbols": ["x", "y"]}))
    with pytest.raises(DataError, match="vocab.json differs from the vocabulary of the training split"):
        train(small_ptb_cfg("trainer.max_steps=4", "trainer.resume=true"), tmp_path / "run")
