#!/usr/bin/env python3
"""The full-length campaign (issue 28): the paper presets at the paper's length, run in the
background from a git worktree pinned to one commit, in segments that outlive their process.

    scripts/campaign.py status                       # where each run stands
    scripts/campaign.py start seqmnist-bnlstm ...    # start runs (none may exist yet)
    scripts/campaign.py resume --max-time 2h45m      # continue every unfinished run that is not live
    scripts/campaign.py stop seqmnist-lstm           # pause a run (SIGTERM: it checkpoints and exits)
    scripts/campaign.py restart seqmnist-lstm        # from step 0, where its checkpoint was lost
    scripts/campaign.py publish                      # stage the records, carry.pt or a finished best.pt (see below)

Runs live in runs/paper/<name>/ of this checkout. Each run goes on from the commit its
last segment ran (history.jsonl's "code"), in the worktree ../campaign/<commit> with its
own virtual environment, made on first use; ``--commit`` moves runs to another commit,
which their history then records. Each process runs on one thread (two runs fill two
cores), with its output appended to runs/paper/<name>.out.

Uses only the standard library and git, so that it runs before any environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "paper"
# Lost attempts sit beside the campaign, not in it: `bnrnn report runs/paper` draws the runs
# that go on, and `tensorboard --logdir runs` still shows these.
LOST = REPO / "runs" / "paper-lost"
WORKTREES = REPO.parent / "campaign"
DATA = Path(os.environ.get("BNRNN_SHARED_DATA", REPO.parent / "shared" / "data"))

# The campaign: the paper presets, seed 1, unchanged from start to end.
CAMPAIGN = {
    "seqmnist-bnlstm": ["experiment=paper_seqmnist", "model=bnlstm", "trainer=rmsprop"],
    "seqmnist-lstm": ["experiment=paper_seqmnist", "model=lstm", "trainer=rmsprop"],
    # The arm for the gradient explosion of the preset as it was then, trainer=rmsprop
    # (runs/paper/README.md): the authors' RMSProp (decay 0.5, no momentum), now the preset's own.
    "seqmnist-bnlstm-rmsprop_authors": ["experiment=paper_seqmnist", "model=bnlstm", "trainer=rmsprop_authors"],
    "seqmnist-lstm-rmsprop_authors": ["experiment=paper_seqmnist", "model=lstm", "trainer=rmsprop_authors"],
    "pmnist-bnlstm": ["experiment=paper_pmnist", "model=bnlstm", "trainer=rmsprop"],
    "pmnist-lstm": ["experiment=paper_pmnist", "model=lstm", "trainer=rmsprop"],
    # pMNIST's campaign arms (runs/paper/README.md): the optimiser the seqMNIST headline uses.
    "pmnist-bnlstm-rmsprop_authors": ["experiment=paper_pmnist", "model=bnlstm", "trainer=rmsprop_authors"],
    "pmnist-lstm-rmsprop_authors": ["experiment=paper_pmnist", "model=lstm", "trainer=rmsprop_authors"],
    "ptb256-bnlstm": ["experiment=paper_ptb", "model=bnlstm", "model.hidden_size=256"],
    "ptb256-lstm": ["experiment=paper_ptb", "model=lstm", "model.hidden_size=256"],
    "ptb-bnlstm": ["experiment=paper_ptb", "model=bnlstm", "device=cuda"],  # 1000 units: on a GPU
    "ptb-lstm": ["experiment=paper_ptb", "model=lstm", "device=cuda"],
}
COMMON = ["seed=1", "data.download=false", "trainer.progress=off"]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return records


def is_live(run: Path) -> bool:
    """A process holds the run's lock (bnrnn.runlock's flock on run/.lock)."""
    import fcntl

    try:
        fd = os.open(run / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def last_commit(run: Path) -> str | None:
    for record in reversed(read_jsonl(run / "history.jsonl")):
        commit = (record.get("code") or {}).get("commit")
        if commit:
            return commit
    return None


def ended(history: list[dict]) -> str:
    """How a run's last segment ended: its closing event (max_time, stopped, failed), or
    "killed" where none closes it (bnrnn.runfolder.unclosed_segment; the run is not live)."""
    for record in reversed(history):
        if record.get("event") in ("finished", "stopped", "failed", "max_time"):
            return record["event"]
        if record.get("event") in ("start", "resume"):
            return "killed"
    return "empty"


def target_steps(run: Path) -> int | None:
    """The run's length in steps, as its log's start line states it ("100000 steps (500 per epoch)")."""
    log = run / "train.log"
    found = re.findall(r"(\d+) steps \(\d+ per epoch\)", log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1]) if found else None


def pace(train: list[dict], window: float = 3600.0) -> float | None:
    """Wall-clock seconds a step (validations included) over the last ``window`` seconds of
    training records, within the current segment; None with too few records."""
    recent = [r for r in train if isinstance(r.get("time"), (int, float))]
    recent = [r for r in recent if r["time"] >= recent[-1]["time"] - window] if recent else []
    for i in range(len(recent) - 1, 0, -1):  # back to the last resume: elapsed restarts its wall-clock stretch
        if recent[i]["time"] - recent[i - 1]["time"] > 600:
            recent = recent[i:]
            break
    if len(recent) < 2 or recent[-1]["step"] <= recent[0]["step"]:
        return None
    return (recent[-1]["time"] - recent[0]["time"]) / (recent[-1]["step"] - recent[0]["step"])


def describe(run: Path) -> dict:
    history = read_jsonl(run / "history.jsonl")
    metrics = read_jsonl(run / "metrics.jsonl")
    train = [r for r in metrics if r.get("split") == "train"]
    valid = [r for r in metrics if r.get("split") == "valid"]
    metric = "bpc" if valid and "bpc" in valid[-1] else "accuracy"
    state = "live" if is_live(run) else ("finished" if (run / "results.json").exists() else ended(history))
    step, target = (train[-1]["step"] if train else 0), target_steps(run)
    seconds = pace(train) if state == "live" else None
    return {
        "run": run.name,
        "state": state,
        "step": step,
        "s/step": round(seconds, 3) if seconds else "-",  # wall clock now, validations included (live runs)
        "h left": round((target - step) * seconds / 3600, 1) if seconds and target else "-",
        "hours": round(train[-1]["elapsed"] / 3600, 2) if train else 0.0,
        "valid": valid[-1].get(metric) if valid else None,
        "best": valid[-1].get(f"best_{metric}") if valid else None,
        "overhead": valid[-1].get("overhead") if valid else None,
        "commit": (last_commit(run) or "?")[:7],
    }


def status(_: argparse.Namespace) -> int:
    runs = campaign_runs()
    if not runs:
        print(f"no runs under {RUNS}")
        return 0
    columns = ("run", "state", "step", "s/step", "h left", "hours", "valid", "best", "overhead", "commit")
    width = max(len(run.name) for run in runs)
    print("  ".join(f"{c:>9}" if i else f"{c:<{width}}" for i, c in enumerate(columns)))
    for run in runs:
        row = describe(run)
        print("  ".join(f"{str(row[c]):>9}" if i else f"{row[c]:<{width}}" for i, c in enumerate(columns)))
    return 0


def worktree(commit: str) -> Path:
    """../campaign/<commit>: a worktree checked out at ``commit`` with its own venv (made once)."""
    full = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    tree = WORKTREES / full[:7]
    if not (tree / ".git").exists():
        WORKTREES.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), full], check=True)
    bnrnn = tree / ".venv" / "bin" / "bnrnn"
    if not bnrnn.exists():
        print(f"making the environment of {tree} (a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(tree / ".venv")], check=True)
        subprocess.run([str(tree / ".venv" / "bin" / "pip"), "install", "-q", "-e", str(tree)], check=True)
    return tree


def launch(name: str, tree: Path, overrides: list[str]) -> None:
    """``bnrnn train`` of the worktree on one thread, in the background, detached from this
    process (it outlives the shell), its output appended to runs/paper/<name>.out."""
    run = RUNS / name
    RUNS.mkdir(parents=True, exist_ok=True)
    command = [str(tree / ".venv" / "bin" / "bnrnn"), "train", *overrides, f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(RUNS / f"{name}.out", "a") as out:
        out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=tree, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"{name}: pid {proc.pid}, from {tree.name}: {' '.join(command[1:])}")


def budget(args: argparse.Namespace) -> list[str]:
    return [f"trainer.max_time={args.max_time}"] if args.max_time else []


def start(args: argparse.Namespace) -> int:
    tree = worktree(args.commit)
    for name in args.names:
        if name not in CAMPAIGN:
            print(f"unknown run {name}; the campaign's: {', '.join(CAMPAIGN)}", file=sys.stderr)
            return 2
        if (RUNS / name).exists():
            print(f"{RUNS / name} exists; resume it instead", file=sys.stderr)
            return 2
        launch(name, tree, [*CAMPAIGN[name], *COMMON, f"data.root={DATA}", *budget(args)])
    return 0


def resume(args: argparse.Namespace) -> int:
    runs = campaign_runs()
    if args.names:
        runs = [run for run in runs if run.name in args.names]
    for run in runs:
        row = describe(run)
        checkpoint, carried = run / "checkpoints" / "last.pt", run / "carry.pt"
        if row["state"] in ("live", "finished") or not (checkpoint.exists() or carried.exists()):
            print(f"{run.name}: {row['state']} at step {row['step']}; left as it is")
            continue
        commit = args.commit or last_commit(run)
        if commit is None:
            print(f"{run.name}: its history names no commit; pass --commit", file=sys.stderr)
            return 2
        tree = worktree(commit)
        if not checkpoint.exists():
            carry(tree, "unpack", run)  # a new machine: git kept carry.pt (scripts/carry.py)
        launch(run.name, tree, ["trainer.resume=true", *budget(args), *args.overrides])
    return 0


def campaign_runs() -> list[Path]:
    """The run folders under runs/paper/."""
    if not RUNS.exists():
        return []
    return sorted(p for p in RUNS.iterdir() if p.is_dir())


def attempt_stamp(run: Path) -> str:
    """YYYYmmdd-HHMM of the run's first history record: when this attempt started (a fresh
    checkout's file times are the checkout's, not the run's)."""
    records = read_jsonl(run / "history.jsonl")
    when = records[0].get("time", "") if records else ""
    if len(when) >= 16:
        return when[:10].replace("-", "") + "-" + when[11:16].replace(":", "")
    return time.strftime("%Y%m%d-%H%M")


def restart(args: argparse.Namespace) -> int:
    """Start again from step 0 a run whose checkpoint is gone (a lost machine, and no carry.pt
    in git to rebuild it from). The lost attempt's records move, whole, to
    runs/paper-lost/<name>-<its start time>/, where TensorBoard still shows them."""
    for name in args.names:
        run = RUNS / name
        if name not in CAMPAIGN or not run.exists():
            print(f"{name}: no such run; start it instead", file=sys.stderr)
            return 2
        row = describe(run)
        if row["state"] in ("live", "finished") or any(run.joinpath(p).exists() for p in ("checkpoints/last.pt",
                                                                                         "carry.pt")):
            print(f"{name}: {row['state']} at step {row['step']}, with its checkpoint; resume it instead",
                  file=sys.stderr)
            return 2
    tree = worktree(args.commit)
    for name in args.names:
        run = RUNS / name
        stamp = attempt_stamp(run)
        lost = LOST / f"{name}-{stamp}"
        lost.parent.mkdir(parents=True, exist_ok=True)
        run.rename(lost)
        print(f"{name}: the lost attempt (step {describe(lost)['step']}) moved to {lost.relative_to(REPO)}")
        launch(name, tree, [*CAMPAIGN[name], *COMMON, f"data.root={DATA}", *budget(args)])
    return 0


def stop(args: argparse.Namespace) -> int:
    """SIGTERM to each named live run: it finishes its step, checkpoints and exits."""
    import signal

    for name in args.names:
        try:
            pid = json.loads((RUNS / name / ".lock").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pid = None
        if pid is None or not is_live(RUNS / name):
            print(f"{name}: not running")
            continue
        os.kill(pid, signal.SIGTERM)
        print(f"{name}: SIGTERM to pid {pid}")
    return 0


def this_python() -> str:
    """The Python of this checkout's environment (.venv, as the README makes it), else this one."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def carry(tree: Path, action: str, run: Path) -> None:
    """scripts/carry.py ``action`` (pack or unpack) on ``run``, with the Python of the worktree
    that runs it, so that the model it builds is the run's code's."""
    subprocess.run([str(tree / ".venv" / "bin" / "python"), str(REPO / "scripts" / "carry.py"), action, str(run)],
                   check=True)


# What git keeps of each run (.gitignore keeps the rest out): the records and carry.pt, not
# checkpoints/ (each session's machine is new: carry.pt is how a run reaches the next one).
# A finished run publishes its best checkpoint instead (bnrnn.published: the weights and the
# re-estimated population statistics of its test number, as RUN/best.pt), made by this
# checkout's bnrnn, the one a fresh clone's `bnrnn eval` will read it with.
def publish(_: argparse.Namespace) -> int:
    for run in campaign_runs():
        row = describe(run)
        print(f"{run.name}: step {row['step']}, {row['state']}")
        commit = last_commit(run)
        best = run / "checkpoints" / "best.pt"
        if row["state"] == "finished" and best.exists():
            published = run / "best.pt"
            if not published.exists() or published.stat().st_mtime < best.stat().st_mtime:
                subprocess.run([this_python(), "-m", "bnrnn.published", str(run)], check=True)
        elif commit and (run / "checkpoints" / "last.pt").exists():  # live or not (see carry.consistent_pair)
            carry(worktree(commit), "pack", run)
    subprocess.run(["git", "-C", str(REPO), "add", "--", str(RUNS)], check=True)
    subprocess.run(["git", "-C", str(REPO), "status", "--short", "--", str(RUNS)], check=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="where each run stands").set_defaults(func=status)
    p = sub.add_parser("start", help="start campaign runs")
    p.add_argument("names", nargs="+", choices=sorted(CAMPAIGN), metavar="NAME")
    p.add_argument("--commit", default="HEAD", help="the commit to pin (default: this checkout's HEAD)")
    p.add_argument("--max-time", help="trainer.max_time of this segment, e.g. 2h45m")
    p.set_defaults(func=start)
    p = sub.add_parser("resume", help="continue every unfinished run that no process holds")
    p.add_argument("--commit", help="move the runs to this commit (default: the commit each last ran)")
    p.add_argument("--max-time", help="trainer.max_time of this segment, e.g. 2h45m")
    p.add_argument("--only", dest="names", nargs="+", metavar="NAME", help="these runs alone")
    p.add_argument("overrides", nargs="*", help="changes for every run resumed (recorded in its history)")
    p.set_defaults(func=resume)
    p = sub.add_parser("restart", help="start again from step 0 runs whose checkpoint was lost")
    p.add_argument("names", nargs="+", choices=sorted(CAMPAIGN), metavar="NAME")
    p.add_argument("--commit", default="HEAD", help="the commit to pin (default: this checkout's HEAD)")
    p.add_argument("--max-time", help="trainer.max_time of this segment, e.g. 2h45m")
    p.set_defaults(func=restart)
    p = sub.add_parser("stop", help="pause live runs (they checkpoint and exit)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=stop)
    sub.add_parser("publish", help="stage the runs' records for a commit").set_defaults(func=publish)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
