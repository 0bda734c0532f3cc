"""Every task x model composes and trains for 2 steps; run folders hold what they promise."""

import json

import pytest
import torch

from bnrnn.errors import CheckpointError, ConfigError, DataError
from bnrnn.train import train
from conftest import assert_same_final_weights

MNIST_TASKS = ["seqmnist", "pmnist"]
MODELS = ["lstm", "bnlstm_input", "bnlstm"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", MNIST_TASKS)
def test_every_mnist_task_and_model_trains_two_steps(small_mnist_cfg, tmp_path, task, model):
    cfg = small_mnist_cfg(f"task={task}", f"model={model}", "trainer.max_steps=2")
    results = train(cfg, tmp_path)
    assert results["steps"] == 2 and results["best_step"] == 2
    assert 0.0 <= results["valid_accuracy"] <= 1.0
    assert results["test_examples"] == 32
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "results.json", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert list(tmp_path.glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "train", "valid", "test"]
    assert all(r["loss"] > 0 for r in records)
    assert (tmp_path / "permutation.pt").is_file() == (task == "pmnist")


def test_gamma_summary_and_gradient_norm_are_logged(small_mnist_cfg, tmp_path):
    train(small_mnist_cfg("model=bnlstm", "model.gamma_init=0.3", "trainer.max_steps=1"), tmp_path)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["split"] == "train"
    for key in ("gamma_x_mean", "gamma_h_mean", "gamma_c_mean"):
        assert abs(record[key] - 0.3) < 0.01  # one small step away from the initial value
    assert record["grad_norm"] > 0 and record["lr"] == 1e-3


def test_tensorboard_holds_train_and_valid_scalars(small_mnist_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(small_mnist_cfg("trainer.max_steps=2"), tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/grad_norm", "train/lr", "valid/loss", "valid/accuracy"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_resume_continues_from_the_last_checkpoint(small_mnist_cfg, tmp_path):
    train(small_mnist_cfg("trainer.max_steps=2"), tmp_path)
    results = train(small_mnist_cfg("trainer.max_steps=4", "trainer.resume=true"), tmp_path)
    assert results["steps"] == 4
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(small_mnist_cfg, tmp_path):
    overrides = ("task=pmnist", "model=bnlstm", "trainer.test_at_end=false")
    train(small_mnist_cfg(*overrides, "trainer.max_steps=5"), tmp_path / "straight")
    train(small_mnist_cfg(*overrides, "trainer.max_steps=2"), tmp_path / "resumed")
    train(small_mnist_cfg(*overrides, "trainer.max_steps=5", "trainer.resume=true"), tmp_path / "resumed")
    assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed")


def test_an_existing_run_is_not_overwritten_without_resume(small_mnist_cfg, tmp_path):
    train(small_mnist_cfg("trainer.max_steps=1"), tmp_path)
    before = (tmp_path / "checkpoints/last.pt").read_bytes()
    with pytest.raises(ConfigError, match="trainer.resume=true"):
        train(small_mnist_cfg("trainer.max_steps=1"), tmp_path)
    assert (tmp_path / "checkpoints/last.pt").read_bytes() == before


def test_resume_of_a_finished_run_without_its_checkpoint_says_so(small_mnist_cfg, tmp_path):
    train(small_mnist_cfg("trainer.max_steps=1", "trainer.test_at_end=false"), tmp_path)
    (tmp_path / "checkpoints" / "last.pt").unlink()
    with pytest.raises(CheckpointError, match="holds a finished run but no last.pt; nothing to resume"):
        train(small_mnist_cfg("trainer.resume=true"), tmp_path)


def test_resume_with_a_different_model_shape_is_refused(small_mnist_cfg, tmp_path):
    train(small_mnist_cfg("trainer.max_steps=1"), tmp_path)
    refusal = r"cannot resume .* with model.hidden_size 8 -> 9 \(the checkpoint.s weights have another shape"
    with pytest.raises(CheckpointError, match=refusal):
        train(small_mnist_cfg("trainer.max_steps=2", "trainer.resume=true", "model.hidden_size=9"), tmp_path)


def test_pmnist_permutation_is_saved_and_a_changed_seed_is_refused_on_resume(small_mnist_cfg, tmp_path):
    from bnrnn.data.mnist import make_permutation

    train(small_mnist_cfg("task=pmnist", "trainer.max_steps=1", "task.permutation_seed=7"), tmp_path)
    saved = torch.load(tmp_path / "permutation.pt", weights_only=True)
    assert torch.equal(saved, make_permutation(7))
    with pytest.raises(CheckpointError, match="task.permutation_seed 7 -> 8 .the pixel order"):
        train(small_mnist_cfg("task=pmnist", "trainer.max_steps=2", "trainer.resume=true",
                              "task.permutation_seed=8"), tmp_path)


def test_best_checkpoint_is_the_one_tested(small_mnist_cfg, tmp_path):
    results = train(small_mnist_cfg("trainer.max_steps=4", "trainer.eval_every=1"), tmp_path)
    best = torch.load(tmp_path / "checkpoints/best.pt", weights_only=True)
    assert best["progress"]["step"] == results["best_step"]
    assert best["progress"]["best_metric"] == results["valid_accuracy"]


def test_valid_size_leaving_no_training_batch_is_refused(small_mnist_cfg, tmp_path):
    with pytest.raises(DataError, match="valid_size"):
        train(small_mnist_cfg("task.valid_size=90"), tmp_path)


def test_bf16_precision_trains_under_autocast_with_the_first_loss_near_float32s(small_mnist_cfg, tmp_path):
    """trainer.precision=bf16: the same weights (seed) give a first-step loss within bf16's
    rounding of float32's, not equal to it; the run trains, validates and tests."""
    first_losses = {}
    for precision in ("32", "bf16"):
        run = tmp_path / precision
        results = train(small_mnist_cfg("model=bnlstm", "trainer.max_steps=4", f"trainer.precision={precision}"), run)
        assert results["steps"] == 4 and 0.0 <= results["test_accuracy"] <= 1.0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        first_losses[precision] = next(r["loss"] for r in records if r["split"] == "train" and r["step"] == 1)
    assert first_losses["bf16"] == pytest.approx(first_losses["32"], rel=1e-2)
    assert first_losses["bf16"] != first_losses["32"]
