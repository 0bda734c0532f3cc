"""Real processes, real signals: SIGKILL then resume is bit-identical; SIGTERM/SIGINT checkpoint and stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnrnn.checkpoint import load_checkpoint
from conftest import SMALL_MNIST, assert_same_final_weights, make_fake_mnist, without_clock



def command(root: Path, run_dir: Path, *overrides: str, log_every: int = 1, checkpoint_every: int = 3,
            test_at_end: bool = False) -> list[str]:
    return [sys.executable, "-m", "bnrnn.cli", "train", f"data.root={root}", "data.download=false",
            *[o for o in SMALL_MNIST if not o.startswith("trainer.log_every")], "model=bnlstm",
            f"trainer.log_every={log_every}", "trainer.eval_every=10", f"trainer.checkpoint_every={checkpoint_every}",
            f"trainer.test_at_end={str(test_at_end).lower()}", f"hydra.run.dir={run_dir}", *overrides]


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records in order, without what a clock decides."""
    return [without_clock(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def start_and_wait(cmd: list[str], run_dir: Path, cwd: Path, until_step: int) -> subprocess.Popen:
    """Start a training process; return once it has logged ``until_step`` (it keeps running)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while last_logged_step(run_dir) < until_step:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {until_step}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("training made no progress")
        time.sleep(0.005)
    return proc


def read_until(proc: subprocess.Popen, text: str) -> str:
    """Read the process's log (stdout, where Hydra's logging writes) line by line until a line
    holds ``text``; the process keeps running. Waits for an event the process reports, not for
    a sleep that may lose the race; returns what was read."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.wait(timeout=60)
    raise AssertionError(f"the process ended without printing {text!r}: {''.join(seen)[-2000:]}")


def test_sigkill_then_resume_equals_an_uninterrupted_run(fake_mnist, tmp_path):
    """Checkpoints every 7 steps, log records every 5: the kill's checkpoint falls inside a
    log window, whose sums the checkpoint carries, so that metrics.jsonl matches line for line."""
    steps = 120

    def run_command(run_dir, *more):
        return command(fake_mnist, run_dir, f"trainer.max_steps={steps}", *more, log_every=5, checkpoint_every=7)

    straight = tmp_path / "straight"
    done = subprocess.run(run_command(straight), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = start_and_wait(run_command(killed), killed, tmp_path, until_step=15)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    at_kill = load_checkpoint(killed / "checkpoints" / "last.pt")["progress"]["step"]
    assert 14 <= at_kill < steps, "the kill should land mid-run"
    assert at_kill % 5 != 0, "the checkpoint should fall between two log records"
    # Line-buffered logs: everything up to the kill is on disk, possibly past the checkpoint.
    assert last_logged_step(killed) >= at_kill

    resumed = subprocess.run(run_command(killed, "trainer.resume=true"), cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == steps
    assert a["progress"]["best_metric"] == b["progress"]["best_metric"]
    assert a["progress"]["best_step"] == b["progress"]["best_step"]
    assert_same_final_weights(straight, killed)  # weights and population statistics, bit for bit
    for key, value in a["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(b["optimizer"]["state"][key][name])), name

    # The resumed log reads as one run: every step once, the same validation numbers.
    def by_split(run_dir, split):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [without_clock(r) for r in lines if r["split"] == split]

    assert [r["step"] for r in by_split(killed, "train")] == list(range(5, steps + 1, 5))
    assert records(killed) == records(straight)  # the whole file, line for line

    # TensorBoard: the resumed run's purge drops the killed run's events past its checkpoint.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(killed))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(5, steps + 1, 5))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_checkpoints_the_finished_step_and_exits(fake_mnist, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = start_and_wait(command(fake_mnist, run, "trainer.max_steps=100000"), run, tmp_path, until_step=5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step" in stderr
    # the printed command, quoted for the shell, continues the run
    assert f"; continue with: bnrnn train hydra.run.dir={run.resolve()} trainer.resume=true" in stderr
    assert "Traceback" not in stderr
    step = int(stderr.split(f"stopped by {name} after step ")[1].split(";")[0])
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["progress"]["step"] == step >= 5
    assert last_logged_step(run) == step
    # and it continues from there
    more = subprocess.run(command(fake_mnist, run, f"trainer.max_steps={step + 2}", "trainer.resume=true"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["step"] == step + 2


def test_sigterm_during_the_final_test_stops_at_once_and_a_resume_runs_the_test(tmp_path):
    """The final test cannot be checkpointed halfway: a stop signal ends it at once (exit 143,
    no results.json), and the same command with trainer.resume=true runs it."""
    root = make_fake_mnist(tmp_path / "data", n_train=96, n_test=6000)  # a test long enough to be hit
    run = tmp_path / "run"
    cmd = command(root, run, "trainer.max_steps=4", "task.eval_batch_size=8", "trainer.eval_batches=1",
                  test_at_end=True)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    read_until(proc, "testing the best checkpoint")  # past the last validation, into the test
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM during the final test; the training is complete" in stderr
    assert "Traceback" not in stderr and not (run / "results.json").exists()
    again = subprocess.run(cmd + ["trainer.resume=true"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    events = [json.loads(line)["event"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert events == ["start", "stopped", "resume", "finished"]


def test_ctrl_c_twice_stops_at_once_with_one_sentence(fake_mnist, tmp_path):
    run = tmp_path / "run"
    # 256 units: a step long enough for the second Ctrl-C to land inside it
    proc = start_and_wait(command(fake_mnist, run, "trainer.max_steps=100000", "model.hidden_size=256"), run,
                          tmp_path, until_step=2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("bnrnn: error:")]
    assert len(errors) == 1, stderr
    assert "stopped at once by Ctrl-C" in errors[0] or "stopped by SIGINT after step" in errors[0]
    assert "trainer.resume=true" in errors[0]


def test_ctrl_c_during_start_up_is_one_sentence(fake_mnist, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(command(fake_mnist, run, "trainer.max_steps=100000"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / ".hydra").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("bnrnn: error:")]) == 1, stderr


def test_a_ctrl_c_after_a_sigterm_stops_at_once():
    """A scheduler's SIGTERM asks for a stop at the step's end; a Ctrl-C after it (as after a
    first Ctrl-C) stops at once, as the SIGTERM warning says; a second SIGTERM still waits."""
    from bnrnn.preemption import StopRequest

    stop = StopRequest()
    stop.handle(signal.SIGTERM, None)
    stop.handle(signal.SIGTERM, None)
    assert stop.requested and stop.name == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT, None)
