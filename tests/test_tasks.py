"""The task registry and its demonstration, the adding problem: one module plus one YAML file
that trains, is reported and is evaluated with no other file naming it; and the schema as
the single source of every key (the YAML holds only what an option changes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bnrnn.config import load_config
from bnrnn.errors import ConfigError
from bnrnn.report import flatten as flat
from bnrnn.report import make_report
from bnrnn.schema import TrainConfig, declared
from bnrnn.tasks import task_class, task_kinds
from bnrnn.tasks.adding import TOLERANCE, make_examples
from bnrnn.train import train
from conftest import compose

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_every_task_option_composes_to_a_registered_kind():
    assert {"mnist", "ptb", "adding"} <= set(task_kinds())
    for option in sorted(p.stem for p in (CONF / "task").glob("*.yaml")):
        cfg = load_config(compose([f"task={option}", "data.root=/nowhere"]))
        assert cfg.task.name == option and task_class(cfg.task.kind).kind == cfg.task.kind


def test_an_unregistered_kind_is_one_sentence_naming_the_registered_ones():
    with pytest.raises(ConfigError, match="task.kind=speech is invalid: it must be one of adding, mnist, ptb, ptb_sentences$"):
        load_config({"task": {"name": "x", "kind": "speech"}})


def test_adding_examples_hold_two_marks_one_per_half_and_their_sum():
    inputs, targets = make_examples(64, 10, seed=3)
    values, markers = inputs[..., 0], inputs[..., 1]
    assert inputs.shape == (64, 10, 2) and targets.shape == (64,)
    assert torch.equal(markers.sum(1), torch.full((64,), 2.0))
    assert torch.all(markers[:, :5].sum(1) == 1) and torch.all(markers[:, 5:].sum(1) == 1)
    torch.testing.assert_close(targets, (values * markers).sum(1))
    again, _ = make_examples(64, 10, seed=3)
    other, _ = make_examples(64, 10, seed=4)
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)


def test_the_adding_task_learns_and_is_reported(tmp_path):
    overrides = ["task=adding", "task.length=12", "task.train_size=1024", "task.eval_size=256", "task.batch_size=32",
                 "model=lstm", "model.hidden_size=32", "trainer=adam", "trainer.lr=0.01", "trainer.max_steps=240",
                 "trainer.eval_every=80", "trainer.progress=off", "data.root=/nowhere"]
    run = tmp_path / "adding-lstm"
    results = train(compose(overrides), run)
    # Predicting the mean (1.0) scores 1/6; a learned sum far less.
    assert results["valid_mse"] < 0.05, results
    assert results["test_mse"] < 0.05 and 0.0 <= results["test_accuracy"] <= 1.0
    report = make_report([run], tmp_path / "report")
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| adding | LSTM |" in table and (tmp_path / "report" / "adding.png").is_file()
    assert report


def test_the_adding_task_rules_are_its_own():
    with pytest.raises(ConfigError, match="task.length=1 is invalid: it must be at least 2"):
        load_config(compose(["task=adding", "task.length=1", "data.root=/nowhere"]))
    with pytest.raises(ConfigError, match=r"^task.permute is not a setting of task.kind=adding \(its settings: "
                                          r"batch_size, eval_batch_size, length, train_size, eval_size, data_seed\)$"):
        load_config(compose(["task=adding", "+task.permute=true", "data.root=/nowhere"]))
    assert TOLERANCE == 0.04


@pytest.mark.parametrize("group", ["model", "trainer", "device", "task"])
def test_group_options_write_only_what_they_change(group):
    """A key's default lives in the schema alone: an option restating one (beside the keys
    that name the option) would drift from it unseen."""
    naming = {"name", "optimizer"}
    for path in sorted((CONF / group).glob("*.yaml")):
        option = OmegaConf.to_container(OmegaConf.load(path))
        option.pop("defaults", None)
        if group == "task":
            kind = {"seqmnist": "mnist", "pmnist": "mnist"}.get(path.stem, path.stem)
            defaults = OmegaConf.to_container(OmegaConf.structured(task_class(kind).Settings))
        else:
            defaults = OmegaConf.to_container(OmegaConf.structured(TrainConfig))[group]
        restated = {k: v for k, v in flat(option).items()
                    if k not in naming and k in flat(defaults) and flat(defaults)[k] == v}
        assert not restated, f"{path.name} restates schema defaults: {restated}"


def test_the_paper_presets_compose_to_the_papers_settings():
    seq = load_config(compose(["experiment=paper_seqmnist", "model=bnlstm", "data.root=/x"]))
    assert (seq.model.hidden_size, seq.task.batch_size, seq.trainer.optimizer, seq.trainer.lr) == (100, 100, "rmsprop",
                                                                                                  1e-3)
    assert (seq.trainer.clip_norm, seq.trainer.max_epochs, seq.model.stats_momentum, seq.model.gamma_init) == (1.0, 200, 0.01,
                                                                                                        0.1)
    assert seq.trainer.reestimate_batch_size == 5000 and seq.trainer.select_on == "batch"
    # the authors' scripts' RMSProp (the text's momentum 0.9 exploded at full length)
    assert (seq.trainer.momentum, seq.trainer.rmsprop_alpha, seq.trainer.rmsprop_eps) == (0.0, 0.5, 1e-5)
    text = load_config(compose(["experiment=paper_seqmnist", "trainer=rmsprop", "data.root=/x"]))
    assert (text.trainer.momentum, text.trainer.rmsprop_alpha, text.trainer.lr) == (0.9, 0.99, 1e-3)
    ptb = load_config(compose(["experiment=paper_ptb", "model=bnlstm", "data.root=/x"]))
    assert (ptb.model.hidden_size, ptb.task.batch_size, ptb.task.seq_len, ptb.trainer.optimizer, ptb.trainer.lr) == (
        1000, 64, 100, "adam", 2e-3)
    assert (ptb.trainer.clip_norm, ptb.trainer.max_epochs, ptb.model.stats_momentum, ptb.model.gamma_init) == (1.0, 50, 0.05,
                                                                                                        0.1)
    pm = load_config(compose(["experiment=paper_pmnist", "model=lstm", "data.root=/x"]))
    assert pm.task.permute and pm.task.name == "pmnist" and not pm.model.normalize.x
    assert (pm.trainer.momentum, pm.trainer.rmsprop_alpha) == (0.0, 0.5)


def test_the_sentences_preset_composes_to_its_documented_settings():
    """docs/results/sentences.md's runs: random batches, population statistics where fewer
    than 8 of 32 sentences run, and the test number with re-estimated statistics."""
    cfg = load_config(compose(["experiment=sentences", "model=bnlstm", "data.root=/x"]))
    assert (cfg.task.name, cfg.task.batch_size, cfg.task.bucketed, cfg.model.hidden_size) == ("ptb_sentences", 32, False,
                                                                                             256)
    assert (cfg.model.stats_min_sequences, cfg.model.stats_momentum, cfg.model.gamma_init) == (8, 0.05, 0.1)
    assert (cfg.trainer.optimizer, cfg.trainer.lr, cfg.trainer.max_steps) == ("adam", 2e-3, 3000)
    assert cfg.trainer.reestimate_stats and cfg.trainer.reestimate_batches == 50


def test_every_declared_key_reaches_the_composed_config():
    """Hydra knows every key (the schema is registered with it), so any can be overridden
    without a '+'."""
    cfg = OmegaConf.to_container(compose(["data.root=/x", "model.cuda_graphs=false", "trainer.rmsprop_eps=1e-6"]))
    for key, _ in declared(TrainConfig):
        if not key.startswith("task."):
            assert OmegaConf.select(OmegaConf.create(cfg), key, default="<absent>") != "<absent>", key
    assert json.dumps(cfg["trainer"]["rmsprop_eps"]) == "1e-06"


def test_train_help_lists_the_groups_a_user_picks_from_and_every_key():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bnrnn.cli", "train", "--help"], capture_output=True, text=True,
                            timeout=300)
    groups, _, config = result.stdout.partition("== The config")
    assert result.returncode == 0, result.stderr
    options = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    assert f"task: {', '.join(options)}" in groups and "task_schema" not in groups
    assert "rmsprop_eps: 1.0e-08" in config and "valid_reestimate_batches: 50" in config
