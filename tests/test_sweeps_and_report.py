"""Sweeps on real launchers, the reproduction script, and `bnrnn report`."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bnrnn.config import load_config
from bnrnn.report import figure_title, make_report
from bnrnn.train import train
from conftest import SMALL_MNIST, compose

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=4", "task.batch_size=16", "task.valid_size=32", "trainer.max_steps=2",
        "trainer.eval_every=1", "trainer.test_at_end=false"]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_two_job_sweep_on_a_launcher_plugin(tmp_path, fake_mnist, launcher):
    pytest.importorskip({"joblib": "hydra_plugins.hydra_joblib_launcher",
                         "submitit_local": "hydra_plugins.hydra_submitit_launcher"}[launcher])
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=10"]
    result = subprocess.run(
        [sys.executable, "-m", "bnrnn.cli", "train", "-m", f"hydra/launcher={launcher}", *extra, "model=lstm,bnlstm",
         f"data.root={fake_mnist}", "data.download=false", *TINY],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    finished = sorted((tmp_path / "runs" / "multirun").glob("*/*/results.json"))
    models = sorted(next(part for part in p.parent.name.split(",") if part.startswith("model=")) for p in finished)
    assert models == ["model=bnlstm", "model=lstm"]
    for path in finished:
        assert json.loads(path.read_text())["steps"] == 2
    # no progress bars from parallel jobs
    assert "it/s" not in result.stderr


def test_every_reproduction_command_composes_to_a_valid_config():
    printed = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_paper.sh"), "--dry-run", "all",
                              "data.root=/data"], capture_output=True, text=True, check=True).stdout.splitlines()
    sweeps = [shlex.split(line) for line in printed if line.startswith("bnrnn train -m")]
    assert len(sweeps) == 6 and any(line.startswith("bnrnn gradflow") for line in printed)
    jobs = 0
    for words in sweeps:
        overrides = words[3:]
        # every combination of the comma lists must compose; check each value once
        lists = [o.split("=", 1) for o in overrides]
        width = max(len(value.split(",")) for _, value in lists)
        for i in range(width):
            chosen = [f"{key}={value.split(',')[min(i, len(value.split(',')) - 1)]}" for key, value in lists]
            cfg = load_config(compose(chosen))
            assert cfg.data.root == "/data"
            jobs += 1
    assert jobs >= 6 + 5 + 5  # fig2 + fig3 pairs, both gamma sweeps


def test_a_reproduction_script_without_a_figure_is_a_usage_error():
    result = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_paper.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, fake_mnist):
    """An LSTM and a BN-LSTM run of 4 steps, validated every 2."""
    root = tmp_path_factory.mktemp("sweep")
    for model in ("lstm", "bnlstm"):
        cfg = compose([f"data.root={fake_mnist}", "data.download=false", *SMALL_MNIST, f"model={model}",
                       "trainer.max_steps=4"])
        train(cfg, root / f"model={model}")
    return root


def test_report_writes_figures_and_a_table_beside_the_paper(two_runs, tmp_path):
    written = make_report([two_runs], tmp_path / "report")
    assert written["runs"] == 2
    assert (tmp_path / "report" / "seqmnist.png").stat().st_size > 10_000
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| seqmnist | LSTM | 4 |" in table and "| seqmnist | BN-LSTM | 4 |" in table
    assert "98.90 %" in table and "99.00 %" in table  # the paper's test accuracies
    assert " pt |" in table and "finished" in table
    assert "![seqmnist](seqmnist.png)" in table or "![seqmnist](seqmnist.png)" in (tmp_path / "report" / "report.md").read_text()


def test_report_labels_runs_by_the_settings_that_differ(tmp_path, fake_mnist):
    for gamma in ("0.1", "0.3"):
        cfg = compose([f"data.root={fake_mnist}", "data.download=false", *SMALL_MNIST, "model=bnlstm",
                       f"model.gamma_init={gamma}", "trainer.max_steps=2", "trainer.test_at_end=false"])
        train(cfg, tmp_path / "sweep" / gamma)
    table = make_report([tmp_path / "sweep"], tmp_path / "report")["table"]
    assert "| BN-LSTM gamma_init=0.1 |" in table and "| BN-LSTM gamma_init=0.3 |" in table


def test_report_on_a_partial_or_crashed_run(two_runs, tmp_path):
    import shutil

    run = tmp_path / "crashed"
    shutil.copytree(two_runs / "model=bnlstm", run)
    (run / "results.json").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 5, "lo')  # torn by a kill
    table = make_report([run], tmp_path / "report")["table"]
    assert "partial" in table and "1 unreadable log line(s) skipped" in table
    # a run that has not validated yet: a row, no figure, no traceback
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 2.3, "elapsed": 1.0}\n')
    written = make_report([fresh], tmp_path / "report2")
    assert "no validation yet" in written["table"] and written["figures"] == []


def test_report_on_a_folder_without_runs_is_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "bnrnn.cli", "report", str(tmp_path / "empty"), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no runs found under" in result.stderr and "Traceback" not in result.stderr
    missing = subprocess.run([sys.executable, "-m", "bnrnn.cli", "report", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_finished_runs_register_in_the_hparams_tab(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(two_runs / "model=bnlstm"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "hparam/valid_accuracy" in tags and "hparam/test_accuracy" in tags


def test_report_names_the_models_and_draws_layer_norm_as_normalised(tmp_path, fake_mnist):
    from bnrnn.report import Run

    for model in ("lnlstm", "lstm"):
        cfg = compose([f"data.root={fake_mnist}", "data.download=false", *SMALL_MNIST, f"model={model}",
                       "trainer.max_steps=2", "trainer.test_at_end=false"])
        train(cfg, tmp_path / "runs" / model)
    table = make_report([tmp_path / "runs"], tmp_path / "report")["table"]
    assert "| seqmnist | LN-LSTM | 2 |" in table and "| seqmnist | LSTM | 2 |" in table
    assert Run(tmp_path, {"model": {"name": "lnlstm", "normalize": {"x": True, "h": True, "c": True}}}, []).normalised
    assert not Run(tmp_path, {"model": {"name": "lstm", "normalize": {"x": False, "h": False, "c": False}}}, []).normalised


def test_a_key_an_older_run_lacks_counts_as_its_default(tmp_path):
    """A run logged before model.num_layers existed was a one-layer model: against a 2-layer
    run both are labelled by it."""
    from bnrnn.report import Run, assign_labels

    old = Run(tmp_path / "old", {"task": {"name": "ptb"}, "model": {"name": "bnlstm"}}, [])
    new = Run(tmp_path / "new", {"task": {"name": "ptb"}, "model": {"name": "bnlstm", "num_layers": 2}}, [])
    assign_labels([old, new])
    assert (old.label, new.label) == ("BN-LSTM num_layers=1", "BN-LSTM num_layers=2")


def test_runs_that_differ_by_a_config_group_are_labelled_by_its_option(tmp_path):
    """trainer=rmsprop_authors against trainer=rmsprop: the option as typed, not the three
    settings it changes. A setting that also differs within one option stays named."""
    from bnrnn.report import Run, assign_labels

    def run(name: str, trainer: str, lr: float, momentum: float) -> Run:
        config = {"task": {"name": "seqmnist"}, "model": {"name": "bnlstm"},
                  "trainer": {"optimizer": "rmsprop", "lr": lr, "momentum": momentum}}
        return Run(tmp_path / name, config, [], choices={"trainer": trainer, "model": "bnlstm"})

    authors, preset = run("a", "rmsprop_authors", 1e-3, 0.0), run("p", "rmsprop", 1e-3, 0.9)
    assign_labels([authors, preset])
    assert (authors.label, preset.label) == ("BN-LSTM trainer=rmsprop_authors", "BN-LSTM trainer=rmsprop")
    swept = [run("a1", "rmsprop_authors", 1e-3, 0.0), run("a2", "rmsprop_authors", 2e-3, 0.0), preset]
    assign_labels(swept)  # lr differs within rmsprop_authors: the settings are named, not the option
    assert [r.label for r in swept] == ["BN-LSTM lr=0.001 momentum=0.0", "BN-LSTM lr=0.002 momentum=0.0",
                                        "BN-LSTM lr=0.001 momentum=0.9"]
    unknown = [run("a", "rmsprop_authors", 1e-3, 0.0), Run(tmp_path / "x", preset.config, [])]
    assign_labels(unknown)  # a run that does not say its options: compared setting by setting
    assert [r.label for r in unknown] == ["BN-LSTM momentum=0.0", "BN-LSTM momentum=0.9"]


def test_the_figure_title_keys_only_the_lines_it_holds():
    """A task the paper never ran (PTB sentences) has no black lines; runs validated in one
    statistics mode have no dotted ones: the title does not promise them."""
    bare = figure_title("ptb_sentences", "bpc", paper=False, modes=False)
    assert bare == "ptb_sentences: validation bpc (solid: normalised, dashed: plain LSTM)"
    full = figure_title("seqmnist", "accuracy", paper=True, modes=True)
    assert full == ("seqmnist: validation accuracy (solid: normalised, dashed: plain LSTM; black: the paper;\n"
                    "dotted / dash-dotted: EMA / re-estimated statistics)")
