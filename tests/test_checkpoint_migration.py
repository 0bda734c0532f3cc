"""Runs written before the layer and norm renames (checkpoint format 1) still evaluate and
resume. tests/data/format1/ holds two tiny PTB runs that commit 30eb9a0 (the campaign's)
trained for 4 steps on tests/conftest.py's fake PTB: a single BN-LSTM layer whose config
says ``model.bn.c: false`` and ``model.momentum: 0.2``, and a 2-layer stack. Their
parameters are named ``rnn.*`` / ``rnn.layers.{i}.*`` with norms ``bn_x`` ..., today's
``rnn.cells.{i}.*`` with ``norm_x`` ...."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bnrnn.checkpoint import FORMAT, load_checkpoint, migrate_model_state
from bnrnn.config import read_saved_settings
from bnrnn.evaluate import evaluate_run
from bnrnn.train import train

FORMAT1 = Path(__file__).parent / "data" / "format1"


def copy_run(name: str, tmp_path: Path) -> Path:
    run = tmp_path / name
    shutil.copytree(FORMAT1 / name, run)
    return run


def valid_record(run: Path) -> dict:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "valid"][-1]


def test_names_are_migrated_in_the_entries_order():
    state = {"rnn.weight_ih": 1, "rnn.bn_x.weight": 2, "rnn.h0": 3, "decoder.weight": 4}
    assert list(migrate_model_state(state).items()) == [
        ("rnn.cells.0.weight_ih", 1), ("rnn.cells.0.norm_x.weight", 2), ("rnn.cells.0.h0", 3), ("decoder.weight", 4)]
    stacked = migrate_model_state({"rnn.layers.3.bn_c.running_var": 5, "embedding.weight": 6})
    assert stacked == {"rnn.cells.3.norm_c.running_var": 5, "embedding.weight": 6}


def test_the_old_settings_are_read_under_their_new_names():
    settings = read_saved_settings(FORMAT1 / "single" / "config.yaml", "")
    assert dict(settings.model.normalize) == {"x": True, "h": True, "c": False}
    assert settings.model.stats_momentum == 0.2
    assert "bn" not in settings.model and "momentum" not in settings.model


@pytest.mark.parametrize("name", ["single", "stacked"])
def test_a_format1_checkpoint_evaluates_to_what_its_own_code_measured(name, fake_ptb, tmp_path):
    """The validation bpc with the population statistics (the EMA) and with batch statistics
    that commit 30eb9a0 logged at step 4, from the checkpoint it wrote: the migrated model
    computes the same function."""
    run = copy_run(name, tmp_path)
    payload = load_checkpoint(run / "checkpoints" / "best.pt")
    assert all(k.startswith("rnn.cells.") for k in payload["model"] if k.startswith("rnn."))
    result = evaluate_run(run, "best", split="valid", data_root=str(fake_ptb), device_name="cpu")
    logged = valid_record(run)
    assert result["ema"]["bpc"] == pytest.approx(logged["bpc_ema"], abs=1e-5)
    # batch statistics see h0's noise (model.h0_noise 0.1), drawn here from another RNG state
    assert result["batch"]["bpc"] == pytest.approx(logged["bpc_batch"], abs=2e-3)


def test_a_format1_run_resumes_and_then_writes_format2(fake_ptb, tmp_path, small_ptb_cfg):
    run = copy_run("stacked", tmp_path)
    results = train(small_ptb_cfg("model=bnlstm", "model.num_layers=2", "trainer.max_steps=6", "trainer.resume=true",
                                  "trainer.test_at_end=false"), run)
    assert results["steps"] == 6
    written = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert written["format"] == FORMAT and written["progress"]["step"] == 6
    assert "rnn.cells.1.norm_h.running_var" in written["model"]
