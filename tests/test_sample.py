"""bnrnn sample: text from a PTB run, seeded, past T_max, refusing symbols it cannot write."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bnrnn.errors import ConfigError, DataError
from bnrnn.evaluate import evaluate_run
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


def test_a_vanishing_temperature_is_the_argmax_and_an_infinite_one_is_refused(ptb_run):
    """1e-320 scales the logits past float64's range: sampled as its limit, the most likely symbol."""
    assert sample_run(ptb_run, prime="a", length=50, temperature=1e-320, seed=1) == sample_run(
        ptb_run, prime="a", length=50, temperature=1e-7, seed=2)
    for bad in (float("inf"), 0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match=r"--temperature .* is invalid: it must be a positive finite number"):
            sample_run(ptb_run, length=5, temperature=bad)


def test_a_reader_that_stops_early_stops_the_sample_quietly(ptb_run, tmp_path):
    """bnrnn sample ... | head -c 5: no BrokenPipeError traceback, the status of a tool the pipe stopped."""
    done = subprocess.run(f"{sys.executable} -m bnrnn.cli sample '{ptb_run}' --length 100000 | head -c 5; "
                          f"echo \" ${{PIPESTATUS[0]}}\"", shell=True, executable="/bin/bash", capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.stderr == ""
    text, status = done.stdout.rsplit(" ", 1)
    assert len(text) == 5 and status.strip() == "141"


@pytest.mark.parametrize("content, problem", [
    ('["a", "b"', "Expecting"), ('{"a": 1}', "not a JSON list of symbols"), ('["a", "a"]', "not distinct"),
])
def test_a_broken_vocabulary_is_named(ptb_run, tmp_path, fake_ptb, content, problem):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ptb_run, run)
    (run / "vocab.json").write_text(content)
    with pytest.raises(DataError, match=rf"vocab.json is not a vocabulary file \(.*{problem}.*\); delete it"):
        sample_run(run, length=5)
    with pytest.raises(DataError, match=rf"vocab.json is not a vocabulary file \(.*{problem}.*\); delete it"):
        evaluate_run(run, data_root=str(fake_ptb))  # eval and a resume read it the same way
    assert not (run / "eval").exists()


def test_another_runs_vocabulary_is_named_not_blamed_on_the_checkpoint(ptb_run, tmp_path):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ptb_run, run)
    symbols = json.loads((run / "vocab.json").read_text())
    (run / "vocab.json").write_text(json.dumps(symbols[:-3]))
    with pytest.raises(DataError, match=rf"vocab.json holds {len(symbols) - 3} symbols, but .*best.pt was trained on "
                                        rf"{len(symbols)}: it is not this run's vocabulary"):
        sample_run(run, length=5)
