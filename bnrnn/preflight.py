"""``bnrnn train``'s checks before Hydra runs anything.

Hydra creates the run folder and writes ``.hydra/`` and ``train.log`` before it calls the
task function, so a refusal from inside :func:`bnrnn.train.train` would come too late: a
refused launch into a finished run would overwrite that run's record. Here every job of
the command line (each combination of a sweep) is composed and checked first: its
overrides parse, its config is valid, and (for a single run) its run folder may be
written and is not taken (:func:`bnrnn.runfolder.plan_run`). A bad value in the fifth job
of a sweep is refused before the first one starts.

The run (or sweep) folder is then pinned as an explicit ``hydra.run.dir`` (``sweep.dir``)
so that Hydra uses the very folder that was checked, even when its name holds the time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import open_dict

from bnrnn.config import load_config
from bnrnn.errors import ConfigError, first_line
from bnrnn.runfolder import check_output_location, plan_run

MULTIRUN_FLAGS = ("-m", "--multirun")


@dataclass
class Preflight:
    """What the checks found: overrides to add for Hydra, and the folders this launch creates."""

    hydra_overrides: list[str] = field(default_factory=list)
    new_roots: list[Path] = field(default_factory=list)

    def creates(self, folder: Path) -> bool:
        """Whether ``folder`` (a job's output folder) is, or lies in, a folder this launch creates."""
        folder = folder.resolve()
        return any(folder == root or root in folder.parents for root in self.new_roots)


def parse(overrides: list[str]) -> list:
    """Hydra's parse of the overrides; ConfigError for one that names no key (``=5``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    for override in parsed:
        if not override.key_or_group:
            raise ConfigError(f"the override '{override.input_line}' names no key; write key=value")
    return parsed


def sweep_jobs(parsed: list) -> list[list[str]]:
    """The override list of each job of a basic sweep (``a=1,2 b=x,y`` -> four jobs)."""
    choices = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


def check_command_line(args: list[str]) -> Preflight | None:
    """Check a ``bnrnn train`` command line; None where Hydra is asked for something else
    (``--help``, ``--cfg``, ...); ConfigError (or CheckpointError) with one sentence otherwise."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bnrnn.cli import config_dir

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
                folder = Path(hydra_cfg.sweep.dir if multirun else hydra_cfg.run.dir)
                with open_dict(composed):
                    del composed["hydra"]
            except (HydraException, OmegaConfBaseException, ValueError, TypeError) as exc:
                raise ConfigError(f"{where}cannot compose the config ({first_line(exc)})") from None
            try:
                cfg = load_config(composed)
            except ConfigError as exc:
                raise ConfigError(f"{where}{exc}") from None
            if multirun:
                if number > 0:
                    continue  # one sweep folder for all jobs: the first job's
                check_output_location(folder)
                pin_key = "hydra.sweep.dir"
            else:
                plan = plan_run(cfg, folder, job)
                pin_key = "hydra.run.dir"
                if plan.resume:
                    # .hydra/ keeps the run's first launch; the resume is recorded in history.jsonl
                    preflight.hydra_overrides.append("hydra.output_subdir=null")
            if not any(o.startswith(pin_key + "=") for o in overrides):
                preflight.hydra_overrides.append(f"{pin_key}={folder}")
            if not folder.exists() and folder.resolve() not in preflight.new_roots:
                preflight.new_roots.append(folder.resolve())
    return preflight
