"""Bad input is refused at start-up with one sentence, before anything is written.

Each row is one distinct mistake; README.md's "What is checked at start-up" table lists
them (with the CLI-level ones of test_cli.py, the data ones of test_ptb_data.py and the
checkpoint ones of test_reliability.py / test_train_smoke.py).
"""

from __future__ import annotations

import shutil

import pytest

from bnrnn.errors import BnrnnError, CheckpointError, ConfigError, DataError
from bnrnn.train import train
from conftest import SMALL_MNIST, compose, make_fake_mnist

CONFIG_MISTAKES = [
    (["model.hidden_size=0"], "model.hidden_size=0 is invalid: it must be a positive number"),
    (["model.hidden_size=abc"], "bad config value for 'model.hidden_size'"),
    (["model.gamma_init=0"], "model.gamma_init=0.0 is invalid"),
    (["model.gamma_init=-0.1"], "model.gamma_init=-0.1 is invalid"),
    (["model.stats_momentum=0"], "model.stats_momentum=0.0 is invalid: it must be in (0, 1]"),
    (["model.stats_momentum=1.5"], "model.stats_momentum=1.5 is invalid: it must be in (0, 1]"),
    (["model.eps=0"], "model.eps=0.0 is invalid"),
    (["model.h0_noise=-0.1"], "model.h0_noise=-0.1 is invalid: it must be zero or more"),
    (["model.t_max=0"], "model.t_max=0 is invalid: it must be a positive number or null"),
    (["model.stats_min_sequences=0"], "model.stats_min_sequences=0 is invalid: it must be a positive number"),
    (["+model.dropout=0.5"], "bad config value for 'model.dropout': Key 'dropout' not in 'ModelConfig'"),
    (["model.cuda_graphs=sometimes"], "bad config value for 'model.cuda_graphs'"),
    (["model.backend=fast"], "model.backend=fast is invalid: it must be one of auto, triton, cpu, aten, reference"),
    (["task.batch_size=0"], "task.batch_size=0 is invalid"),
    (["task.batch_size=1", "model=bnlstm"], "task.batch_size=1 is invalid: it must be at least 2 with batch norm"),
    (["task.eval_batch_size=0"], "task.eval_batch_size=0 is invalid"),
    (["task.valid_size=-5"], "task.valid_size=-5 is invalid"),
    (["task=pmnist", "task.permutation_seed=abc"], "bad config value for 'task.permutation_seed'"),
    (["trainer.lr=-1"], "trainer.lr=-1.0 is invalid"),
    (["trainer.lr=nan"], "trainer.lr=nan is invalid"),
    (["trainer.optimizer=lbfgs"], "trainer.optimizer=lbfgs is invalid: it must be one of rmsprop, adam, sgd"),
    (["trainer.rmsprop_alpha=1"], "trainer.rmsprop_alpha=1.0 is invalid: it must be in (0, 1)"),
    (["trainer.betas=[0.9]"], "trainer.betas=[0.9] is invalid: it must be two numbers in [0, 1)"),
    (["trainer.clip_norm=-1"], "trainer.clip_norm=-1.0 is invalid"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 is invalid"),
    (["trainer.max_steps=null", "trainer.max_epochs=null"], "trainer.max_steps=None is invalid: it must be set"),
    (["trainer.eval_every=0"], "trainer.eval_every=0 is invalid"),
    (["trainer.max_bad_steps=0"], "trainer.max_bad_steps=0 is invalid"),
    (["trainer.weight_decay=-1"], "trainer.weight_decay=-1.0 is invalid"),
    (["trainer.progress=maybe"], "trainer.progress=maybe is invalid: it must be one of auto, on, off"),
    (["trainer.resume=maybe"], "bad config value for 'trainer.resume'"),
    (["device.name=tpu"], "device.name=tpu is invalid: it must be one of auto, cpu, cuda"),
    (["seed=-1"], "seed=-1 is invalid: it must be zero or more"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_MISTAKES, ids=[" ".join(o) for o, _ in CONFIG_MISTAKES])
def test_a_config_mistake_is_one_sentence_and_writes_nothing(overrides, message, tmp_path, fake_mnist):
    cfg = compose([f"data.root={fake_mnist}", "data.download=false", *SMALL_MNIST, *overrides])
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "run")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_ptb_window_of_one_character_is_refused(tmp_path, small_ptb_cfg):
    with pytest.raises(ConfigError, match="task.seq_len=1 is invalid: it must be at least 2 for PTB"):
        train(small_ptb_cfg("task.seq_len=1"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def small(root, *overrides):
    return compose([f"data.root={root}", "data.download=false", *SMALL_MNIST, "trainer.max_steps=2", *overrides])


def test_mnist_with_one_file_missing_names_it(tmp_path):
    root = make_fake_mnist(tmp_path / "data", n_train=8, n_test=4)
    (root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        train(small(root), tmp_path / "run")


def test_mnist_file_of_the_wrong_kind_is_refused(tmp_path):
    """An idx file whose magic number says it is not what its name says (images <-> labels)."""
    root = make_fake_mnist(tmp_path / "data", n_train=8, n_test=4)
    raw = root / "MNIST" / "raw"
    shutil.copy(raw / "train-labels-idx1-ubyte.gz", raw / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        train(small(root), tmp_path / "run")


def test_an_output_folder_that_cannot_be_created_is_named(tmp_path, fake_mnist):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot be created: .*a-file is a file"):
        train(small(fake_mnist), blocker / "run")


def test_a_resume_from_a_truncated_checkpoint_names_the_file_and_keeps_it(tmp_path, fake_mnist):
    run = tmp_path / "run"
    train(small(fake_mnist), run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:200])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="last.pt is not a readable checkpoint"):
        train(small(fake_mnist, "trainer.resume=true", "trainer.max_steps=4"), run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert last.stat().st_size == 200


def test_a_resume_with_another_optimizer_is_refused(tmp_path, fake_mnist):
    run = tmp_path / "run"
    train(small(fake_mnist), run)
    with pytest.raises(CheckpointError, match=r"cannot resume .* with trainer.optimizer rmsprop -> adam \(the optimiser state"):
        train(small(fake_mnist, "trainer.resume=true", "trainer=adam"), run)
    with pytest.raises(CheckpointError, match="model.normalize.h True -> False"):
        train(small(fake_mnist, "trainer.resume=true", "model=bnlstm_input"), run)


def test_every_refusal_is_a_bnrnn_error():
    """The CLI prints BnrnnError as one sentence (exit 2); anything else would be a traceback."""
    for error in (ConfigError, DataError, CheckpointError):
        assert issubclass(error, BnrnnError)
