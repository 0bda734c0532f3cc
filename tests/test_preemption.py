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
from conftest import SMALL_MNIST, assert_same_final_weights



def command(root: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "bnrnn.cli", "train", f"data.root={root}", "data.download=false", *SMALL_MNIST,
            "model=bnlstm", "trainer.log_every=1", "trainer.eval_every=10", "trainer.checkpoint_every=3",
            "trainer.test_at_end=false", f"hydra.run.dir={run_dir}", *overrides]


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


def test_sigkill_then_resume_equals_an_uninterrupted_run(fake_mnist, tmp_path):
    steps = 120
    straight = tmp_path / "straight"
    done = subprocess.run(command(fake_mnist, straight, f"trainer.max_steps={steps}"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = start_and_wait(command(fake_mnist, killed, f"trainer.max_steps={steps}"), killed, tmp_path, until_step=14)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    at_kill = load_checkpoint(killed / "checkpoints" / "last.pt")["progress"]["step"]
    assert 12 <= at_kill < steps, "the kill should land mid-run"
    # Line-buffered logs: everything up to the kill is on disk, possibly past the checkpoint.
    assert last_logged_step(killed) >= at_kill

    resumed = subprocess.run(command(fake_mnist, killed, f"trainer.max_steps={steps}", "trainer.resume=true"),
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
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
        return [{k: v for k, v in r.items() if k not in ("time", "elapsed") and not k.startswith("seconds")}
                for r in lines if r["split"] == split]

    assert [r["step"] for r in by_split(killed, "train")] == list(range(1, steps + 1))
    assert by_split(killed, "valid") == by_split(straight, "valid")
    assert by_split(killed, "train") == by_split(straight, "train")

    # TensorBoard: the resumed run's purge drops the killed run's events past its checkpoint.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(killed))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_checkpoints_the_finished_step_and_exits(fake_mnist, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = start_and_wait(command(fake_mnist, run, "trainer.max_steps=100000"), run, tmp_path, until_step=5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step" in stderr and "trainer.resume=true" in stderr
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
