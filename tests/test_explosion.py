"""A finite gradient explosion is named as it starts (bnrnn.explosion), in the log and in history.jsonl."""

from __future__ import annotations

import torch

from bnrnn.explosion import ExplosionWatch
from bnrnn.runfolder import read_history
from bnrnn.train import train


def test_a_norm_far_above_the_recent_median_is_named_once_per_cooldown():
    watch = ExplosionWatch(cooldown=100)
    assert [watch.check(step, 1.0 + step % 3) for step in range(60)] == [None] * 60  # median 2
    assert watch.check(60, 1999.0) is None  # under 1000x
    assert watch.check(61, 2500.0) == 2.0
    assert watch.check(62, 1e9) is None  # within the cooldown
    assert watch.check(161, 1e9) == 2.0  # the two large norms do not move a median of 63
    fresh = ExplosionWatch(cooldown=100)
    assert [fresh.check(step, 1e9 if step == 10 else 1.0) for step in range(40)] == [None] * 40  # too early


def test_a_run_whose_gradient_explodes_says_so(small_mnist_cfg, tmp_path, monkeypatch, caplog):
    """A gradient norm forced up from step 60 on (the training itself unchanged): one warning
    naming the step, and an exploding record."""
    import bnrnn.run_loop as trainer  # where the guarded step reads the gradient norm

    real = trainer.total_gradient_norm
    calls = {"n": 0}

    def norm(grads):
        calls["n"] += 1
        value = real(grads)
        return value * 1e6 if calls["n"] >= 60 else value

    monkeypatch.setattr(trainer, "total_gradient_norm", norm)
    with caplog.at_level("WARNING", logger="bnrnn"):
        train(small_mnist_cfg("trainer.max_steps=64", "trainer.eval_every=100", "trainer.test_at_end=false",
                              "trainer.clip_norm=null"), tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "the training is exploding" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("step 60: the gradient norm is ")
    (record,) = [r for r in read_history(tmp_path) if r["event"] == "exploding"]
    assert record["step"] == 60 and record["grad_norm"] > 1e3 * record["recent_median"]
    assert torch.load(tmp_path / "checkpoints" / "last.pt")["progress"]["step"] == 64
