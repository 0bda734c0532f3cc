"""The paper's curves: shipped with the package, read right, drawn beside our runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bnrnn.paper import CURVES_DIR, PaperCurve, length_curves, validation_curve, write_tensorboard
from bnrnn.report import make_report
from bnrnn.train import train
from conftest import SMALL_MNIST, compose


def test_the_curves_ship_inside_the_package_with_their_source_note():
    assert CURVES_DIR.parent.name == "bnrnn"
    assert "cooijmanstim/recurrent-batch-normalization" in (CURVES_DIR / "README.md").read_text()


@pytest.mark.parametrize("task, model, step, value", [
    ("seqmnist", "bnlstm", 1000, 0.757), ("seqmnist", "bnlstm", 5000, 0.914), ("seqmnist", "bnlstm", 10000, 0.957),
    ("seqmnist", "lstm", 1000, 0.111), ("seqmnist", "lstm", 5000, 0.293),
    ("pmnist", "bnlstm", 1000, 0.656), ("pmnist", "bnlstm", 5000, 0.847), ("pmnist", "lstm", 20000, 0.868),
    ("ptb", "lstm", 0, 5.6414),
])
def test_paper_values_at_a_step(task, model, step, value):
    assert validation_curve(task, model).at(step) == pytest.approx(value, abs=6e-4)


def test_a_curve_interpolates_between_vertices_and_is_none_outside():
    curve = PaperCurve("c", (0.0, 10.0), (1.0, 3.0))
    assert curve.at(5) == 2.0 and curve.at(10) == 3.0
    assert curve.at(-1) is None and curve.at(11) is None
    ptb = validation_curve("ptb", "bnlstm")
    assert ptb.label == "paper: BN-LSTM (Fig. 3a)" and ptb.at(10 ** 6) is None
    assert validation_curve("seqmnist", "bnlstm_input") is None


def test_fig3b_series():
    curves = length_curves()
    assert set(curves) == {"lstm", "population", "batch"}
    assert curves["population"].at(100) == pytest.approx(1.398, abs=1e-4)
    # the paper's point: batch statistics generalise worse at every length past T_max
    assert all(curves["batch"].at(n) > curves["population"].at(n) for n in (200, 500, 1000))


@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory, fake_mnist):
    """An LSTM and a BN-LSTM of 4 steps on the generated MNIST, validated every 2."""
    root = tmp_path_factory.mktemp("runs")
    for model in ("lstm", "bnlstm"):
        cfg = compose([f"data.root={fake_mnist}", "data.download=false", *SMALL_MNIST, f"model={model}",
                       "trainer.max_steps=4", "trainer.valid_reestimate_batches=2"])
        train(cfg, root / model)
    return root


def test_the_report_figure_holds_the_papers_lines_and_every_mode(mnist_runs, tmp_path):
    written = make_report([mnist_runs], tmp_path / "report")
    lines = written["plotted"]["seqmnist"]
    paper = validation_curve("seqmnist", "bnlstm")
    # the paper's BN-LSTM, in percent, over the runs' range (4 steps, + 5 %): its point at 0,
    # then the value between its vertices at 0 and 500 at the panel's edge
    xs, ys = lines["paper: BN-LSTM (Fig. 2)"]
    assert xs == [0.0, 4.2] and ys == pytest.approx([100 * paper.y[0], 100 * paper.at(4.2)])
    assert "paper: LSTM (Fig. 2)" in lines
    valid = [json.loads(line) for line in (mnist_runs / "bnlstm" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in valid if r["split"] == "valid"]
    xs, ys = lines["BN-LSTM (batch statistics)"]
    assert xs == [2.0, 4.0] and ys == pytest.approx([100 * r["accuracy_batch"] for r in valid])
    xs, ys = lines["BN-LSTM (EMA population statistics)"]
    assert ys == pytest.approx([100 * r["accuracy_ema"] for r in valid])
    assert "BN-LSTM (re-estimated population statistics)" in lines and "LSTM" in lines


def test_the_report_figure_draws_the_paper_over_the_runs_range(tmp_path):
    """A synthetic 2,000-step log: the paper's line runs to 2,100 steps (5 % past the runs)."""
    run = tmp_path / "runs" / "bn"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task: {name: seqmnist, kind: mnist}\nmodel: {name: bnlstm}\n")
    records = [{"split": "train", "step": 2000, "elapsed": 1.0, "loss": 1.0}]
    records += [{"split": "valid", "step": s, "elapsed": s / 10, "accuracy": 0.5, "accuracy_batch": 0.5,
                 "accuracy_ema": 0.2, "stats": "batch"} for s in (1000, 2000)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = make_report([tmp_path / "runs"], tmp_path / "report")
    xs, ys = written["plotted"]["seqmnist"]["paper: BN-LSTM (Fig. 2)"]
    assert xs[0] == 0 and xs[-1] == pytest.approx(2100)
    assert ys[xs.index(1000.0)] == pytest.approx(75.70)
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| 50.00 % / 75.70 % |" in table  # ours / paper at 1k
    assert "| 50.00 % / 81.43 % (2000) |" in table  # at the last validation, 2k
    assert "| seqmnist | paper: BN-LSTM (Fig. 2) | most likely batch | 75.70 % | 81.43 % | 91.44 % | 95.68 % | - |" in table
    assert "| seqmnist | BN-LSTM | EMA population statistics | 20.00 % | 20.00 % | - | - | 20.00 % (2000) |" in table
    assert written["zoomed"]["seqmnist"] is None  # a short run: two panels


def test_a_run_at_the_papers_length_gets_its_columns_and_an_enlarged_panel(tmp_path):
    """A synthetic 60,500-step log, validated every 500 steps up to 60,000 and every 5,000 in
    EMA: columns at 25k and 50k (not 100k, not reached), the last validation named with its
    step, and a third panel over steps 30k-60.5k whose y axis holds the lines drawn there."""
    run = tmp_path / "runs" / "bn"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task: {name: seqmnist, kind: mnist}\nmodel: {name: bnlstm}\n")
    records = [{"split": "train", "step": 60500, "elapsed": 1.0, "loss": 1.0}]
    records += [{"split": "valid", "step": s, "elapsed": s / 10, "accuracy": min(0.5 + s / 100000, 0.985),
                 "accuracy_batch": min(0.5 + s / 100000, 0.985), "stats": "batch",
                 **({"accuracy_ema": 0.96} if s % 5000 == 0 else {})} for s in range(500, 60001, 500)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = make_report([tmp_path / "runs"], tmp_path / "report")
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| valid at 25k: ours / paper | valid at 50k: ours / paper | valid at the last validation (step)" in table
    assert "| 75.00 % / 97.94 % | 98.50 % / 98.44 % | 98.50 % / 98.39 % (60000) |" in table
    assert "| seqmnist | BN-LSTM | EMA population statistics | - | - | 96.00 % | 96.00 % | 96.00 % | 96.00 % | " \
           "96.00 % (60000) |" in table
    (xlim, ylim) = written["zoomed"]["seqmnist"]
    assert xlim == (30250, pytest.approx(63525))
    # from the 5th percentile of what is drawn there (ours from 80.5 %, the EMA's 96 %, the
    # paper's ~98 %): our lowest few points go off the panel, the rest stays on it
    assert 80.5 < ylim[0] < 96.0 and 98.94 < ylim[1] <= 100.2


def test_paper_curves_are_written_as_tensorboard_runs_under_our_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = write_tensorboard(tmp_path / "paper")
    assert {f.name for f in folders} >= {"seqmnist-bnlstm", "pmnist-lstm", "ptb-bnlstm", "ptb-lengths"}
    events = EventAccumulator(str(tmp_path / "paper" / "seqmnist-bnlstm"))
    events.Reload()
    assert {"valid/accuracy", "valid/accuracy_batch"} <= set(events.Tags()["scalars"])
    points = {e.step: e.value for e in events.Scalars("valid/accuracy")}
    assert points[1000] == pytest.approx(0.757) and max(points) == 100000


def test_paper_curves_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bnrnn.cli", "paper-curves", "--out", str(tmp_path / "paper")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "seqmnist-bnlstm" in result.stdout and (tmp_path / "paper" / "ptb-bnlstm").is_dir()


def test_paper_curves_by_default_beside_the_published_runs_and_never_into_a_run(tmp_path):
    """The default folder (runs/paper-curves) is not runs/paper, where the campaign's runs live
    under the same task-model names; a folder that holds a run is refused, untouched."""
    run = tmp_path / "runs" / "paper-curves" / "seqmnist-bnlstm"
    run.mkdir(parents=True)
    (run / "history.jsonl").write_text("{}\n")
    result = subprocess.run([sys.executable, "-m", "bnrnn.cli", "paper-curves"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"bnrnn: error: {Path('runs/paper-curves/seqmnist-bnlstm')} holds a bnrnn run; "
                                     f"write the paper's curves elsewhere with --out")
    assert [p.name for p in run.iterdir()] == ["history.jsonl"]
    assert not (tmp_path / "runs" / "paper-curves" / "pmnist-lstm").exists()


def test_time_to_a_result_leaves_evaluation_out_of_the_step_time(tmp_path):
    from bnrnn.report import find_runs
    from bnrnn.report_tables import paper_step_to, seconds_per_step, time_to

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: {name: seqmnist, kind: mnist}\nmodel: {name: bnlstm}\n")
    records = [
        {"split": "train", "step": 20, "elapsed": 10.0}, {"split": "train", "step": 40, "elapsed": 20.0},
        {"split": "valid", "step": 40, "elapsed": 50.0, "accuracy": 0.85},  # 30 s of validation
        {"split": "train", "step": 60, "elapsed": 60.0}, {"split": "train", "step": 80, "elapsed": 70.0},
        {"split": "valid", "step": 80, "elapsed": 100.0, "accuracy": 0.95},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (loaded,) = find_runs([run])
    assert seconds_per_step(loaded) == 0.5
    assert time_to(loaded, "accuracy", 0.8) == "40 (1 min)" and time_to(loaded, "accuracy", 0.9) == "80 (2 min)"
    assert time_to(loaded, "accuracy", 0.99) == "-"
    # where the paper's BN-LSTM curve (Fig. 2) first reached them, read off its vertices
    assert [paper_step_to(loaded, t) for t in (0.8, 0.9, 0.98)] == ["2000", "3500", "24500"]
