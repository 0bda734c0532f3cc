"""``bnrnn train``'s checks before Hydra runs anything.

Hydra creates the run folder and writes ``.hydra/`` and ``train.log`` before it calls the
task function, so a refusal from inside :func:`bnrnn.train.train` would come too late: a
refused launch into a finished run would overwrite that run's record. Here every job of
the command line (each combination of a sweep) is composed and checked first: its
overrides parse, its config is valid, and its run folder may be written and is not taken
(:func:`bnrnn.runfolder.plan_run`). A bad value in the fifth job of a sweep, or a job
whose folder holds a finished run, is refused before the first one starts, and nothing
is written.

The run (or sweep) folder is then pinned as an explicit ``hydra.run.dir`` (``sweep.dir``)
so that Hydra uses the very folder that was checked, even when its name holds the time.
A single run's folder is also locked here (:class:`bnrnn.runlock.RunLock`), before Hydra
writes ``.hydra/`` into it: of two launches racing into one folder, the second is refused
before it writes anything.

After a sweep, :meth:`Preflight.failed_jobs` reads each job's ``history.jsonl``: a job
failed unless this launch recorded its end there, whichever launcher ran it (the joblib
launcher runs jobs in other processes, whose failures this one cannot count).
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import open_dict

from bnrnn.config import RENAMED, config_dir, load_config
from bnrnn.errors import BnrnnError, ConfigError, first_line
from bnrnn.runfolder import (HISTORY_FILE, RunPlan, check_output_location, make_writable_folder, plan_run,
                             read_history)
from bnrnn.runlock import RunLock

MULTIRUN_FLAGS = ("-m", "--multirun")
ENDED_WELL = ("finished", "max_time")


@dataclass
class Job:
    """One job of a sweep: what tells it apart, its folder, and its history's length before the launch."""

    label: str
    folder: Path
    records_before: int


@dataclass
class Preflight:
    """What the checks found: overrides to add for Hydra, the folders this launch creates, the
    lock of a single run's folder, and a sweep's jobs (empty where a sweeper draws them)."""

    hydra_overrides: list[str] = field(default_factory=list)
    new_roots: list[Path] = field(default_factory=list)
    lock: RunLock | None = None
    jobs: list[Job] = field(default_factory=list)
    # A single run's plan, which bnrnn.train.train takes as it is (a sweep's jobs are checked
    # here and planned as each starts: holding every resumed job's checkpoint would not scale)
    plan: RunPlan | None = None

    def creates(self, folder: Path) -> bool:
        """Whether ``folder`` (a job's output folder) is, or lies in, a folder this launch creates."""
        folder = folder.resolve()
        return any(folder == root or root in folder.parents for root in self.new_roots)

    def remove_unused_folders(self) -> list[Path]:
        """Remove the folders this launch created where no run has begun (a Ctrl-C while Hydra
        set up: it leaves .hydra/ and train.log); return them."""
        removed = []
        for root in self.new_roots:
            if root.is_dir() and not any(root.rglob(HISTORY_FILE)):
                if self.lock is not None:
                    self.lock.release()
                shutil.rmtree(root, ignore_errors=True)
                removed.append(root)
        return removed

    def failed_jobs(self) -> list[Job]:
        """The sweep's jobs whose history gained no ``finished`` or ``max_time`` record in this launch."""
        return [job for job in self.jobs
                if not any(r.get("event") in ENDED_WELL for r in read_history(job.folder)[job.records_before:])]


def parse(overrides: list[str]) -> list:
    """Hydra's parse of the overrides; ConfigError for one that names no key (``=5``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    for override in parsed:
        if not override.key_or_group:
            raise ConfigError(f"the override '{override.input_line}' names no key; write key=value")
    return parsed


def sweep_jobs(parsed: list) -> list[list[str]]:
    """The override list of each job of a basic sweep (``a=1,2 b=x,y`` -> four jobs), written
    as Hydra's basic sweeper writes them (``false`` as ``False``, one entry per key, the last
    given winning), since the jobs' folder names are made from them."""
    choices: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


def check_command_line(args: list[str]) -> Preflight | None:
    """Check a ``bnrnn train`` command line; None where Hydra is asked for something else
    (``--help``, ``--cfg``, ...); ConfigError (or CheckpointError) with one sentence otherwise."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    flags = [a for a in args if a.startswith("-")]
    if any(flag not in MULTIRUN_FLAGS for flag in flags):
        return None
    multirun = bool(flags)
    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = parse(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"cannot read the command line ({first_line(exc)})") from None
    jobs, drawn = [overrides], False
    if multirun:
        try:
            jobs = sweep_jobs(parsed)
        except HydraException:  # interval sweeps, for optimising sweepers: they draw the jobs; check the rest
            jobs, drawn = [[o.input_line for o in parsed if not o.is_sweep_override()]], True

    preflight = Preflight()
    sweep_dir: Path | None = None
    resumes = False
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for number, job in enumerate(jobs):
            varying = [o for o in job if any(o not in other for other in jobs)]
            where = f"job {number} of the sweep ({' '.join(varying)}): " if len(jobs) > 1 else ""
            try:
                composed = compose("train", overrides=job, return_hydra_config=True)
                hydra_cfg = composed.hydra
                if drawn and hydra_cfg.runtime.choices.get("hydra/sweeper") == "basic":
                    raise ConfigError("interval(...) sweeps need a sweeper that draws values, e.g. "
                                      "hydra/sweeper=optuna (pip install hydra-optuna-sweeper); the basic "
                                      "sweeper takes lists: key=a,b,c")
                with open_dict(hydra_cfg):
                    hydra_cfg.job.num = number
                if multirun:
                    sweep_dir = sweep_dir or Path(hydra_cfg.sweep.dir)  # the first job's: `now` ticks between jobs
                    folder = sweep_dir / str(hydra_cfg.sweep.subdir)
                else:
                    folder = Path(hydra_cfg.run.dir)
                with open_dict(composed):
                    del composed["hydra"]
            except (HydraException, OmegaConfBaseException, ValueError, TypeError) as exc:
                renamed = [f"{old} is now {RENAMED[old]}" for old in (o.split("=")[0].lstrip("+~") for o in job)
                           if old in RENAMED]
                if renamed:
                    raise ConfigError(f"{where}settings were renamed: {'; '.join(renamed)}") from None
                raise ConfigError(f"{where}cannot compose the config ({first_line(exc)})") from None
            try:
                cfg = load_config(composed)
                if multirun and number == 0:
                    check_output_location(sweep_dir)
                if not drawn:
                    plan = plan_run(cfg, folder, job)
                    resumes = resumes or plan.resume
                    if not multirun:
                        preflight.plan = plan
            except BnrnnError as exc:
                raise type(exc)(f"{where}{exc}") from None
            if multirun and not drawn:
                preflight.jobs.append(Job(" ".join(varying), folder, len(read_history(folder))))
        root, pin_key = (sweep_dir, "hydra.sweep.dir") if multirun else (folder, "hydra.run.dir")
        if not any(o.startswith(pin_key + "=") for o in overrides):
            preflight.hydra_overrides.append(f"{pin_key}={root}")
        if not root.exists():
            created = root.resolve()
            while not created.parent.exists():  # the folders made to hold it go with it (runs/<task>-<model>/)
                created = created.parent
            preflight.new_roots.append(created)
        if resumes:
            # .hydra/ keeps each run's first launch; a resume is recorded in history.jsonl
            preflight.hydra_overrides.append("hydra.output_subdir=null")
        if not multirun:
            make_writable_folder(root, "the run folder")
            preflight.lock = RunLock(root).acquire()  # refused (one sentence) if another launch got there first
    return preflight
