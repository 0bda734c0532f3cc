"""``bnrnn <command> [args]``: a thin dispatcher in front of Hydra.

Hydra would read the subcommand word as an override, so it is popped from argv (and from
COMP_LINE for tab completion) before Hydra sees the command line.
"""

from __future__ import annotations

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
  eval RUN_DIR [opts]  score a run's checkpoint with EMA and batch statistics; --reestimate population
                      statistics over the training set too; --lengths paper: PTB bpc against
                      sequence length (Fig. 3b, with the paper's points); --stats: the population
                      statistics against the time step
                      e.g. bnrnn eval runs/ptb-bnlstm/2026-11-22_10-00-00 --reestimate --lengths paper
  report PATH... [--out DIR]  figures (validation metric vs steps and vs wall-clock time) and a
                      table beside the paper's numbers, from run or sweep folders
                      e.g. bnrnn report runs/multirun --out report
  paper-curves [--out DIR]  the paper's curves (Figs. 2, 3a, 3b) as TensorBoard runs under our tags,
                      so that tensorboard --logdir runs draws them over yours (default runs/paper-curves)
  sample RUN_DIR [opts]  text from a PTB run (--prime TEXT, --length N, --temperature T, --seed S),
                      with population statistics far past T_max
  gradflow [--out DIR]  the paper's Fig. 1: gradient norm over time at initialisation against gamma
  bench [opts]        time a training step of nn.LSTM, our vanilla, BN-input and BN-LSTM side by
                      side (seqMNIST and PTB shapes), with a numerics check; --help for options
"""

log = logging.getLogger("bnrnn")


def group_choices(group: str) -> list[str]:
    from bnrnn.schema import yaml_folder

    return sorted(p.stem for p in Path(yaml_folder(), group).glob("*.yaml"))


def check_group_choices(args: list[str]) -> str | None:
    """One sentence for the first ``group=option`` naming an option that does not exist.

    Hydra would answer with its config search path; a researcher wants the valid choices.
    Sweep lists (``model=lstm,bnlstm``) are checked option by option.
    """
    from bnrnn.config import GROUPS

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

    def __init__(self, preflight=None) -> None:
        self.failures = 0
        self.preflight = preflight  # bnrnn.preflight.Preflight, or None where the checks did not run

    def __call__(self, cfg) -> float | None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import OmegaConf, open_dict

        from bnrnn.config import GROUPS
        from bnrnn.errors import BnrnnError
        from bnrnn.preemption import Preempted
        from bnrnn.train import Launch, train

        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        if multirun and cfg.trainer.get("progress") == "auto":
            with open_dict(cfg):
                cfg.trainer.progress = "off"  # parallel jobs would interleave their bars
        out_dir = Path(hydra_cfg.runtime.output_dir)
        choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
        launch = Launch(
            overrides=list(hydra_cfg.overrides.task),
            choices={k: v for k, v in choices.items() if k in GROUPS},
            new_folder=bool(self.preflight and self.preflight.creates(out_dir)),
            created=self.preflight.new_roots[0] if self.preflight and self.preflight.new_roots and not multirun
            else None,
            lock=self.preflight.lock if self.preflight and not multirun else None,
            plan=self.preflight.plan if self.preflight and not multirun else None,
        )
        try:
            results = train(cfg, out_dir, launch)
        except BnrnnError as exc:
            if not multirun or isinstance(exc, Preempted):  # a stop signal stops the whole sweep
                error(str(exc))
                sys.exit(getattr(exc, "exit_code", 2))  # 128 + signal when preempted
            self.failures += 1
            log.error("job %s failed: %s", hydra_cfg.job.num, exc)
            return None
        # A number for Hydra sweepers (e.g. optuna): the best validation metric.
        return next((v for k, v in results.items() if k.startswith("valid_")), None)


def run_train(args: list[str]) -> int:
    import hydra

    from bnrnn.config import config_dir
    from bnrnn.errors import BnrnnError
    from bnrnn.preflight import check_command_line

    problem = check_group_choices(args)
    if problem:
        error(problem)
        return 2
    try:
        preflight = check_command_line(args)
    except BnrnnError as exc:
        error(str(exc))
        return 2
    app = TrainApp(preflight)
    entry = hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")(app)
    sys.argv = ["bnrnn train", *args, *(preflight.hydra_overrides if preflight else [])]
    if "COMP_LINE" in os.environ:
        os.environ["COMP_LINE"] = os.environ["COMP_LINE"].replace(" train", "", 1)
    try:
        entry()
    except KeyboardInterrupt:
        if preflight:  # interrupted before a run began: no empty folder is left behind
            preflight.remove_unused_folders()
        raise
    failed = preflight.failed_jobs() if preflight and preflight.jobs else []
    if failed:
        which = "; ".join(f"{job.label or job.folder.name} ({job.folder})" for job in failed)
        error(f"{len(failed)} of {len(preflight.jobs)} jobs of the sweep failed: {which}; see the log above")
        return 1
    if app.failures:  # a sweeper that draws its jobs: only those run in this process are counted
        error(f"{app.failures} job(s) of the sweep failed; see the log above")
        return 1
    return 0


def parse_lengths(text: str) -> list[int]:
    import argparse

    from bnrnn.evaluate import PAPER_LENGTHS

    if text == "paper":
        return list(PAPER_LENGTHS)
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'paper' or a comma-separated list of lengths") from None
    if any(n < 1 for n in lengths):
        raise argparse.ArgumentTypeError("sequence lengths must be positive")
    return lengths


def run_eval(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bnrnn eval", description="Score a run's checkpoint.")
    parser.add_argument("run_dir", help="a run folder (holding config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--reestimate", action="store_true",
                        help="re-estimate population statistics over the training set first (weights frozen)")
    parser.add_argument("--reestimate-batches", type=int, default=None, metavar="N",
                        help="use only the first N training batches for --reestimate")
    parser.add_argument("--reestimate-batch-size", type=int, default=None, metavar="B",
                        help="training batch size for --reestimate (default: the run's; the authors used 5000 on MNIST)")
    parser.add_argument("--lengths", type=parse_lengths, default=None, metavar="L1,L2,..|paper",
                        help="PTB: bpc against sequence length with population vs batch statistics (Fig. 3b); "
                             "'paper' = 50,100,200,...,1000")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch for --lengths")
    parser.add_argument("--data-root", default=None, help="override the run's data.root")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default=None, choices=("32", "bf16"),
                        help="score under torch.autocast(bf16) or in float32 (default: the run's trainer.precision)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval)")
    parser.add_argument("--stats", action="store_true",
                        help="instead of scoring: draw the checkpoint's population statistics against the time "
                             "step (population.png, population.json; no data needed)")
    opts = parser.parse_args(args)
    for name in ("reestimate_batches", "reestimate_batch_size", "batch_size"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")

    from bnrnn.errors import BnrnnError
    from bnrnn.evaluate import evaluate_run

    if opts.stats:
        from bnrnn.population_plot import plot_population

        try:
            written = plot_population(opts.run_dir, opts.checkpoint, opts.out)
        except BnrnnError as exc:
            error(str(exc))
            return 2
        print(f"figure: {written['figure']}\ndata: {written['json']}")
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        result = evaluate_run(
            opts.run_dir, opts.checkpoint, opts.split, opts.reestimate, opts.reestimate_batches,
            opts.reestimate_batch_size, opts.lengths, opts.batch_size, opts.data_root, opts.device, opts.out,
            opts.precision,
        )
    except BnrnnError as exc:
        error(str(exc))
        return 2
    for key in ("batch", "ema", "reestimated"):
        if key in result:
            scores = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result[key].items())
            print(f"{result['split']} ({key} statistics): {scores}")
    return 0


def run_bench(args: list[str]) -> int:
    from bnrnn.bench import main as bench_main

    return bench_main(args)


def run_report(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bnrnn report", description="Figures and a table comparing runs with the paper.")
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or folders holding runs (e.g. a sweep)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder (default ./report)")
    opts = parser.parse_args(args)

    from bnrnn.errors import BnrnnError
    from bnrnn.report import make_report

    try:
        written = make_report(opts.paths, opts.out)
    except BnrnnError as exc:
        error(str(exc))
        return 2
    print(written["table"], end="")
    for figure in written["figures"]:
        print(f"figure: {figure}")
    print(f"report: {opts.out / 'report.md'}")
    return 0


def run_paper_curves(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bnrnn paper-curves",
                                     description="Write the paper's curves as TensorBoard runs, under our tags.")
    parser.add_argument("--out", type=Path, default=Path("runs/paper-curves"),
                        help="output folder (default runs/paper-curves)")
    opts = parser.parse_args(args)

    from bnrnn.errors import BnrnnError
    from bnrnn.paper import write_tensorboard

    try:
        written = write_tensorboard(opts.out)
    except BnrnnError as exc:
        error(str(exc))
        return 2
    for folder in written:
        print(f"wrote {folder}")
    print(f"tensorboard --logdir {opts.out.parent} shows them beside the runs there")
    return 0


def run_sample(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bnrnn sample", description="Text from a PTB run's checkpoint.")
    parser.add_argument("run_dir", help="a PTB run folder (config.yaml, vocab.json, checkpoints/)")
    parser.add_argument("--prime", default="", help="text to start from (plain text: spaces between words)")
    parser.add_argument("--length", type=int, default=1000, help="characters to generate (default 1000)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature: toward 0 the most likely symbol, 1 (the default) the model's own "
                        "distribution")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    opts = parser.parse_args(args)

    from bnrnn.errors import BnrnnError
    from bnrnn.sample import sample_run_pieces

    try:
        pieces = sample_run_pieces(opts.run_dir, opts.prime, opts.length, opts.temperature, opts.seed,
                                   opts.checkpoint, opts.device)
    except BnrnnError as exc:
        error(str(exc))
        return 2
    print(opts.prime, end="", flush=True)
    for piece in pieces:  # each piece at once: a reader that stops (| head) stops the drawing, in main()
        print(piece, end="", flush=True)
    print(flush=True)
    return 0


def run_gradflow(args: list[str]) -> int:
    from bnrnn.gradflow import main as gradflow_main

    return gradflow_main(args)


COMMANDS = {"train": run_train, "eval": run_eval, "bench": run_bench, "report": run_report,
            "paper-curves": run_paper_curves, "gradflow": run_gradflow, "sample": run_sample}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, args = argv[0], argv[1:]
    if command in COMMANDS:
        try:
            return COMMANDS[command](args)
        except KeyboardInterrupt:  # Ctrl-C outside a training loop (which says more itself)
            error(f"interrupted; bnrnn {command} stopped")
            return 130
        except BrokenPipeError:
            # The reader stopped (bnrnn sample ... | head): stop quietly, as Unix tools do. What
            # is still buffered for the closed pipe goes to /dev/null, not to an error at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, the status of a tool the pipe's end stopped
    error(f"unknown command '{command}'; choose one of: {', '.join(COMMANDS)}")
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
