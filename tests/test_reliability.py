"""Reliability: divergence caught and explained, atomic checkpoints, logs that survive crashes."""

from __future__ import annotations

import json
import math

import pytest
import torch

import bnrnn.checkpoint as checkpoint_module
import bnrnn.train as train_module
from bnrnn.checkpoint import load_checkpoint, save_checkpoint
from bnrnn.errors import CheckpointError
from bnrnn.run_loop import DivergedError
from bnrnn.train import train
from conftest import assert_same_final_weights


class TamperedBatches:
    """A task's training batches with ``change(index, batch)`` applied to each, counting
    batches from 0 over the whole run; ``change`` may return None to drop a batch."""

    def __init__(self, batches, change):
        self.batches, self.change, self.index = batches, change, 0

    def __len__(self):
        return len(self.batches)

    def iterate(self, epoch, seed, start=0):
        for batch in self.batches.iterate(epoch, seed, start):
            changed = self.change(self.index, batch)
            self.index += 1
            if changed is not None:
                yield changed


def tamper(monkeypatch, change=None, on_model=None):
    """Make train() build its task with tampered batches and/or hand its model to ``on_model``."""
    real_build_task = train_module.build_task

    def build_task(cfg):
        task = real_build_task(cfg)
        if change is not None:
            # Only the training steps see the tampered batches; the re-estimation of a
            # validation draws the task's own (and must not shift the count).
            untampered = task.training_batches()
            task.training_batches = lambda batch_size=None: untampered
            task.train = TamperedBatches(task.train, change)
        if on_model is not None:
            real_build_model = task.build_model

            def build_model(model_cfg):
                model = real_build_model(model_cfg)
                on_model(model)
                return model

            task.build_model = build_model
        return task

    monkeypatch.setattr(train_module, "build_task", build_task)


def with_nan_pixels(batch):
    inputs, targets = batch
    inputs = inputs.clone()
    inputs[0, 0] = float("nan")
    return inputs, targets


def records(run_dir, split=None):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines]
    return [r for r in out if split is None or r["split"] == split]


# -- divergence guard ---------------------------------------------------------------------------


def test_a_nan_batch_is_skipped_like_a_missing_batch(small_mnist_cfg, tmp_path, monkeypatch):
    """The update of a bad step is not applied, nor are its batch statistics: the run ends
    exactly where a run that never saw that batch ends."""
    common = ("model=bnlstm", "model.h0_noise=0.1", "trainer.max_steps=5", "trainer.eval_every=5",
              "trainer.test_at_end=false")
    # h0 noise is drawn in the forward pass, so the dropped batch must not draw any either:
    # the reference run draws it too, by running the same forward on a copy of that batch.
    tamper(monkeypatch, change=lambda i, b: with_nan_pixels(b) if i == 2 else b)
    train(small_mnist_cfg(*common), tmp_path / "nan")
    bad = records(tmp_path / "nan", "diverge")
    assert [r["step"] for r in bad] == [3]
    assert "input batch holds NaN" in bad[0]["likely_cause"]
    report = json.loads((tmp_path / "nan" / "diagnostics" / "step-00000003-try1.json").read_text())
    assert report["input_finite"] is False and report["loss"] == "nan"
    assert set(report["norms"]) == {"rnn.cells.0.norm_x", "rnn.cells.0.norm_h", "rnn.cells.0.norm_c"}
    assert all("gamma_min" in entry and "batch_var_min" in entry for entry in report["norms"].values())
    assert "rnn.cells.0.weight_hh" in report["grad_norms"]

    draws = []

    def drop_but_draw(i, batch):
        if i == 2:
            draws.append(torch.randn(16, 8))  # the h0 noise the skipped forward drew (batch 16, H 8)
            return None
        return batch

    tamper(monkeypatch, change=drop_but_draw)
    train(small_mnist_cfg(*common), tmp_path / "dropped")
    assert draws
    assert_same_final_weights(tmp_path / "nan", tmp_path / "dropped")


def test_persistent_nan_input_stops_the_run_naming_the_cause(small_mnist_cfg, tmp_path, monkeypatch):
    tamper(monkeypatch, change=lambda i, b: with_nan_pixels(b) if i >= 4 else b)
    cfg = small_mnist_cfg("model=bnlstm", "trainer.max_steps=50", "trainer.checkpoint_every=1", "trainer.max_bad_steps=3")
    with pytest.raises(DivergedError) as info:
        train(cfg, tmp_path / "run")
    message = str(info.value)
    assert "3 consecutive steps" in message and "(last at step 5)" in message
    assert "input batch holds NaN" in message and "diagnostics" in message
    assert len(list((tmp_path / "run" / "diagnostics").glob("step-*.json"))) == 3
    # The last good checkpoint is kept: step 4, loadable, finite.
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert payload["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


def test_an_infinite_gradient_is_caught_and_named(small_mnist_cfg, tmp_path, monkeypatch, caplog):
    calls = {"n": 0}

    def poison_weight_hh(model):
        def hook(grad):
            calls["n"] += 1
            return grad * math.inf if calls["n"] >= 3 else grad

        model.rnn.cells[0].weight_hh.register_hook(hook)

    tamper(monkeypatch, on_model=poison_weight_hh)
    cfg = small_mnist_cfg("model=lstm", "trainer.max_steps=50", "trainer.max_bad_steps=2", "trainer.clip_norm=null")
    with pytest.raises(DivergedError) as info, caplog.at_level("WARNING", logger="bnrnn"):
        train(cfg, tmp_path / "run")
    assert "gradient overflowed with a finite loss" in str(info.value)
    # the per-step warning names what was not finite: here the gradient alone
    warnings = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(warnings) == 2 and all("non-finite gradient (the loss was finite)" in w for w in warnings)
    bad = records(tmp_path / "run", "diverge")
    assert [r["step"] for r in bad] == [3, 3]  # nothing was applied, so both tries are step 3
    assert bad[0]["nonfinite_grads"] == ["rnn.cells.0.weight_hh"]
    assert isinstance(bad[0]["loss"], float)
    report = json.loads((tmp_path / "run" / "diagnostics" / "step-00000003-try1.json").read_text())
    assert report["grad_norms"]["rnn.cells.0.weight_hh"] in ("inf", "nan")
    assert isinstance(report["grad_norms"]["rnn.cells.0.weight_ih"], float)


def test_a_collapsed_batch_variance_is_named_as_the_cause():
    """Every example the same at the first steps (MNIST's black pixels, shared h0)."""
    from bnrnn.diagnostics import divergence_report
    from bnrnn.nn import LSTMLayer

    layer = LSTMLayer(1, 4, max_steps=5).train()
    x = torch.zeros(5, 8, 1)  # zero input and a shared h0: W_x x and W_h h_0 have zero variance
    out, _ = layer(x)
    out.sum().backward()
    report = divergence_report(layer, torch.tensor(1.0), torch.tensor(math.inf), (x,), 7)
    assert report["norms"]["norm_x"]["batch_var_min"] < 1e-9  # 0 up to the rounding of 1/invstd^2 - eps
    assert report["norms"]["norm_h"]["batch_var_min"] < 1e-9
    assert "batch variance collapsed to ~0 in norm_h" in report["likely_cause"]
    assert "model.h0_noise" in report["likely_cause"]
    # With per-example initial states only the input term is collapsed: another cause.
    layer.zero_grad()
    out, _ = layer(x, (torch.randn(8, 4), torch.randn(8, 4)))
    out.sum().backward()
    report = divergence_report(layer, torch.tensor(1.0), torch.tensor(math.inf), (x,), 7)
    assert report["likely_cause"].startswith("the input term has zero batch variance at some steps (norm_x")


# -- checkpoints ---------------------------------------------------------------------------------


def test_a_kill_during_the_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "progress": {"step": 1}})

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what a signal during the write looks like

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "progress": {"step": 2}})
    monkeypatch.undo()
    assert load_checkpoint(path)["progress"]["step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(1000)}})
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"last.pt is not a readable checkpoint \(truncated or foreign"):
        load_checkpoint(path)


def test_a_foreign_checkpoint_is_named(tmp_path):
    path = tmp_path / "someone_elses.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="someone_elses.pt is not a bnrnn checkpoint"):
        load_checkpoint(path)
    path.write_text("not even a zip file")
    with pytest.raises(CheckpointError, match="someone_elses.pt is not a readable checkpoint"):
        load_checkpoint(path)


# -- logs ----------------------------------------------------------------------------------------


def test_a_crash_leaves_the_logs_of_every_completed_step(small_mnist_cfg, tmp_path, monkeypatch):
    def crash_at_the_sixth_batch(i, batch):
        if i == 5:
            raise RuntimeError("simulated crash")
        return batch

    tamper(monkeypatch, change=crash_at_the_sixth_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(small_mnist_cfg("trainer.max_steps=50"), tmp_path / "run")
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records(tmp_path / "run", "valid")] == [2, 4]


def test_a_requeued_slurm_job_resumes_its_own_run(small_mnist_cfg, tmp_path, monkeypatch):
    """SLURM (and submitit's requeue on preemption) restarts the same command in the same folder."""
    run = tmp_path / "run"
    train(small_mnist_cfg("trainer.max_steps=2"), run)
    with pytest.raises(Exception, match="already holds a (finished )?run"):  # a plain re-run is refused ...
        train(small_mnist_cfg("trainer.max_steps=4"), run)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # ... a requeued one continues
    results = train(small_mnist_cfg("trainer.max_steps=4"), run)
    assert results["steps"] == 4
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4]


def test_a_huge_but_finite_gradient_is_clipped_not_skipped(small_mnist_cfg, tmp_path, monkeypatch):
    """A gradient of 1e30 has a float32 squared norm of inf; it is still a direction to clip to."""
    calls = {"n": 0}

    def inflate_weight_hh(model):
        def hook(grad):
            calls["n"] += 1
            return grad * 1e30 if calls["n"] == 2 else grad

        model.rnn.cells[0].weight_hh.register_hook(hook)

    tamper(monkeypatch, on_model=inflate_weight_hh)
    results = train(small_mnist_cfg("model=lstm", "trainer.max_steps=3", "trainer.test_at_end=false"), tmp_path / "run")
    assert results["steps"] == 3
    assert records(tmp_path / "run", "diverge") == []
    norms = [r["grad_norm"] for r in records(tmp_path / "run", "train")]
    assert 1e25 < norms[1] < 1e35 and norms[0] < 1e3 and norms[2] < 1e3
    weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_total_gradient_norm_survives_float32_overflow():
    from bnrnn.monitoring import total_gradient_norm

    grads = [torch.full((4,), 1e30), torch.ones(3)]
    assert total_gradient_norm(grads).item() == pytest.approx(2e30, rel=1e-6)
    assert not torch.isfinite(total_gradient_norm([torch.tensor([math.inf]), torch.ones(2)]))
