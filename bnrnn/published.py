"""A finished run's best checkpoint as it is published: the weights and the population
statistics its test number was scored with, and nothing else.

A run folder's ``checkpoints/best.pt`` holds what a resume needs (the optimiser state, the
RNG states) and the population statistics as the EMA left them. What a reader of the run
needs is less, and different: the weights, and the statistics of the authors' protocol
(``trainer.reestimate_stats``: re-estimated over the training set with the weights frozen),
so that ``bnrnn eval RUN`` scores the published file to the run's ``results.json`` test
number without the training data's re-estimation pass, and ``bnrnn sample`` and
``bnrnn eval --stats`` use the statistics that number was measured with.

    python -m bnrnn.published RUN [RUN ...]     # writes RUN/best.pt (scripts/campaign.py publish does)

The published file sits beside the run's records (``RUN/best.pt``, not under the
``checkpoints/`` folder that git ignores); the readers of a run's best checkpoint take it
where the run has no ``checkpoints/best.pt`` (:func:`bnrnn.runfolder.checkpoint_file`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from bnrnn.checkpoint import load_checkpoint, load_weights, save_checkpoint
from bnrnn.config import load_config, read_run_config
from bnrnn.device import precision_context, resolve_device
from bnrnn.errors import BnrnnError
from bnrnn.nn.population import time_norms
from bnrnn.runfolder import BEST, RESULTS_FILE
from bnrnn.scoring import DESCRIPTIONS, reestimate, score
from bnrnn.tasks import build_task

log = logging.getLogger("bnrnn")


def publish_best(run_dir: str | Path, check: bool = True) -> dict[str, Any]:
    """Write ``run_dir/best.pt`` from the finished run's ``checkpoints/best.pt``: its weights,
    with the population statistics the test number used (re-estimated with the run's
    trainer.reestimate_* settings and seed where trainer.reestimate_stats, else the EMA's).
    With ``check``, score the test split with the file's statistics and put that beside
    results.json's number in the returned record."""
    run_dir = Path(run_dir)
    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        raise BnrnnError(f"{run_dir} has not finished (no {RESULTS_FILE}): only a finished run's best checkpoint "
                         "is published")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    source = run_dir / "checkpoints" / BEST
    payload = load_checkpoint(source)
    cfg = load_config(read_run_config(run_dir, "publishing a run"))
    cfg.device.name = "cpu"  # the statistics are a property of the weights, not of the device
    device = resolve_device("cpu")
    task = build_task(cfg)
    task.keep_artifacts(run_dir)  # the run's pixel order / vocabulary must be the data's
    model = task.build_model(cfg.model).to(device)
    load_weights(model, payload["model"], source, run_dir / "config.yaml")
    tcfg = cfg.trainer
    if not time_norms(model):
        statistics: dict[str, Any] = {"source": "none"}
    elif tcfg.reestimate_stats:
        with precision_context(device, tcfg.precision):  # as the run's test re-estimated them
            batches = reestimate(task, model, device, cfg.seed, tcfg.reestimate_batches, tcfg.reestimate_batch_size)
        statistics = {"source": "reestimated", "batches": batches,
                      "batch_size": tcfg.reestimate_batch_size or cfg.task.batch_size}
    else:
        statistics = {"source": "ema"}
    progress = payload["progress"]
    save_checkpoint(run_dir / BEST, {
        "model": model.state_dict(),
        "progress": {key: progress[key] for key in ("step", "best_step", "best_metric") if key in progress},
        "config": payload.get("config", {}),
        "population_statistics": statistics,
    })
    record = {"run": str(run_dir), "file": str(run_dir / BEST), "step": progress["step"],
              "population_statistics": statistics}
    if check:
        metric, _ = task.selection
        with precision_context(device, tcfg.precision):
            record["test"] = score(task, model, "test", device, "ema")[metric]  # "ema": the model's own buffers
        record["results_json"] = results.get(f"test_{metric}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnrnn.published", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for run in args.runs:
        try:
            record = publish_best(run)
        except BnrnnError as exc:
            print(f"{run}: {exc}", file=sys.stderr)
            return 1
        stats = record["population_statistics"]
        named = DESCRIPTIONS.get(stats["source"], "no batch norm")
        print(f"{record['file']}: step {record['step']}, {named}; test {record['test']:.4f} "
              f"(results.json: {record['results_json']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
