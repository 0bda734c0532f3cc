"""Validation with batch, EMA and re-estimated statistics: what each number is, that they are
logged side by side, and that scoring never changes the training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from bnrnn.config import load_config
from bnrnn.errors import ConfigError
from bnrnn import BNLSTM
from bnrnn.nn import LSTMLayer
from bnrnn.nn.norms import Statistics
from bnrnn.nn.population import reestimate_population_statistics
from bnrnn.scoring import flatten_modes, reestimate, score, score_modes, population_kept
from bnrnn.tasks import build_task
from bnrnn.run_loop import validation_overhead
from bnrnn.train import train
from conftest import assert_same_final_weights, without_clock

CPU = torch.device("cpu")


def records(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def trained_task_and_model(small_mnist_cfg, tmp_path, steps=6):
    """A small BN-LSTM after a few steps (EMA far from the weights' statistics), its task."""
    cfg = load_config(small_mnist_cfg("model=bnlstm", "model.stats_momentum=0.1",
                                      f"trainer.max_steps={steps}", "trainer.test_at_end=false"))
    train(cfg, tmp_path / "run")
    task = build_task(cfg)
    model = task.build_model(cfg.model)
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"])
    return cfg, task, model


def test_batch_statistics_validation_equals_a_training_mode_forward_on_the_same_batches(small_mnist_cfg, tmp_path):
    cfg, task, model = trained_task_and_model(small_mnist_cfg, tmp_path)
    assert model.rnn.cells[0].h0_noise == 0.1
    rng = torch.get_rng_state()
    got = score(task, model, "valid", CPU, "batch", seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream did not move
    # By hand: a training-mode forward (on a copy: it would move the EMA), h0 noise included,
    # from the RNG seeded with the seed given, over the split's examples in file order, in
    # batches of the training batch size (16; the valid split is 32).
    reference = copy.deepcopy(model).train()
    split = task.splits["valid"]
    loss, correct = 0.0, 0
    torch.manual_seed(7)
    with torch.no_grad():
        for start in range(0, split.num_examples, cfg.task.batch_size):
            x = split.inputs[start:start + cfg.task.batch_size].t().unsqueeze(-1)
            y = split.labels[start:start + cfg.task.batch_size]
            logits = reference(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    assert got["examples"] == split.num_examples == 32
    assert got["loss"] == pytest.approx(loss / 32, rel=1e-6)
    assert got["accuracy"] == correct / 32
    # and it is not the population-statistics number
    assert score(task, model, "valid", CPU, "ema")["loss"] != pytest.approx(got["loss"], rel=1e-5)


def test_reestimated_validation_equals_reestimating_by_hand_and_leaves_the_model_as_it_was(small_mnist_cfg, tmp_path):
    cfg, task, model = trained_task_and_model(small_mnist_cfg, tmp_path)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    got = score(task, model, "valid", CPU, "reestimated", seed=cfg.seed, reestimate_batches=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert torch.equal(torch.get_rng_state(), rng)

    # By hand: the first 3 training batches through the whole classifier with batch statistics
    # (h0 noise from the RNG seeded with the run's seed), the norms averaging cumulatively.
    by_hand = copy.deepcopy(model).eval()
    for bn in by_hand.rnn.cells[0].norms():
        bn.reset_running_stats()
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        for x, _ in list(task.train.iterate(0, cfg.seed))[:3]:
            by_hand(x, Statistics.REESTIMATE)
    expected = task.evaluate(by_hand.eval(), "valid", CPU)
    # by hand: whole sequences through the classifier; scoring: the layer alone, in pieces
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6) and got["accuracy"] == expected["accuracy"]
    assert got["loss"] != score(task, model, "valid", CPU, "ema")["loss"]


def test_each_mode_is_logged_under_its_own_key_and_the_selected_one_picks_the_best(small_mnist_cfg, tmp_path):
    train(small_mnist_cfg("model=bnlstm", "trainer.max_steps=6", "trainer.valid_reestimate_batches=2",
                          "trainer.select_on=reestimated"), tmp_path)
    valid = records(tmp_path, "valid")
    assert [r["step"] for r in valid] == [2, 4, 6]
    for record in valid:
        assert record["stats"] == "reestimated"
        assert record["accuracy"] == record["accuracy_reestimated"] and record["loss"] == record["loss_reestimated"]
        assert {"accuracy_batch", "accuracy_ema", "loss_batch", "loss_ema"} <= record.keys()
    best = max(valid, key=lambda r: (r["accuracy_reestimated"], -r["step"]))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["valid_accuracy"] == best["accuracy_reestimated"] and results["select_on"] == "reestimated"
    # the test: EMA and batch statistics (no re-estimation asked for), the EMA as the headline
    assert results["test_stats"] == "ema" and results["test_accuracy"] == results["test_accuracy_ema"]
    assert "test_accuracy_batch" in results and "test_accuracy_reestimated" not in results


def test_a_model_without_batch_norm_is_validated_once(small_mnist_cfg, tmp_path):
    train(small_mnist_cfg("model=lstm", "trainer.max_steps=2"), tmp_path)
    (record,) = records(tmp_path, "valid")
    assert record["stats"] == "none" and not any(key.startswith("accuracy_") for key in record)


def test_validating_with_reestimated_statistics_changes_nothing_in_the_training(small_mnist_cfg, tmp_path):
    """Weights, optimiser, population statistics, RNG and data position: a run that
    validates in every mode reaches the same state as one that validates with the EMA only."""
    common = ("model=bnlstm", "model.h0_noise=0.1", "trainer.max_steps=8", "trainer.test_at_end=false")
    train(small_mnist_cfg(*common, "trainer.valid_stats=[ema]", "trainer.select_on=ema"), tmp_path / "ema")
    train(small_mnist_cfg(*common, "trainer.valid_stats=[batch,ema,reestimated]",
                          "trainer.valid_reestimate_batches=3"), tmp_path / "all")
    assert_same_final_weights(tmp_path / "ema", tmp_path / "all")
    ema, every = torch.load(tmp_path / "ema/checkpoints/last.pt"), torch.load(tmp_path / "all/checkpoints/last.pt")
    assert torch.equal(ema["rng"]["torch"], every["rng"]["torch"])
    assert repr(ema["optimizer"]["state"]) == repr(every["optimizer"]["state"])
    assert [r["loss"] for r in records(tmp_path / "ema", "train")] == [r["loss"] for r in records(tmp_path / "all", "train")]


def test_a_resumed_run_that_validates_in_every_mode_matches_an_uninterrupted_one(small_mnist_cfg, tmp_path):
    common = ("model=bnlstm", "model.h0_noise=0.1", "trainer.test_at_end=false", "trainer.valid_reestimate_batches=2")
    train(small_mnist_cfg(*common, "trainer.max_steps=8"), tmp_path / "straight")
    train(small_mnist_cfg(*common, "trainer.max_steps=4"), tmp_path / "resumed")
    train(small_mnist_cfg(*common, "trainer.max_steps=8", "trainer.resume=true"), tmp_path / "resumed")
    assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed")
    assert without_clock(records(tmp_path / "straight", "valid")[-1]) == without_clock(records(tmp_path / "resumed",
                                                                                              "valid")[-1])


def test_flatten_modes_names_the_statistics_of_the_plain_keys():
    scores = {"batch": {"loss": 1.0, "accuracy": 0.7, "examples": 5}, "ema": {"loss": 2.0, "accuracy": 0.3, "examples": 5}}
    assert flatten_modes(scores, "batch") == {"loss": 1.0, "accuracy": 0.7, "examples": 5, "loss_batch": 1.0,
                                              "accuracy_batch": 0.7, "loss_ema": 2.0, "accuracy_ema": 0.3,
                                              "stats": "batch"}
    assert flatten_modes({"none": {"loss": 1.5}}, "batch") == {"loss": 1.5, "stats": "none"}


def test_score_modes_scores_a_vanilla_model_once(small_mnist_cfg, tmp_path):
    cfg = load_config(small_mnist_cfg("model=lstm"))
    task = build_task(cfg)
    scores = score_modes(task, task.build_model(cfg.model), "valid", CPU, ["batch", "ema", "reestimated"])
    assert list(scores) == ["none"]


@pytest.mark.parametrize("overrides, message", [
    (("trainer.select_on=reestimated", "trainer.valid_stats=[batch,ema]"), "trainer.select_on"),
    (("trainer.valid_stats=[]",), "trainer.valid_stats"),
    (("trainer.valid_stats=[batch,batch]",), "trainer.valid_stats"),
    (("trainer.valid_stats=[population]",), "trainer.valid_stats"),
    (("trainer.select_on=best",), "trainer.select_on"),
    (("model.init=identity",), "model.init"),
    (("trainer.valid_reestimate_batches=0",), "trainer.valid_reestimate_batches"),
])
def test_bad_statistics_settings_fail_at_start_naming_the_key(small_mnist_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(small_mnist_cfg(*overrides))


def test_identity_g_init_is_the_authors_init_id():
    H = 6
    layer = LSTMLayer(3, H, max_steps=4, init="identity_g")
    i, f, g, o = layer.weight_hh.detach().split(H, dim=0)
    assert torch.equal(g, torch.eye(H))
    others = torch.cat([i, f, o])  # (3H, H): one orthogonal matrix, orthonormal columns
    assert torch.allclose(others.t() @ others, torch.eye(H), atol=1e-5)
    assert not torch.allclose(i.t() @ i, torch.eye(H), atol=1e-2)  # not orthogonal block by block
    w = layer.weight_ih.detach()  # (4H, I) as one orthogonal matrix
    assert torch.allclose(w.t() @ w, torch.eye(3), atol=1e-5)
    plain = LSTMLayer(3, H, max_steps=4)
    for block in plain.weight_hh.detach().split(H, dim=0):
        assert torch.allclose(block.t() @ block, torch.eye(H), atol=1e-5)
    with pytest.raises(ValueError, match="init"):
        LSTMLayer(3, H, max_steps=4, init="identity")


def test_tensorboard_gets_every_mode_and_a_chart_that_overlays_them(small_mnist_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    train(small_mnist_cfg("model=bnlstm", "trainer.max_steps=2", "trainer.valid_reestimate_batches=2"), tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"valid/accuracy_{mode}" for mode in ("batch", "ema", "reestimated")} <= scalars
    assert "valid/accuracy" in scalars
    (layout_event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(layout_event.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}
    assert charts["accuracy"] == [r"valid/accuracy_(batch|ema|reestimated)$"]


def test_reestimating_draws_the_training_h0_noise(small_mnist_cfg, tmp_path):
    """Without the noise the leading black pixels leave W_h h without variance, and the
    statistics differ from those the weights were trained with."""
    cfg, task, model = trained_task_and_model(small_mnist_cfg, tmp_path)
    variance_at_step_0 = {}
    for noise in (0.1, 0.0):
        model.rnn.cells[0].h0_noise = noise
        with population_kept(model):
            assert reestimate(task, model, CPU, cfg.seed, 2) == 2
            variance_at_step_0[noise] = model.rnn.cells[0].norm_h.running_var[0].clone()
    assert variance_at_step_0[0.1].min() > 1e-4  # the noise's spread through W_h
    assert variance_at_step_0[0.0].max() < 1e-9  # every image in the same state


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_statistics_in_pieces_equal_those_of_one_pass(backend):
    """Re-estimating in pieces of steps (the authors' batches of 5000 would take 11 GB whole)."""
    torch.manual_seed(0)
    whole = BNLSTM(1, 12, max_steps=30, backend=backend)
    pieces = copy.deepcopy(whole)
    x = torch.rand(30, 40, 1)
    reestimate_population_statistics(whole, [x], lambda m, b, stats: m(b, stats=stats))
    reestimate_population_statistics(pieces, [x], lambda m, b, stats: m.forward_in_chunks(b, 7, stats=stats))
    for (name, a), (_, b) in zip(whole.named_buffers(), pieces.named_buffers()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert torch.equal(whole.cells[0].norm_h.num_batches_tracked, torch.ones(30, dtype=torch.long))


def test_every_mode_on_a_schedule_of_its_own_and_the_selection_mode_at_every_validation(small_mnist_cfg, tmp_path):
    """trainer.valid_stats_every: every mode at its multiples and at the last step, the
    selection mode (batch statistics) alone in between; each validation logs its seconds and
    the validations' share of the training time so far, which results.json keeps."""
    train(small_mnist_cfg("model=bnlstm", "trainer.max_steps=10", "trainer.valid_stats_every=4",
                          "trainer.valid_reestimate_batches=2", "trainer.test_at_end=false"), tmp_path)
    valid = records(tmp_path, "valid")
    assert [r["step"] for r in valid] == [2, 4, 6, 8, 10]
    every_mode = {"accuracy_batch", "accuracy_ema", "accuracy_reestimated"}
    for record in valid:
        modes = {key for key in record if key.startswith("accuracy_")}
        assert modes == (every_mode if record["step"] in (4, 8, 10) else {"accuracy_batch"}), record["step"]
        assert record["stats"] == "batch" and record["accuracy"] == record["accuracy_batch"]
        assert record["seconds"] >= record["seconds_batch"] > 0
    overheads = [r["overhead"] for r in valid]
    assert all(0 < value for value in overheads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["validation_seconds"] == pytest.approx(sum(r["seconds"] for r in valid), abs=0.2)
    # validation time over training time. Both seconds are rounded to 0.1 in results.json, and
    # ten tiny steps may train for less than that, so the rounding bounds the ratio from below
    # only; validation_overhead's own test pins the ratio.
    elapsed, spent = results["elapsed"], results["validation_seconds"]
    assert results["validation_overhead"] >= (spent - 0.05) / (elapsed - spent + 0.1)
    if elapsed - spent > 0.5:
        assert results["validation_overhead"] <= (spent + 0.05) / (elapsed - spent - 0.1)


def test_validation_overhead_is_validation_time_over_the_rest_of_the_run():
    assert validation_overhead(elapsed=10.0, valid_seconds=2.0) == pytest.approx(0.25)
    assert validation_overhead(elapsed=100.0, valid_seconds=0.0) == 0.0
    # a run that did nothing but validate: large, finite, positive
    assert 1e8 < validation_overhead(elapsed=3.0, valid_seconds=3.0) < float("inf")


def test_the_schedule_of_every_mode_must_fall_on_validations(small_mnist_cfg):
    with pytest.raises(ConfigError, match=r"^trainer.valid_stats_every=3 is invalid: it must be a multiple of "
                                          r"trainer.eval_every \(2\) or null$"):
        load_config(small_mnist_cfg("trainer.valid_stats_every=3"))
