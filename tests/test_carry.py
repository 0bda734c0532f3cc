"""scripts/carry.py: a run's checkpoints carried to the next machine in a small file, and the
training after the unpack is the uninterrupted run's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bnrnn.checkpoint import load_checkpoint
from bnrnn.runfolder import read_history
from bnrnn.train import Launch, train
from conftest import compose

spec = importlib.util.spec_from_file_location("carry", Path(__file__).resolve().parents[1] / "scripts" / "carry.py")
carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry)

COMMON = ("model=bnlstm", "model.h0_noise=0.1", "trainer.test_at_end=false")


def valid_records(run: Path, step: int) -> dict:
    """The batch-statistics validation numbers logged at ``step`` (the selection rule's)."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "valid" and record["step"] == step:
            return {k: v for k, v in record.items() if k in ("accuracy", "loss", "best_accuracy")}
    raise AssertionError(f"no validation at step {step} in {run}")


def test_a_carried_run_goes_on_as_the_uninterrupted_one(small_mnist_cfg, tmp_path):
    straight = tmp_path / "straight"
    train(small_mnist_cfg(*COMMON, "trainer.max_steps=6"), straight)

    run = tmp_path / "carried"
    train(small_mnist_cfg(*COMMON, "trainer.max_steps=4"), run)
    before_last = load_checkpoint(run / "checkpoints" / "last.pt")
    before_best = load_checkpoint(run / "checkpoints" / "best.pt")

    packed = carry.pack(run)
    carried = torch.load(packed, weights_only=True)
    assert not any(carry.is_population_buffer(k) for k in carried["last"]["model"])
    assert any(carry.is_population_buffer(k) for k in before_last["model"])
    assert packed.stat().st_size < (run / "checkpoints" / "last.pt").stat().st_size / 3

    with pytest.raises(SystemExit, match="exists: resume from it"):
        carry.unpack(run)  # a real checkpoint is never replaced
    for name in ("last.pt", "best.pt"):
        (run / "checkpoints" / name).unlink()  # a new machine: git kept carry.pt, not checkpoints/
    assert carry.unpack(run) == 4
    assert read_history(run)[-1]["event"] == "unpacked"

    after_last = load_checkpoint(run / "checkpoints" / "last.pt")
    after_best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert after_last["progress"] == before_last["progress"]
    assert after_best["progress"] == before_best["progress"]
    for before, after in ((before_last, after_last), (before_best, after_best)):
        assert before["model"].keys() == after["model"].keys()
        for key, value in before["model"].items():
            if not carry.is_population_buffer(key):
                assert torch.equal(value, after["model"][key]), key
        # the re-estimated statistics are the batch statistics of these weights: near the EMA's, not its start
        means = [k for k in after["model"] if k.endswith("running_mean")]
        assert means and all(after["model"][k].abs().sum() > 0 for k in means)

    args = ["trainer.resume=true", "trainer.max_steps=6"]
    train(compose(args), run, Launch(overrides=args))
    a = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for key in a:
        if not carry.is_population_buffer(key):
            assert torch.equal(a[key], b[key]), key
    assert valid_records(run, 6) == valid_records(straight, 6)


def test_what_is_not_a_carry_is_refused(tmp_path):
    torch.save({"model": {}}, tmp_path / "carry.pt")
    with pytest.raises(SystemExit, match="is not a bnrnn carry"):
        carry.unpack(tmp_path)
