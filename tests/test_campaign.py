"""scripts/campaign.py status: how long a live run has left at its current pace."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("campaign", Path(__file__).resolve().parents[1] / "scripts" / "campaign.py")
campaign = importlib.util.module_from_spec(spec)
spec.loader.exec_module(campaign)


def records(start_step: int, start_time: float, seconds_a_step: float, count: int, every: int = 20) -> list[dict]:
    return [{"split": "train", "step": start_step + i * every, "time": start_time + i * every * seconds_a_step}
            for i in range(count)]


def test_the_pace_is_the_last_hours_wall_clock_a_step_within_the_current_segment():
    earlier = records(0, 0.0, 0.3, 500)  # a fast earlier segment, then a pause of 2 hours
    now = records(10000, earlier[-1]["time"] + 7200, 0.6, 100)
    assert campaign.pace(earlier + now) == pytest.approx(0.6)
    long = records(0, 0.0, 0.5, 1000) + records(20000, 10000.0, 0.8, 300)  # joined in time: only the last hour
    assert campaign.pace(long) == pytest.approx(0.8)
    assert campaign.pace(records(0, 0.0, 0.5, 1)) is None


def test_the_target_is_read_from_the_runs_start_line(tmp_path):
    (tmp_path / "train.log").write_text(
        "[2026-12-07 14:50:08][bnrnn][INFO] - seqmnist / bnlstm: 43010 parameters, 100000 steps (500 per epoch) on cpu\n")
    assert campaign.target_steps(tmp_path) == 100000
    assert campaign.target_steps(tmp_path / "nowhere") is None
