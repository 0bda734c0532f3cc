"""The console script: bad input gets one sentence and a non-zero exit, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_fake_mnist


def bnrnn(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bnrnn.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


# conf/task/*.yaml: seqmnist, pmnist, ptb and any task added since
TASK_OPTIONS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "task").glob("*.yaml"))


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory):
    root = make_fake_mnist(tmp_path_factory.mktemp("corrupt"), n_train=8, n_test=4)
    target = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:10])
    return root


@pytest.mark.parametrize("args,expected", [
    (["task=foo"], "unknown task 'foo'; choose one of: " + ", ".join(TASK_OPTIONS)),
    (["model=bar"], "unknown model 'bar'"),
    (["-m", "model=lstm,bnlst"], "unknown model 'bnlst'"),
    (["device=tpu"], "unknown device 'tpu'"),
    (["model.hidden_size=0"], "model.hidden_size=0 is invalid"),  # the rest of the config table: test_bad_input.py
    (["data.root=/nonexistent/folder", "data.download=false"], "MNIST not found"),
    (["model.bn.h=false", "model.momentum=0.1"],
     "settings were renamed: model.bn.h is now model.normalize.h; model.momentum is now model.stats_momentum"),
])
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, args, expected):
    result = bnrnn("train", *args, f"hydra.run.dir={tmp_path}/run", "hydra.sweep.dir=" + str(tmp_path / "sweep"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_corrupt_gz_is_named(tmp_path, corrupt_root):
    result = bnrnn("train", f"data.root={corrupt_root}", "data.download=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2
    assert "t10k-labels-idx1-ubyte.gz is corrupt" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_command_and_help(tmp_path):
    assert bnrnn("--help", cwd=tmp_path).returncode == 0
    result = bnrnn("fly", cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'fly'" in result.stderr


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = bnrnn("train", "task=pmnist", "model=bnlstm_input", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: pmnist" in result.stdout and "name: bnlstm_input" in result.stdout


def test_run_folder_is_named_after_task_and_model(tmp_path, fake_mnist):
    result = bnrnn("train", "task=pmnist", "model=lstm", f"data.root={fake_mnist}", "model.hidden_size=4",
                   "task.batch_size=16", "task.valid_size=32", "trainer.max_steps=1", "trainer.test_at_end=false",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "runs" / "pmnist-lstm").iterdir())
    assert len(runs) == 1 and (runs[0] / ".hydra" / "config.yaml").is_file()
    assert (runs[0] / "results.json").is_file()


def test_multirun_sweep_lands_in_readable_folders(tmp_path, fake_mnist):
    result = bnrnn("train", "-m", "model=lstm,bnlstm", f"data.root={fake_mnist}", "model.hidden_size=4",
                   "task.batch_size=16", "task.valid_size=32", "trainer.max_steps=1", "trainer.test_at_end=false",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p.parent.name for p in (tmp_path / "runs" / "multirun").glob("*/*/results.json"))
    assert len(jobs) == 2
    assert any("model=lstm" in j for j in jobs) and any("model=bnlstm" in j for j in jobs)
