"""bnrnn sample: text from a PTB run, seeded, past T_max, refusing symbols it cannot write."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bnrnn.errors import ConfigError
from bnrnn.sample import sample_run, symbols_of, text_of
from bnrnn.train import train


@pytest.fixture(scope="module")
def ptb_run(tmp_path_factory, fake_ptb):
    from conftest import SMALL_PTB, compose

    run = tmp_path_factory.mktemp("ptb-run") / "run"
    train(compose([f"data.root={fake_ptb}", "data.download=false", *SMALL_PTB, "trainer.max_steps=3",
                   "trainer.test_at_end=false"]), run)
    return run


def test_a_seeded_sample_repeats_exactly(ptb_run):
    first = sample_run(ptb_run, prime="abc d", length=200, seed=7)
    assert len(first) == 200  # 10x the run's T_max of 19: the last step's statistics beyond it
    assert sample_run(ptb_run, prime="abc d", length=200, seed=7) == first
    assert sample_run(ptb_run, prime="abc d", length=200, seed=8) != first


def test_a_low_temperature_sample_is_the_most_likely_symbol_each_step(ptb_run):
    """At temperature 1e-7 every seed draws the argmax: the text does not depend on the seed."""
    cold = [sample_run(ptb_run, prime="a", length=50, temperature=1e-7, seed=seed) for seed in (1, 2)]
    assert cold[0] == cold[1]


def test_symbols_outside_the_vocabulary_are_named(ptb_run):
    with pytest.raises(ConfigError, match=r"outside the run's vocabulary: 'A', '\?' \(50 symbols"):
        sample_run(ptb_run, prime="a A? b", length=5)


def test_plain_text_and_ptb_symbols_convert_both_ways():
    assert symbols_of("ab c\n") == ["a", "b", "_", "c", "\n"]
    assert text_of(symbols_of("the cat\nsat")) == "the cat\nsat"


def test_a_classification_run_is_refused(tmp_path, small_mnist_cfg):
    train(small_mnist_cfg("trainer.max_steps=1", "trainer.test_at_end=false"), tmp_path / "run")
    with pytest.raises(ConfigError, match="bnrnn sample needs a language-modelling run"):
        sample_run(tmp_path / "run")


def test_the_command_prints_the_prime_and_the_sample(ptb_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "bnrnn.cli", "sample", str(ptb_run), "--prime", "ab",
                             "--length", "30", "--seed", "3"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ab") and result.stdout.rstrip("\n") == "ab" + sample_run(ptb_run, "ab", 30, seed=3)
    refused = subprocess.run([sys.executable, "-m", "bnrnn.cli", "sample", str(ptb_run), "--prime", "Zz"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "bnrnn: error: the priming text holds symbols outside the run's vocabulary: 'Z'" in refused.stderr
