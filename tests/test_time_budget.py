"""trainer.max_time: a run that outlives its process stops at a step boundary past its budget,
checkpointed, with the command that continues it; the continued run is the uninterrupted one.
Also what each segment of a run records: the code that ran it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch

from bnrnn.checkpoint import load_checkpoint
from bnrnn.config import load_config
from bnrnn.durations import format_duration, parse_duration
from bnrnn.errors import ConfigError
from bnrnn.provenance import SOURCE, cpu_name
from bnrnn.runfolder import read_history, resume_command
from bnrnn.train import Launch, train
from conftest import SMALL_MNIST, assert_same_final_weights, compose, without_clock


@pytest.mark.parametrize("text, seconds", [
    ("2h50m", 10200), ("45m", 2700), ("90s", 90), ("1d6h", 108000), ("2h50m12s", 10212), ("3600", 3600),
    ("90.5", 90.5), ("00:02:50:00", 10200), ("1:00:00:01", 86401), (" 2H 5M ", 7500), (7200, 7200),
])
def test_durations_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0", "0s", "-5", "2x", "h", "1:2:3", "5m2h", "1e3", "inf"])
def test_what_is_not_a_duration_is_refused(text):
    with pytest.raises(ValueError, match="a positive duration"):
        parse_duration(text)


def test_durations_print_with_their_largest_unit_first():
    assert [format_duration(s) for s in (5, 65, 10212, 108000)] == ["5s", "1m05s", "2h50m12s", "30h00m00s"]


def test_a_bad_max_time_is_one_sentence_naming_the_key(fake_mnist):
    with pytest.raises(ConfigError) as caught:
        load_config(compose([f"data.root={fake_mnist}", *SMALL_MNIST, "trainer.max_time=2x"]))
    assert str(caught.value) == ("trainer.max_time=2x is invalid: it must be a positive duration: a number of seconds, "
                                 "units such as 2h50m or 45m, or DD:HH:MM:SS (or null)")


def test_past_its_budget_a_run_checkpoints_and_stops_and_the_resume_equals_an_uninterrupted_run(small_mnist_cfg,
                                                                                               tmp_path):
    """A launch whose budget is already spent (it began an hour ago) stops at the first step
    boundary: step 1, checkpointed, recorded; a resume with a new trainer.max_time (an
    accepted change) runs to the end onto the weights and records of a run never stopped."""
    common = ("model=bnlstm", "model.h0_noise=0.1", "trainer.max_steps=6", "trainer.test_at_end=false")
    train(small_mnist_cfg(*common), tmp_path / "straight")

    run = tmp_path / "stopped"
    hour_ago = Launch(new_folder=True, began=time.monotonic() - 3600)
    results = train(small_mnist_cfg(*common, "trainer.max_time=30m"), run, hour_ago)
    assert results["stopped"] == "max_time" and results["steps"] == 1
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["step"] == 1
    assert not (run / "results.json").exists()  # the run is not finished
    stop = read_history(run)[-1]
    assert stop["event"] == "max_time" and stop["step"] == 1
    assert stop["reason"].startswith("trainer.max_time=30m reached after ") and stop["reason"].endswith(
        "stopped at step 1 of 6")
    assert stop["resume_with"] == f"bnrnn train hydra.run.dir={run.resolve()} trainer.resume=true"

    args = ["trainer.resume=true", "trainer.max_time=1h"]
    again = train(compose(args), run, Launch(overrides=args))
    assert again["steps"] == 6 and "stopped" not in again
    assert [r["event"] for r in read_history(run)] == ["start", "max_time", "resume", "finished"]
    assert read_history(run)[2]["changes"] == {"trainer.max_time": ["30m", "1h"]}
    assert_same_final_weights(tmp_path / "straight", run)

    def records(folder):
        return [without_clock(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert records(run) == records(tmp_path / "straight")


def test_the_cli_stops_with_exit_0_and_its_printed_command_continues_the_run(fake_mnist, tmp_path):
    """End to end: a 1 ms budget is spent before the first step ends (start-up alone takes
    longer); the process exits 0 with one line naming the step and the command, which,
    pasted into a shell, finishes the run, even with a space in the folder's name."""
    run = tmp_path / "a run"
    cmd = [sys.executable, "-m", "bnrnn.cli", "train", f"data.root={fake_mnist}", "data.download=false", *SMALL_MNIST,
           "trainer.max_steps=4", "trainer.test_at_end=false", "trainer.max_time=0.001", f"hydra.run.dir={run}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "trainer.max_time=0.001 reached" in line]
    assert "stopped at step 1 of 4" in line and str(run / "checkpoints" / "last.pt") in line
    command = line.split("continue with: ")[1]
    assert command == f"""bnrnn train "hydra.run.dir='{run.resolve()}'" trainer.resume=true"""
    # the printed command, as a user pastes it (bnrnn the venv's, as on a user's PATH);
    # the budget it keeps from config.yaml is overridden, as the docs say
    shell = command.replace("bnrnn train", f"{sys.executable} -m bnrnn.cli train", 1) + " trainer.max_time=null"
    resumed = subprocess.run(shell, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    assert [r["event"] for r in read_history(run)] == ["start", "max_time", "resume", "finished"]


@pytest.mark.parametrize("name", ["plain", "a run", "trainer.lr=0.001,model=lstm", "it's", 'say "hi" $HOME'])
def test_the_resume_command_pastes_whatever_the_folder_is_called(tmp_path, name):
    """The shell splits the command into the words bnrnn gets, and Hydra reads the folder back
    whole: a sweep job's name (= and ,) is not a sweep, a space not two arguments."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run = tmp_path / name
    words = shlex.split(resume_command(run))
    assert words[:2] == ["bnrnn", "train"] and words[3:] == ["trainer.resume=true"]
    (override,) = OverridesParser.create().parse_overrides([words[2]])
    assert override.key_or_group == "hydra.run.dir" and override.value() == str(run.resolve())
    if name == "plain":
        assert resume_command(run) == f"bnrnn train hydra.run.dir={run.resolve()} trainer.resume=true"


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def test_each_segment_of_a_run_records_the_code_and_the_machine_that_ran_it(small_mnist_cfg, tmp_path):
    train(small_mnist_cfg("trainer.max_steps=2", "trainer.test_at_end=false"), tmp_path)
    train(small_mnist_cfg("trainer.max_steps=4", "trainer.test_at_end=false", "trainer.resume=true"), tmp_path)
    import bnrnn

    starts = [r for r in read_history(tmp_path) if r["event"] in ("start", "resume")]
    assert len(starts) == 2
    head = git("rev-parse", "HEAD") if git("rev-parse", "--show-toplevel") == str(SOURCE) else None
    for record in starts:
        assert record["code"]["version"] == bnrnn.__version__
        assert record["machine"] == {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                     "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                                     "torch": torch.__version__}  # a CPU run: no "gpu"
        assert record["machine"]["cpu"]  # a name, whatever the platform
        if head is None:  # bnrnn installed from a wheel: no commit to name
            assert "commit" not in record["code"]
        else:
            assert record["code"]["commit"] == head
            assert record["code"]["dirty"] == bool(git("status", "--porcelain"))
