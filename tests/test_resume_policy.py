"""A resume continues the run as it was made, with exactly the changes given, recorded.

``Launch(overrides=...)`` is what ``bnrnn train`` passes: the command line's overrides, so
that only those apply over the run's own config.yaml (docs/reliability.md, "Resuming").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bnrnn.checkpoint import load_checkpoint
from bnrnn.errors import ConfigError
from bnrnn.runfolder import read_history, saved_choices
from bnrnn.runlock import LOCK_FILE, RunBusyError, RunLock
from bnrnn.train import Launch, train
from conftest import SMALL_MNIST, compose


def first_run(root: Path, run: Path, *overrides: str) -> list[str]:
    """Train 4 steps with SMALL_MNIST on ``root``; return the overrides used."""
    args = [f"data.root={root}", "data.download=false", *SMALL_MNIST, "trainer.max_steps=4",
            "trainer.test_at_end=false", *overrides]
    launch = Launch(overrides=args, choices={"task": "seqmnist", "model": "bnlstm", "trainer": "rmsprop",
                                             "device": "auto", "experiment": None}, new_folder=True)
    train(compose(args), run, launch)
    return args


def resume(run: Path, *overrides: str) -> dict:
    """What ``bnrnn train hydra.run.dir=RUN trainer.resume=true OVERRIDES`` does: a config
    composed from those overrides alone (defaults elsewhere), the overrides passed along."""
    args = ["trainer.resume=true", *overrides]
    return train(compose(args), run, Launch(overrides=args))


def test_the_readme_resume_command_continues_with_the_runs_own_settings(fake_mnist, tmp_path):
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    before = (run / "config.yaml").read_text()
    results = resume(run, "trainer.max_steps=6")  # no data.root, no sizes: the run's own are kept
    assert results["steps"] == 6
    after = (run / "config.yaml").read_text()
    assert after == before.replace("max_steps: 4", "max_steps: 6").replace("resume: false", "resume: true")
    history = read_history(run)
    assert [r["event"] for r in history] == ["start", "finished", "resume", "finished"]
    assert history[2]["step"] == 4 and history[2]["changes"] == {"trainer.max_steps": [4, 6]}


def test_only_the_start_records_the_config_group_options(fake_mnist, tmp_path):
    """A resume's command composes Hydra's defaults (model=bnlstm): its record must not claim
    them for a run made with model=lstm, and the run's options stay the start's."""
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    args = ["trainer.resume=true", "trainer.max_steps=5"]
    defaults = {"task": "seqmnist", "model": "lstm", "trainer": "adam", "device": "auto", "experiment": None}
    train(compose(args), run, Launch(overrides=args, choices=defaults))
    history = read_history(run)
    assert [r["event"] for r in history] == ["start", "finished", "resume", "finished"]
    assert history[0]["choices"]["model"] == "bnlstm" and "choices" not in history[2]
    assert saved_choices(run)["trainer"] == "rmsprop"


def test_a_new_learning_rate_takes_effect_and_is_recorded(fake_mnist, tmp_path):
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    resume(run, "trainer.max_steps=6", "trainer.lr=0.002")
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert [g["lr"] for g in payload["optimizer"]["param_groups"]] == [0.002]
    assert payload["config"]["trainer"]["lr"] == 0.002
    assert read_history(run)[-2]["changes"] == {"trainer.lr": [0.001, 0.002], "trainer.max_steps": [4, 6]}


def test_a_hand_edit_of_config_yaml_is_applied_and_recorded(fake_mnist, tmp_path):
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.001", "lr: 0.002").replace("max_steps: 4", "max_steps: 5"))
    resume(run)
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["progress"]["step"] == 5
    assert payload["optimizer"]["param_groups"][0]["lr"] == 0.002
    assert read_history(run)[-2]["changes"] == {"trainer.lr": [0.001, 0.002], "trainer.max_steps": [4, 5]}


def test_the_runs_own_group_option_changes_nothing(fake_mnist, tmp_path):
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    # model=bnlstm is the run's choice: it does not bring back bnlstm.yaml's hidden_size of 100
    resume(run, "model=bnlstm", "trainer.max_steps=5")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["model"]["hidden_size"] == 8


def test_momentum_switched_on_at_a_resume_gets_its_buffer(fake_mnist, tmp_path):
    run = tmp_path / "run"
    first_run(fake_mnist, run, "trainer=rmsprop_authors")  # momentum 0: no buffer in the saved state
    resume(run, "trainer.max_steps=6", "trainer.momentum=0.5")
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["optimizer"]["param_groups"][0]["momentum"] == 0.5
    assert all("momentum_buffer" in s for s in payload["optimizer"]["state"].values())


def test_a_lock_left_by_a_dead_process_is_taken_over(fake_mnist, tmp_path):
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    (run / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday", "command": []}))
    resume(run, "trainer.max_steps=5")
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_live_lock_refuses_a_second_writer_naming_it(fake_mnist, tmp_path):
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    with RunLock(run):
        with pytest.raises(RunBusyError, match=rf"another bnrnn process is writing to {run} \(pid {os.getpid()} on "):
            resume(run, "trainer.max_steps=5")
    assert read_history(run)[-1]["event"] == "finished"  # the refused launch recorded nothing


def test_a_missing_best_checkpoint_is_chosen_again(fake_mnist, tmp_path):
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    (run / "checkpoints" / "best.pt").unlink()
    results = resume(run, "trainer.max_steps=6", "trainer.test_at_end=true")
    assert results["best_step"] == 6 and (run / "checkpoints" / "best.pt").is_file()
    assert "test_accuracy" in results


def test_a_start_up_error_removes_the_folder_it_created(tmp_path):
    from conftest import make_fake_mnist
    from bnrnn.errors import DataError

    root = make_fake_mnist(tmp_path / "data", n_train=96, n_test=8)
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is corrupt"):
        first_run(root, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_config_error_in_a_resume_names_the_key(fake_mnist, tmp_path):
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    with pytest.raises(ConfigError, match="trainer.lr=-1.0 is invalid"):
        resume(run, "trainer.lr=-1")


def test_the_docs_list_every_key_the_resume_policy_fixes():
    """Every key the schema and the paper's tasks fix (a task added later declares its own
    with ``fixed=`` in its module, which the resume policy reads with no other edit)."""
    from bnrnn.resume import FIXED_ON_RESUME, INIT_ONLY
    from bnrnn.schema import TrainConfig, declared
    from bnrnn.tasks import task_class

    docs = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    paper_keys = {key for key, _ in declared(TrainConfig)}
    for kind in ("mnist", "ptb"):
        paper_keys |= {key for key, _ in declared(task_class(kind).Settings, "task.")}
    assert paper_keys & set(FIXED_ON_RESUME) and set(INIT_ONLY) <= paper_keys
    for key in [*FIXED_ON_RESUME, *INIT_ONLY]:
        if key in paper_keys:
            assert f"`{key}`" in docs, key
            assert FIXED_ON_RESUME.get(key, "") in docs, key


def test_a_run_saved_with_a_since_removed_setting_still_resumes(fake_mnist, tmp_path, caplog):
    run = tmp_path / "run"
    first_run(fake_mnist, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("model:\n", "model:\n  retired: true\n", 1))  # a setting since removed
    with caplog.at_level("WARNING", logger="bnrnn"):
        resume(run, "trainer.max_steps=5")
    assert "settings this version no longer has are ignored: model.retired" in caplog.text
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["step"] == 5


def test_a_run_saved_with_every_tasks_keys_resumes_without_a_word(fake_mnist, tmp_path, caplog):
    """Before each task had its own keys, an MNIST run's config.yaml and checkpoint held PTB's
    too (task.seq_len, task.eval_chunk), as the campaign runs under runs/paper/ do: those are
    dropped quietly, and the run goes on."""
    import torch

    run = tmp_path / "run"
    first_run(fake_mnist, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("task:\n", "task:\n  seq_len: 100\n  eval_chunk: 100\n", 1))
    last = run / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    payload["config"]["task"].update(seq_len=100, eval_chunk=100)
    torch.save(payload, last)
    with caplog.at_level("WARNING", logger="bnrnn"):
        resume(run, "trainer.max_steps=5")
    assert "no longer has" not in caplog.text
    assert load_checkpoint(last)["progress"]["step"] == 5
    assert "seq_len" not in config.read_text()


KILL_AT_STEP_3 = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from bnrnn import runlog
from bnrnn.train import Launch, train
from conftest import compose

logged = runlog.RunLogger.log

def log_then_die(self, split, step, metrics):  # SIGKILL: no handler runs, no closing record
    logged(self, split, step, metrics)
    if split == "train" and step == 3:
        os.kill(os.getpid(), signal.SIGKILL)

runlog.RunLogger.log = log_then_die
train(compose({args!r}), {run!r}, Launch(overrides={args!r}, new_folder=True))
"""


def test_a_resume_after_a_kill_records_the_killed_segment_and_runs_its_lost_steps_again(fake_mnist, tmp_path,
                                                                                       caplog):
    """A process killed by SIGKILL writes no closing record. The resume names that segment
    (its pid, where it began, the last step it logged) in its own record and in the log,
    goes on from the checkpoint at step 2, and ends as a run never killed."""
    import subprocess
    import sys

    from conftest import assert_same_final_weights, without_clock

    args = [f"data.root={fake_mnist}", "data.download=false", *SMALL_MNIST, "trainer.max_steps=6",
            "trainer.test_at_end=false"]
    train(compose(args), tmp_path / "straight", Launch(overrides=args, new_folder=True))
    run = tmp_path / "killed"
    script = KILL_AT_STEP_3.format(tests=str(Path(__file__).parent), args=args, run=str(run))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr
    assert [r["event"] for r in read_history(run)] == ["start"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["step"] == 2
    assert campaign_state(run) == "killed"  # scripts/campaign.py status's word for it

    with caplog.at_level("WARNING", logger="bnrnn"):
        resume(run)
    history = read_history(run)
    assert [r["event"] for r in history] == ["start", "resume", "finished"]
    killed = history[0]  # the child's start record
    assert killed["pid"] != os.getpid() and history[1]["step"] == 2
    assert history[1]["after_kill"] == {"event": "start", "from_step": 0, "time": killed["time"],
                                        "host": killed["host"], "pid": killed["pid"], "last_logged_step": 3}
    assert (f"the previous segment of this run (pid {killed['pid']} on {killed['host']}, from step 0) "
            "ended without a record: it was killed; it had logged up to step 3, and goes on from its checkpoint "
            "at step 2") in caplog.text
    assert_same_final_weights(tmp_path / "straight", run)

    def records(folder):
        return [without_clock(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert records(run) == records(tmp_path / "straight")  # the killed step 3 was cut, then run again
    assert campaign_state(run) == "finished"
    resume(run, "trainer.max_steps=7")  # a resume after a closed segment names no kill
    assert "after_kill" not in read_history(run)[-2]


def campaign_state(run: Path) -> str:
    """How scripts/campaign.py (standard library only) reads the run's last segment's end."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "campaign.py"
    spec = importlib.util.spec_from_file_location("campaign", path)
    campaign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(campaign)
    return campaign.ended(read_history(run))
