"""What a user may do wrong, and what they get: one table, run as real ``bnrnn`` processes.

Each row is one case from the hostile-but-realistic tries of issue 20: the command, the
exit status, the one sentence the error must say (a regular expression), and the files
that must come out untouched (byte for byte) or must not exist. README.md's reliability
table points here. The behaviour cases (a resume that applies what it says, the metric
window, signals) follow the table.

Cases that need a user without root's override (unreadable data, unwritable folders) drop
that override (``setpriv``) when the tests run as root, and skip with the reason when they cannot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import make_fake_mnist, make_fake_ptb, write_idx

TINY = ["data.root={data}", "data.download=false", "model.hidden_size=8", "task.batch_size=16",
        "task.eval_batch_size=16", "task.valid_size=32", "trainer.max_steps=4", "trainer.eval_every=2",
        "trainer.log_every=1", "trainer.progress=off", "device=cpu"]
# root's override of file permissions (CAP_DAC_*), dropped for the cases that need a plain user
NO_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def bnrnn(args: list[str], cwd: Path, as_user: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``bnrnn ARGS``; ``as_user``: without root's override of file permissions."""
    prefix = NO_OVERRIDE if as_user and os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-m", "bnrnn.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Where:
    """The paths one case works in (all under a fresh folder)."""

    tmp: Path
    data: Path
    run: Path

    def fill(self, text: str) -> str:
        return text.format(tmp=self.tmp, data=self.data, run=self.run)


@dataclass
class Case:
    id: str
    args: list[str]
    status: int
    sentence: str | tuple[str, ...]  # regex(es) searched in the error line (in all of stderr if not one_line)
    prepare: Callable[[Where], object] | None = None
    untouched: tuple[str, ...] = ()  # folders (relative to tmp) whose every file must keep its bytes
    absent: tuple[str, ...] = ()  # paths (relative to tmp) that must not exist afterwards
    as_user: bool = False
    one_line: bool = True  # the error is a single "bnrnn: error: ..." line


# ---------------------------------------------------------------- situations a case starts from

FINISHED: dict[str, Path] = {}  # filled once per session by the `finished_run` fixture


def finished(where: Where) -> None:
    """A run of TINY that ran to its end (4 steps, best.pt, last.pt, results.json)."""
    shutil.copytree(FINISHED["run"], where.run)


def checkpointed(where: Where) -> None:
    """A run stopped after its last checkpoint, before its end (no results.json)."""
    finished(where)
    (where.run / "results.json").unlink()


def edited(**changes: str) -> Callable[[Where], None]:
    def prepare(where: Where) -> None:
        checkpointed(where)
        text = (where.run / "config.yaml").read_text()
        for old, new in changes.items():
            text = text.replace(old, new)
        (where.run / "config.yaml").write_text(text)
    return prepare


def truncated(name: str) -> Callable[[Where], None]:
    def prepare(where: Where) -> None:
        checkpointed(where)
        path = where.run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:1000])
    return prepare


def no_checkpoint(where: Where) -> None:
    """A run killed before its first checkpoint: logs, but no checkpoints/."""
    checkpointed(where)
    shutil.rmtree(where.run / "checkpoints")


def without_best(where: Where) -> None:
    """A finished run (trained with no test) whose best.pt the user deleted."""
    finished(where)
    (where.run / "checkpoints" / "best.pt").unlink()


def without_last(where: Where) -> None:
    finished(where)
    (where.run / "checkpoints" / "last.pt").unlink()


def full_disk_for(name: str) -> Callable[[Where], None]:
    """The checkpoint ``name`` is written where the disk is full (its temporary file is /dev/full)."""
    def prepare(where: Where) -> None:
        (where.run / "checkpoints").mkdir(parents=True)
        (where.run / "checkpoints" / f"{name}.tmp").symlink_to("/dev/full")
    return prepare


def held(where: Where):
    """A live process (this test) is writing to the run."""
    from bnrnn.runlock import RunLock

    checkpointed(where)
    return RunLock(where.run).acquire()


def bad_test_label(where: Where) -> None:
    raw = where.data / "MNIST" / "raw"
    labels = torch.randint(0, 10, (32,), dtype=torch.uint8)
    labels[17] = 12
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels)


def broken_links(where: Where) -> None:
    (where.tmp / "dangling").symlink_to(where.tmp / "nowhere")
    (where.tmp / "loop1").symlink_to(where.tmp / "loop2")
    (where.tmp / "loop2").symlink_to(where.tmp / "loop1")


def file_in_the_way(where: Where) -> None:
    (where.tmp / "a-file").write_text("")


def missing_file(where: Where) -> None:
    (where.data / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").unlink()


def two_runs_one_unreadable(where: Where) -> None:
    shutil.copytree(FINISHED["run"], where.tmp / "runs" / "good")
    shutil.copytree(FINISHED["run"], where.tmp / "runs" / "broken")
    (where.tmp / "runs" / "broken" / "config.yaml").write_text("model: [unclosed\n")


def two_runs_one_with_a_task_string(where: Where) -> None:
    shutil.copytree(FINISHED["run"], where.tmp / "runs" / "good")
    shutil.copytree(FINISHED["run"], where.tmp / "runs" / "broken")
    config = where.tmp / "runs" / "broken" / "config.yaml"
    lines = config.read_text().splitlines()
    start = lines.index("task:")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
    config.write_text("\n".join([*lines[:start], "task: ptb", *lines[end:]]) + "\n")


def rewritten_last(format: str | None = None, progress: dict | None = None) -> Callable[[Where], None]:
    """A checkpointed run whose last.pt a newer version wrote: another format marker, or more counters."""
    def prepare(where: Where) -> None:
        checkpointed(where)
        path = where.run / "checkpoints" / "last.pt"
        payload = torch.load(path, weights_only=True)
        if format:
            payload["format"] = format
        payload["progress"].update(progress or {})
        torch.save(payload, path)
    return prepare


def odd_records(where: Where) -> None:
    finished(where)
    with open(where.run / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
        f.write(json.dumps({"split": "valid", "step": "abc", "accuracy": 2.0}) + "\n")
    (where.run / "results.json").write_text("[]")


def unreadable(relative: str) -> Callable[[Where], None]:
    def prepare(where: Where) -> None:
        if relative.startswith("ptb"):
            make_fake_ptb(where.data, sizes=(600, 200, 200))
        os.chmod(where.data / relative, 0)
    return prepare


def unwritable_out(where: Where) -> None:
    (where.tmp / "locked").mkdir()
    os.chmod(where.tmp / "locked", 0o555)


T = ["train", *TINY]
RESUME = [*T, "hydra.run.dir={run}", "trainer.resume=true"]
NEW = [*T, "hydra.run.dir={run}"]

CASES = [
    # -- a launch into a run folder that is taken: refused, the run's record untouched
    Case("finished run, no resume", NEW, 2, r"already holds a finished run; pass trainer.resume=true",
         finished, untouched=("run",)),
    Case("finished run whose best.pt was deleted, resumed for its test",
         [*RESUME, "trainer.test_at_end=true"], 2,
         r"best.pt is missing and the run has trained all its 4 steps, so no validation is left to choose another "
         r"best checkpoint; put best.pt back, or pass a larger trainer.max_steps", without_best, untouched=("run",)),
    Case("finished run with no last.pt, resumed", RESUME, 2, r"holds a finished run but no last.pt; nothing to resume",
         without_last, untouched=("run",)),
    Case("second writer", NEW, 2, r"another bnrnn process is writing to .*\(pid \d+ on ", held, untouched=("run",)),
    Case("second writer, resuming", RESUME, 2, r"another bnrnn process is writing to", held, untouched=("run",)),
    # -- a resume that would change what the checkpoint means: refused, naming the key and why
    Case("resume, another batch size", [*RESUME, "task.batch_size=32"], 2,
         r"cannot resume .* with task.batch_size 16 -> 32 \(the checkpoint's place in the data", checkpointed,
         untouched=("run",)),
    Case("resume, another seed", [*RESUME, "seed=2"], 2, r"seed 1 -> 2 \(the data order", checkpointed,
         untouched=("run",)),
    Case("resume, another model group", [*RESUME, "model=lstm"], 2, r"model.name bnlstm -> lstm", checkpointed,
         untouched=("run",)),
    Case("resume, an init-only key", [*RESUME, "model.gamma_init=0.5"], 2,
         r"model.gamma_init 0.1 -> 0.5 \(used only to initialise the weights: it would have no effect\)",
         checkpointed, untouched=("run",)),
    Case("resume, an experiment preset", [*RESUME, "experiment=paper_seqmnist"], 2,
         r"experiment=paper_seqmnist on a resume would replace the run's settings", checkpointed,
         untouched=("run",)),
    Case("resume, config.yaml edited to another shape", ["train", "hydra.run.dir={run}", "trainer.resume=true"], 2,
         r"model.hidden_size 8 -> 9 \(.*, edited in .*config.yaml\)", edited(**{"hidden_size: 8": "hidden_size: 9"}),
         untouched=("run",)),
    Case("resume, config.yaml malformed", ["train", "hydra.run.dir={run}", "trainer.resume=true"], 2,
         r"config.yaml is not a readable config .*; fix it, or delete it", edited(**{"model:": "model: [oops"}),
         untouched=("run",)),
    Case("resume, truncated best.pt", RESUME, 2,
         r"best.pt is not a readable checkpoint .*; delete it to resume", truncated("best.pt"), untouched=("run",)),
    Case("resume, truncated last.pt", RESUME, 2, r"last.pt is not a readable checkpoint", truncated("last.pt"),
         untouched=("run",)),
    Case("resume, last.pt from a newer version", RESUME, 2,
         r"last.pt was written by a newer bnrnn \(checkpoint format 3; this version reads format 2\); upgrade bnrnn",
         rewritten_last(format="bnrnn-checkpoint/3"), untouched=("run",)),
    Case("resume, last.pt with counters this version does not know", RESUME, 2,
         r"last.pt holds counters this version does not know \(tokens_seen\): it was written by a newer bnrnn",
         rewritten_last(progress={"tokens_seen": 5}), untouched=("run",)),
    # -- errors found before the work, leaving nothing behind
    Case("test label out of range", NEW, 2, r"t10k-labels-idx1-ubyte.gz holds label 12 at index 17 .*labels are 0-9",
         bad_test_label, absent=("run",)),
    Case("missing data file", NEW, 2, r"MNIST not found: .* lacks train-images-idx3-ubyte.gz", missing_file,
         absent=("run",)),
    Case("missing data, into folders the launch makes", [*T, "hydra.run.dir={tmp}/runs/seqmnist-bnlstm/now"], 2,
         r"MNIST not found", missing_file, absent=("runs",)),
    Case("no validation split", [*NEW, "task.valid_size=0"], 2, r"task.valid_size=0 is invalid: it must be a positive",
         absent=("run",)),
    Case("a bad job in a sweep", [*T, "-m", "trainer.lr=1e-3,nan", "hydra.sweep.dir={tmp}/sweep"], 2,
         r"job 1 of the sweep \(.*trainer.lr=nan.*\): trainer.lr=nan is invalid", absent=("sweep",)),
    Case("an interval sweep without a sweeper that draws", [*T, "-m", "trainer.lr=interval(0.1,0.2)",
                                                             "hydra.sweep.dir={tmp}/sweep"], 2,
         r"interval\(\.\.\.\) sweeps need a sweeper that draws values", absent=("sweep",)),
    Case("a list where one value is wanted", [*NEW, "model.hidden_size=8,9"], 2,
         r"Ambiguous value for argument 'model.hidden_size=8,9'", absent=("run",)),
    Case("batch larger than the data", [*NEW, "task.train_limit=40", "task.batch_size=64"], 2,
         r"task.train_limit=40 leaves 40 training images, fewer than one batch of task.batch_size=64", absent=("run",)),
    Case("batch larger than the data, by epochs", [*NEW, "task.train_limit=40", "task.batch_size=64",
                                                   "trainer.max_steps=null", "trainer.max_epochs=1"], 2,
         r"fewer than one batch", absent=("run",)),
    Case("infinite h0 noise", [*NEW, "model.h0_noise=inf"], 2, r"model.h0_noise=inf is invalid: it must be a finite",
         absent=("run",)),
    Case("NaN forget bias", [*NEW, "model.forget_bias=nan"], 2, r"model.forget_bias=nan is invalid", absent=("run",)),
    Case("infinite momentum", [*NEW, "trainer.momentum=inf"], 2, r"trainer.momentum=inf is invalid", absent=("run",)),
    Case("momentum of 1.5", [*NEW, "trainer.momentum=1.5"], 2,
         r"trainer.momentum=1.5 is invalid: it must be in \[0, 1\) \(a momentum of 1 or more never forgets",
         absent=("run",)),
    Case("a task trained under another task's name", [*NEW, "task.kind=ptb"], 2,
         r"task.kind=ptb is invalid: it must be mnist for task.name=seqmnist \(choose another task with task=",
         absent=("run",)),
    Case("pMNIST without its permutation", [*NEW, "task=pmnist", "task.permute=false"], 2,
         r"task.permute=False is invalid: it must be true for task.name=pmnist", absent=("run",)),
    Case("seed beyond 64 bits", [*NEW, "seed=99999999999999999999"], 2, r"seed", absent=("run",)),
    Case("a model too large for memory", [*NEW, "model.hidden_size=1000000"], 2,
         r"model.hidden_size=1000000: the model does not fit in memory", absent=("run",)),
    Case("an override with no key", ["train", "=5", "hydra.run.dir={run}"], 2, r"the override '=5' names no key; write key=value",
         absent=("run",)),
    Case("run folder under a file", [*T, "hydra.run.dir={tmp}/a-file/run"], 2,
         r"cannot be created: .*a-file is a file", file_in_the_way, untouched=("a-file",)),
    Case("checkpoint onto a full disk", NEW, 2,
         r"cannot write the checkpoint .*last.pt \(No space left on device\); there was none before; no checkpoint "
         r"was written yet; start it again with: bnrnn train hydra.run.dir=.* trainer.resume=true, once there is room",
         full_disk_for("last.pt")),
    # -- paths that lead nowhere: a dangling symbolic link, a loop, a file where a folder belongs
    Case("data.root a dangling link", [*T, "data.root={tmp}/dangling", "data.download=true", "hydra.run.dir={run}"], 2,
         r"data.root=.*dangling cannot be used: .*dangling is a symbolic link to .*nowhere, which does not exist",
         broken_links, absent=("run",)),
    Case("data.root a link loop", [*T, "data.root={tmp}/loop1", "data.download=true", "hydra.run.dir={run}"], 2,
         r"data.root=.*loop1 cannot be used: .*loop1 is a symbolic link that loops back on itself", broken_links,
         absent=("run",)),
    Case("run folder inside a link loop", [*T, "hydra.run.dir={tmp}/loop1/run"], 2,
         r"the run folder .*loop1/run cannot be used: .*loop1 is a symbolic link that loops back on itself; choose "
         r"another hydra.run.dir", broken_links),
    Case("run folder a dangling link", [*T, "hydra.run.dir={tmp}/dangling"], 2,
         r"the run folder .*dangling cannot be used: .*dangling is a symbolic link to .*nowhere, which does not exist",
         broken_links),
    Case("eval --out a dangling link", ["eval", "{run}", "--out", "{tmp}/dangling"], 2,
         r"the output folder \(--out\) .*dangling cannot be used: .*dangling is a symbolic link to",
         lambda w: (finished(w), broken_links(w)), untouched=("run",)),
    Case("paper-curves --out a file", ["paper-curves", "--out", "{tmp}/a-file"], 2,
         r"the output folder \(--out\) .*a-file is a file, not a folder", file_in_the_way, untouched=("a-file",)),
    # -- divergence before the first checkpoint says so
    Case("diverged before any checkpoint", [*NEW, "trainer.lr=1e30"], 2,
         r"training diverged: .*; no checkpoint was written yet"),
    # -- eval and report
    Case("eval --out a file", ["eval", "{run}", "--out", "{tmp}/a-file"], 2,
         r"the output folder \(--out\) .*a-file is a file, not a folder", lambda w: (finished(w), file_in_the_way(w)),
         untouched=("run", "a-file")),
    Case("report --out a file", ["report", "{run}", "--out", "{tmp}/a-file"], 2,
         r"the output folder \(--out\) .*a-file is a file, not a folder", lambda w: (finished(w), file_in_the_way(w)),
         untouched=("run", "a-file")),
    Case("eval, malformed config.yaml", ["eval", "{run}"], 2, r"config.yaml is not a readable config",
         edited(**{"model:": "model: [oops"}), untouched=("run",)),
    Case("eval, a value of the wrong type in config.yaml", ["eval", "{run}"], 2,
         r"run/config.yaml: bad config value for 'model.hidden_size': .*; fix it: bnrnn eval reads the run's settings",
         edited(**{"hidden_size: 8": "hidden_size: eight"}), untouched=("run",)),
    Case("report, one unreadable run among two", ["report", "{tmp}/runs", "--out", "{tmp}/report"], 0,
         r"left out of the report: .*broken/config.yaml is not a readable config", two_runs_one_unreadable,
         one_line=False),
    Case("report, a run whose config.yaml says 'task: ptb'", ["report", "{tmp}/runs", "--out", "{tmp}/report"], 0,
         r"left out of the report: .*broken/config.yaml: 'task: ptb' is not a section of settings",
         two_runs_one_with_a_task_string, one_line=False),
    Case("report, the only run unreadable", ["report", "{run}", "--out", "{tmp}/report"], 2,
         r"none of the 1 run folder\(s\) under .* could be read", edited(**{"model:": "model: [oops"}),
         untouched=("run",)),
    Case("report, odd records", ["report", "{run}", "--out", "{tmp}/report"], 0,
         (r"metrics.jsonl: 2 line\(s\) skipped \(not a record with an integer step\)",
          r"results.json holds no results object"), odd_records, one_line=False),
    # -- a user without root's override
    Case("unreadable data.root", NEW, 2, r"cannot read .*data.*\(Permission denied\)", unreadable("."),
         absent=("run",), as_user=True),
    Case("unreadable .gz is not corrupt", NEW, 2,
         r"cannot read .*train-labels-idx1-ubyte.gz \(Permission denied\)",
         unreadable("MNIST/raw/train-labels-idx1-ubyte.gz"), absent=("run",), as_user=True),
    Case("unreadable PTB file", ["train", "task=ptb", "data.root={data}", "data.download=false", "task.seq_len=20",
                                 "task.batch_size=4", "model.hidden_size=8", "hydra.run.dir={run}"], 2,
         r"cannot read .*ptb.char.valid.txt \(Permission denied\)", unreadable("ptb/ptb.char.valid.txt"),
         absent=("run",), as_user=True),
    Case("unwritable output folder", [*T, "hydra.run.dir={tmp}/locked/run"], 2,
         r"the run folder .*locked/run is not writable", unwritable_out, as_user=True),
]

if not torch.cuda.is_available():  # where a GPU is, triton may run: these refusals are the CPU's
    CASES += [
        Case("triton on a CPU", [*NEW, "model.backend=triton"], 2,
             r"model.backend=triton cannot run on cpu: it needs a CUDA GPU and the triton package; use "
             r"model.backend=auto", absent=("run",)),
        Case("resume, config.yaml saying triton on a CPU", ["train", "hydra.run.dir={run}", "trainer.resume=true"], 2,
             r"model.backend=triton cannot run on cpu", edited(**{"backend: auto": "backend: triton"}),
             untouched=("run",)),
    ]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("finished")
    data = make_fake_mnist(base / "data")
    run = base / "run"
    done = bnrnn([fill_all(a, base, data, run) for a in NEW], cwd=base)
    assert done.returncode == 0, done.stderr
    FINISHED["run"], FINISHED["data"] = run, data
    return run


def fill_all(text: str, tmp: Path, data: Path, run: Path) -> str:
    return Where(tmp, data, run).fill(text)


@pytest.fixture(scope="session")
def permissions_bind() -> str | None:
    """None if file permissions can be made to bind here (not root, or root able to drop its
    override with setpriv); else why not."""
    if os.geteuid() != 0:
        return None
    if shutil.which("setpriv") is None:
        return "running as root without util-linux's setpriv: file permissions do not bind"
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_user_case(case: Case, finished_run, permissions_bind, tmp_path):
    if case.as_user and permissions_bind:
        pytest.skip(permissions_bind)
    tmp = tmp_path
    where = Where(tmp, tmp / "data", tmp / "run")
    shutil.copytree(FINISHED["data"], where.data)
    holder = case.prepare(where) if case.prepare else None
    try:
        before = {name: file_hashes(tmp / name) if (tmp / name).is_dir() else (tmp / name).read_bytes()
                  for name in case.untouched}
        result = bnrnn([where.fill(a) for a in case.args], cwd=tmp, as_user=case.as_user)
    finally:
        if hasattr(holder, "release"):
            holder.release()
        for path in tmp.rglob("*"):  # give back what a case made unreadable, for the cleanup
            if not path.is_symlink():
                os.chmod(path, 0o755)
    assert result.returncode == case.status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    text = result.stderr
    if case.one_line:
        errors = [line for line in result.stderr.splitlines() if line.startswith("bnrnn: error:")]
        assert len(errors) == 1, result.stderr[-3000:]
        text = errors[0]
    for sentence in (case.sentence,) if isinstance(case.sentence, str) else case.sentence:
        assert re.search(sentence, text), text[-3000:]
    for name, old in before.items():
        now = file_hashes(tmp / name) if (tmp / name).is_dir() else (tmp / name).read_bytes()
        assert now == old, f"{name} changed"
    for name in case.absent:
        assert not (tmp / name).exists(), f"{name} was left behind: {list((tmp / name).rglob('*'))}"


# ---------------------------------------------------------------- behaviour cases


def records(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.mark.parametrize("how", ["same command", "trainer.resume=true", "SLURM requeue"])
def test_a_run_killed_before_its_first_checkpoint_starts_again_and_says_so(how, finished_run, tmp_path):
    """Nothing of it can go on and nothing is lost: the command, a resume or the scheduler's
    requeue starts it from step 0, says so, and its records are the new attempt's alone."""
    where = Where(tmp_path, FINISHED["data"], tmp_path / "run")
    no_checkpoint(where)
    (where.run / "results.json").unlink(missing_ok=True)
    env_prefix = []
    args = [where.fill(a) for a in NEW] + (["trainer.resume=true"] if how == "trainer.resume=true" else [])
    if how == "SLURM requeue":
        env_prefix = ["env", "SLURM_RESTART_COUNT=1"]
    done = subprocess.run([*env_prefix, sys.executable, "-m", "bnrnn.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped before its first checkpoint, so nothing of it can go on: starting it again from step 0" in (
        done.stderr + done.stdout)
    history = records(where.run, "history.jsonl")
    assert history[-2]["event"] == "start" and "starting it again" in history[-2]["restarted"]
    assert history[-1]["event"] == "finished" and history[-1]["step"] == 4
    steps = [r["step"] for r in records(where.run, "metrics.jsonl") if r.get("split") == "train"]
    assert steps == [1, 2, 3, 4]  # the killed attempt's records replaced, none twice
    assert json.loads((where.run / "results.json").read_text())["steps"] == 4


def test_a_resume_into_a_folder_with_no_run_starts_one(finished_run, tmp_path):
    """A sweep's job that never started, re-run with trainer.resume=true: it starts, and says so."""
    run = tmp_path / "never started"
    done = bnrnn([*[Where(tmp_path, FINISHED["data"], run).fill(a) for a in RESUME]], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "holds no run to resume: starting a new one" in done.stderr + done.stdout
    assert json.loads((run / "results.json").read_text())["steps"] == 4


def test_a_key_missing_from_config_yaml_is_the_runs_value_not_todays_default(finished_run, tmp_path):
    """An older version's config.yaml without trainer.max_steps: the resume of the finished
    4-step run takes 4 from its checkpoint (and stays finished), not the default."""
    where = Where(tmp_path, FINISHED["data"], tmp_path / "run")
    finished(where)
    config = where.run / "config.yaml"
    config.write_text("\n".join(line for line in config.read_text().splitlines() if "max_steps:" not in line))
    before = file_hashes(where.run / "checkpoints")
    done = bnrnn(["train", f"hydra.run.dir={where.run}", "trainer.resume=true"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert file_hashes(where.run / "checkpoints") == before
    assert json.loads((where.run / "results.json").read_text())["steps"] == 4
    assert "max_steps" not in done.stderr


def sweep(where: Where, *extra: str) -> subprocess.CompletedProcess:
    """A two-job sweep of TINY into ``tmp/sweep`` (the second job diverges where lr is 1e30)."""
    return bnrnn(["train", "-m", *[where.fill(a) for a in TINY], *extra, f"hydra.sweep.dir={where.tmp / 'sweep'}"],
                 cwd=where.tmp)


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_sweep_relaunched_into_its_finished_folder_is_refused_and_writes_nothing(launcher, finished_run, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    where = Where(tmp_path, FINISHED["data"], tmp_path / "run")
    first = sweep(where, "trainer.lr=1e-3,2e-3")
    assert first.returncode == 0, first.stderr[-3000:]
    before = file_hashes(tmp_path / "sweep")
    again = sweep(where, "trainer.lr=1e-3,2e-3", f"hydra/launcher={launcher}")
    assert again.returncode == 2, again.stderr[-3000:]
    (line,) = [line for line in again.stderr.splitlines() if line.startswith("bnrnn: error:")]
    assert re.search(r"job 0 of the sweep \(trainer.lr=0.001\): .*trainer.lr=0.001,trainer.max_steps=4 already holds "
                     r"a finished run; pass trainer.resume=true", line), line
    assert file_hashes(tmp_path / "sweep") == before  # no .hydra/, multirun.yaml or train.log rewritten


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_failed_job_fails_the_sweep_the_same_way_on_every_launcher(launcher, finished_run, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    where = Where(tmp_path, FINISHED["data"], tmp_path / "run")
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    done = sweep(where, "trainer.lr=1e-3,1e30", *extra)
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("bnrnn: error:")]
    assert re.search(r"1 of 2 jobs of the sweep failed: trainer.lr=1e\+30 \(.*trainer.lr=1e\+30,.*\); see the log above",
                     line), line
    assert len(list((tmp_path / "sweep").glob("*trainer.lr=0.001*/results.json"))) == 1


def test_of_two_launches_racing_into_one_new_folder_the_second_is_refused_before_hydra_writes(finished_run, tmp_path):
    """The preflight locks a single run's folder before Hydra writes .hydra/ into it, so the
    loser of a race cannot leave its overrides in the winner's record."""
    from bnrnn.errors import ConfigError
    from bnrnn.preflight import check_command_line

    where = Where(tmp_path, FINISHED["data"], tmp_path / "run")
    winner = check_command_line([where.fill(a) for a in NEW[1:]])
    try:
        assert winner.lock is not None and (where.run / ".lock").exists()
        with pytest.raises(ConfigError, match=r"another bnrnn process is writing to .*run \(pid \d+"):
            check_command_line([where.fill(a) for a in NEW[1:]] + ["trainer.lr=2e-3"])
        assert sorted(p.name for p in where.run.iterdir()) == [".lock"]
    finally:
        winner.lock.release()


def test_a_resumed_finished_run_keeps_one_test_record(finished_run, tmp_path):
    where = Where(tmp_path, FINISHED["data"], tmp_path / "run")
    finished(where)
    done = bnrnn([where.fill(a) for a in RESUME], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    tests = [r for r in records(where.run, "metrics.jsonl") if r["split"] == "test"]
    assert len(tests) == 1 and tests[0]["step"] == json.loads((where.run / "results.json").read_text())["best_step"]


def test_a_truncated_pixel_order_is_one_sentence_in_a_resume_and_in_eval(tmp_path, fake_mnist):
    from bnrnn.train import train
    from conftest import SMALL_MNIST, compose

    run = tmp_path / "run"
    train(compose([f"data.root={fake_mnist}", "data.download=false", *SMALL_MNIST, "task=pmnist",
                   "trainer.max_steps=2", "trainer.test_at_end=false"]), run)
    order = run / "permutation.pt"
    order.write_bytes(order.read_bytes()[:100])
    before = file_hashes(run)
    sentence = (r"permutation.pt is not a readable pixel order \(.*\); delete it, and the order is drawn again from "
                r"task.permutation_seed=0")
    for args in (["train", f"hydra.run.dir={run}", "trainer.resume=true", "trainer.max_steps=4"], ["eval", str(run)]):
        done = bnrnn(args, cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("bnrnn: error:")]
        assert re.search(sentence, line), line
    assert not (run / "eval").exists()  # a failed eval leaves no empty folder
    # found once the data is loaded, after the lock and the log have started: the run's record is as it was
    ignored = ("train.log", ".lock")
    assert {k: v for k, v in file_hashes(run).items() if k not in ignored} == {
        k: v for k, v in before.items() if k not in ignored}


def test_eval_lengths_past_the_split_are_refused_before_any_scoring(tmp_path, fake_ptb):
    from bnrnn.train import train
    from conftest import SMALL_PTB, compose

    run = tmp_path / "run"
    train(compose([f"data.root={fake_ptb}", "data.download=false", *SMALL_PTB, "trainer.max_steps=2",
                   "trainer.test_at_end=false"]), run)
    done = bnrnn(["eval", str(run), "--lengths", "50,100000000"], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("bnrnn: error:")]
    assert re.search(r"--lengths 100000000 is too long for the test split: the split \(\d+ symbols\) holds 0 "
                     r"sequences of length 100000000", line), line
    assert "test, " not in done.stderr  # refused before the first score was logged
    assert not (run / "eval").exists()


def test_an_interrupted_launch_leaves_no_folder_where_no_run_began(tmp_path):
    """A Ctrl-C while Hydra sets up (after it wrote .hydra/ and train.log, before the run's
    first record): the folder the launch created goes; one where a run began stays."""
    from bnrnn.preflight import Preflight

    empty, begun = tmp_path / "empty", tmp_path / "begun"
    for root in (empty, begun):
        (root / ".hydra").mkdir(parents=True)
        (root / "train.log").write_text("")
    (begun / "history.jsonl").write_text("{}\n")
    preflight = Preflight(new_roots=[empty, begun])
    assert preflight.remove_unused_folders() == [empty]
    assert not empty.exists() and (begun / "train.log").exists()


def test_a_stopped_sweep_resumed_starts_the_jobs_that_never_started(finished_run, tmp_path):
    where = Where(tmp_path, FINISHED["data"], tmp_path / "run")
    first = sweep(where, "trainer.lr=1e-3,2e-3")
    assert first.returncode == 0, first.stderr[-3000:]
    never = next((tmp_path / "sweep").glob("*trainer.lr=0.002*"))
    shutil.rmtree(never)  # as if the sweep had been stopped before its second job
    again = sweep(where, "trainer.lr=1e-3,2e-3", "trainer.resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds no run to resume: starting a new one" in again.stderr + again.stdout
    assert json.loads((never / "results.json").read_text())["steps"] == 4
