"""A finished run's published best checkpoint (bnrnn.published): weights and the statistics of
its test number, read by bnrnn eval, sample and eval --stats in a folder with no checkpoints/
(a fresh clone of the repository), where eval gives results.json's test number back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bnrnn.checkpoint import load_checkpoint
from bnrnn.errors import BnrnnError
from bnrnn.evaluate import evaluate_run
from bnrnn.population_plot import plot_population
from bnrnn.published import publish_best
from bnrnn.sample import load_language_model
from bnrnn.train import train


def as_cloned(run: Path, into: Path) -> Path:
    """The run folder as git holds it: everything but checkpoints/ (and the eval folder)."""
    shutil.copytree(run, into, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    return into


@pytest.mark.parametrize("model, reestimated", [("bnlstm", True), ("bnlstm", False), ("lstm", False)])
def test_a_published_run_scores_its_test_number_without_its_checkpoints(small_mnist_cfg, tmp_path, model, reestimated):
    run = tmp_path / "run"
    results = train(small_mnist_cfg(f"model={model}", "trainer.max_steps=4", f"trainer.reestimate_stats={reestimated}",
                                    "trainer.reestimate_batch_size=8"), run)
    record = publish_best(run)
    published = load_checkpoint(run / "best.pt")
    assert set(published) == {"format", "model", "progress", "config", "population_statistics"}  # no optimiser, RNG
    assert published["progress"]["step"] == results["best_step"] == record["step"]
    source = "reestimated" if reestimated else ("ema" if model == "bnlstm" else "none")
    assert published["population_statistics"]["source"] == source
    if reestimated:  # the fake MNIST's 64 training images in batches of 8
        assert published["population_statistics"] == {"source": "reestimated", "batches": 8, "batch_size": 8}
    assert record["test"] == record["results_json"] == results["test_accuracy"]

    clone = as_cloned(run, tmp_path / "clone")
    evaluated = evaluate_run(clone)
    key = "reestimated" if reestimated else "ema"  # named as what the file's buffers hold
    assert evaluated[key]["accuracy"] == results["test_accuracy"]
    assert evaluated[key]["loss"] == pytest.approx(results["test_loss"], rel=1e-6)  # the same statistics, not close ones
    assert evaluated["step"] == results["best_step"]
    if model == "bnlstm":
        assert ("ema" in evaluated) != reestimated and "batch" in evaluated
        assert plot_population(clone)["figure"].is_file()


def test_only_a_finished_run_is_published(small_mnist_cfg, tmp_path):
    run = tmp_path / "run"
    train(small_mnist_cfg("trainer.max_steps=4"), run)
    (run / "results.json").unlink()
    with pytest.raises(BnrnnError, match=r"has not finished \(no results.json\): only a finished run's best"):
        publish_best(run)
    assert not (run / "best.pt").exists()


def test_a_published_language_model_samples_in_a_clone(small_ptb_cfg, tmp_path):
    run = tmp_path / "run"
    train(small_ptb_cfg("model=bnlstm", "trainer.max_steps=4", "trainer.reestimate_stats=true",
                        "trainer.reestimate_batches=2"), run)
    publish_best(run)
    clone = as_cloned(run, tmp_path / "clone")
    model, vocab, _ = load_language_model(clone, "best", "cpu")
    weights = load_checkpoint(run / "best.pt")["model"]
    assert all(value.equal(weights[name]) for name, value in model.state_dict().items())


def test_the_module_publishes_from_the_command_line(small_mnist_cfg, tmp_path):
    run = tmp_path / "run"
    results = train(small_mnist_cfg("model=bnlstm", "trainer.max_steps=4", "trainer.reestimate_stats=true"), run)
    done = subprocess.run([sys.executable, "-m", "bnrnn.published", str(run)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"{run / 'best.pt'}: step {results['best_step']}, re-estimated population "
                                   f"statistics; test {results['test_accuracy']:.4f} (results.json: "
                                   f"{results['test_accuracy']})")
    assert json.loads((run / "results.json").read_text())["test_accuracy"] == results["test_accuracy"]


def test_the_campaign_publishes_a_finished_run_and_git_takes_its_best_pt_not_its_checkpoints(small_mnist_cfg,
                                                                                           tmp_path, monkeypatch):
    """scripts/campaign.py publish in a repository with the project's .gitignore: a finished
    run gets RUN/best.pt, staged with its records; checkpoints/ and eval/ stay out."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    shutil.copy(root / ".gitignore", repo / ".gitignore")
    run = repo / "runs" / "paper" / "seqmnist-bnlstm"
    train(small_mnist_cfg("model=bnlstm", "trainer.max_steps=4", "trainer.reestimate_stats=true"), run)
    evaluate_run(run, out_dir=run / "eval")  # a reader's scores, beside the run
    spec = importlib.util.spec_from_file_location("campaign", root / "scripts" / "campaign.py")
    campaign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(campaign)
    monkeypatch.setattr(campaign, "REPO", repo)
    monkeypatch.setattr(campaign, "RUNS", repo / "runs" / "paper")
    monkeypatch.setattr(campaign, "this_python", lambda: sys.executable)
    assert campaign.publish(None) == 0
    staged = subprocess.run(["git", "-C", str(repo), "diff", "--cached", "--name-only"], capture_output=True,
                            text=True, check=True).stdout.split()
    folder = "runs/paper/seqmnist-bnlstm/"
    assert {f"{folder}best.pt", f"{folder}results.json", f"{folder}metrics.jsonl", f"{folder}config.yaml",
            f"{folder}history.jsonl"} <= set(staged)
    assert not [path for path in staged if path.startswith((f"{folder}checkpoints/", f"{folder}eval/"))]
    assert load_checkpoint(run / "best.pt")["population_statistics"]["source"] == "reestimated"
