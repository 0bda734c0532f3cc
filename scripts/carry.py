#!/usr/bin/env python3
"""Carry a run's checkpoints from one machine to the next in a file small enough for git.

The campaign's runs (issue 28) outlast a session, and each session gets a fresh machine that
keeps only what git holds. ``last.pt`` stays out of git: with the per-time-step population
statistics it is about 6 MB for a seqMNIST BN-LSTM, once per run per session. This packs
what decides the rest of the run into ``<run>/carry.pt`` (a few hundred kB), and unpacks it
into ``checkpoints/last.pt`` and ``best.pt`` on the next machine:

    python scripts/carry.py pack RUN_DIR     # after the segment stopped: checkpoints/ -> carry.pt
    python scripts/carry.py unpack RUN_DIR   # on the next machine: carry.pt -> checkpoints/

What the carry keeps whole: the weights, the optimiser's state, the counters, the RNG states
and the config, so the training after an unpack is bit for bit the training of an
uninterrupted run, and so is every batch-statistics validation (the authors' selection
rule). What it drops: the population statistics (``running_mean``, ``running_var`` and
``num_batches_tracked`` of every per-step batch norm), which nothing in training reads.
The unpack re-estimates them over ``trainer.valid_reestimate_batches`` training batches with
the carried weights (:func:`bnrnn.scoring.reestimate`, seeded, the RNG put back); the EMA
then goes on from there. So after an unpack the EMA-statistics numbers differ a little
from an uninterrupted run's, and the headline test number, re-estimated over the training
set from the best weights, does not.

Run it with the Python of the environment that resumes the run (the campaign's worktree),
so that the model it builds is that code's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

FORMAT = "bnrnn-carry/1"
CARRY = "carry.pt"
POPULATION_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_population_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in POPULATION_BUFFERS


def without_population(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's state dict less its population statistics."""
    return {k: v for k, v in state.items() if not is_population_buffer(k)}


def pack(run_dir: Path) -> Path:
    """checkpoints/last.pt (and best.pt, where there is one) -> ``run_dir/carry.pt``; returns its path."""
    from bnrnn.runfolder import BEST, LAST

    ckpt_dir = run_dir / "checkpoints"
    last, best = consistent_pair(ckpt_dir / LAST, ckpt_dir / BEST)
    carried: dict[str, Any] = {
        "format": FORMAT,
        "last": {**{k: v for k, v in last.items() if k != "format"}, "model": without_population(last["model"])},
        "best": None,
    }
    if best is not None:
        carried["best"] = {"model": without_population(best["model"]), "progress": best["progress"],
                           "config": best["config"]}
    out = run_dir / CARRY
    tmp = out.with_name(out.name + ".tmp")
    torch.save(carried, tmp)
    tmp.replace(out)
    return out


def consistent_pair(last_path: Path, best_path: Path, tries: int = 20) -> tuple[dict, dict | None]:
    """last.pt and best.pt of one moment, read from a run that may be live (each file is
    replaced whole, but a validation can replace both between two reads): last.pt's
    ``best_step`` must be best.pt's step."""
    from bnrnn.checkpoint import load_checkpoint

    for _ in range(tries):
        last = load_checkpoint(last_path)
        best = load_checkpoint(best_path) if best_path.exists() else None
        if best is None or last["progress"].get("best_step") == best["progress"]["step"]:
            return last, best
        time.sleep(1.0)  # a validation is writing them: read again once it is done
    raise SystemExit(f"{last_path.parent}: last.pt's best step and best.pt's step disagree; pack it when the run stops")


def with_population(task, model: torch.nn.Module, weights: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """``weights`` (no population statistics) loaded into ``model``, its statistics re-estimated
    over the training batches; the full state dict."""
    from bnrnn.scoring import reestimate

    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or not all(is_population_buffer(k) for k in missing):
        raise SystemExit(f"the carry does not fit this code's model (missing {missing}, unexpected {unexpected})")
    reestimate(task, model, torch.device("cpu"), seed=cfg.seed, max_batches=cfg.trainer.valid_reestimate_batches)
    return model.state_dict()


def unpack(run_dir: Path) -> int:
    """``run_dir/carry.pt`` -> checkpoints/last.pt and best.pt; returns the step it goes on from.
    Refuses (SystemExit) where checkpoints/last.pt exists: a real checkpoint is never replaced."""
    from omegaconf import OmegaConf

    from bnrnn.checkpoint import save_checkpoint
    from bnrnn.runfolder import BEST, LAST, record_event
    from bnrnn.tasks import build_task

    ckpt_dir = run_dir / "checkpoints"
    if (ckpt_dir / LAST).exists():
        raise SystemExit(f"{ckpt_dir / LAST} exists: resume from it; the carry is for a machine without it")
    carried = torch.load(run_dir / CARRY, weights_only=True)
    if not isinstance(carried, dict) or carried.get("format") != FORMAT:
        raise SystemExit(f"{run_dir / CARRY} is not a bnrnn carry (no '{FORMAT}' marker)")
    last = carried["last"]
    cfg = OmegaConf.create(last["config"])
    task = build_task(cfg)
    if carried["best"] is not None:
        best = carried["best"]
        state = with_population(task, task.build_model(cfg.model), best["model"], cfg)
        save_checkpoint(ckpt_dir / BEST, {**best, "model": state})
    state = with_population(task, task.build_model(cfg.model), last["model"], cfg)
    save_checkpoint(ckpt_dir / LAST, {**last, "model": state})
    step = last["progress"]["step"]
    record_event(run_dir, "unpacked", step, note=f"checkpoints rebuilt from {CARRY}; population statistics "
                 f"re-estimated over {cfg.trainer.valid_reestimate_batches} training batches")
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    args = parser.parse_args()
    for run_dir in args.run_dirs:
        if args.action == "pack":
            out = pack(run_dir)
            print(f"{run_dir.name}: {out.name}, {out.stat().st_size / 1e6:.2f} MB")
        else:
            print(f"{run_dir.name}: checkpoints rebuilt at step {unpack(run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
