"""``bnrnn <command> [args]``: a thin dispatcher in front of Hydra.

Hydra would read the subcommand word as an override, so it is popped from argv (and from
COMP_LINE for tab completion) before Hydra sees the command line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

USAGE = """\
usage: bnrnn <command> [args]

commands:
  train [overrides]   train a model; Hydra overrides, -m for sweeps, --help for the config
                      e.g. bnrnn train task=seqmnist model=bnlstm
                           bnrnn train -m task=pmnist model=lstm,bnlstm model.gamma_init=0.1,1.0
"""

log = logging.getLogger("bnrnn")


def config_dir() -> str:
    """Absolute path of the Hydra configs: bnrnn/conf in a wheel, <repo>/conf from source."""
    spec = importlib.util.find_spec("bnrnn.conf")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))).resolve())
    return str((Path(__file__).resolve().parents[1] / "conf"))


GROUPS = ("task", "model", "trainer", "device", "experiment")


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in Path(config_dir(), group).glob("*.yaml"))


def check_group_choices(args: list[str]) -> str | None:
    """One sentence for the first ``group=option`` naming an option that does not exist.

    Hydra would answer with its config search path; a researcher wants the valid choices.
    Sweep lists (``model=lstm,bnlstm``) are checked option by option.
    """
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in GROUPS or not re.fullmatch(r"[\w.,-]+", value):
            continue
        choices = group_choices(key)
        for option in value.split(","):
            if option not in choices and not (key == "experiment" and option == "null"):
                return f"unknown {key} '{option}'; choose one of: {', '.join(choices)}"
    return None


def error(message: str) -> None:
    print(f"bnrnn: error: {message}", file=sys.stderr)


class TrainApp:
    """The Hydra task function for ``bnrnn train``; remembers failed jobs of a sweep."""

    def __init__(self) -> None:
        self.failures = 0

    def __call__(self, cfg) -> float | None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import open_dict

        from bnrnn.errors import BnrnnError
        from bnrnn.train import train

        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        if multirun and cfg.trainer.get("progress") == "auto":
            with open_dict(cfg):
                cfg.trainer.progress = "off"  # parallel jobs would interleave their bars
        try:
            results = train(cfg, Path(hydra_cfg.runtime.output_dir))
        except BnrnnError as exc:
            if not multirun:
                error(str(exc))
                sys.exit(2)
            self.failures += 1
            log.error("job %s failed: %s", hydra_cfg.job.num, exc)
            return None
        # A number for Hydra sweepers (e.g. optuna): the best validation metric.
        return next((v for k, v in results.items() if k.startswith("valid_")), None)


def run_train(args: list[str]) -> int:
    import hydra

    problem = check_group_choices(args)
    if problem:
        error(problem)
        return 2
    app = TrainApp()
    entry = hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")(app)
    sys.argv = ["bnrnn train", *args]
    if "COMP_LINE" in os.environ:
        os.environ["COMP_LINE"] = os.environ["COMP_LINE"].replace(" train", "", 1)
    entry()
    if app.failures:
        error(f"{app.failures} job(s) of the sweep failed; see the log above")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, args = argv[0], argv[1:]
    if command == "train":
        return run_train(args)
    error(f"unknown command '{command}'; choose one of: train")
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
