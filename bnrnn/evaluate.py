"""Evaluating a finished (or running) run: ``bnrnn eval RUN_DIR``.

Loads a run's config and checkpoint, optionally re-estimates the population statistics over
the training set (the authors' final-number protocol), scores a split, and for PTB runs the
length-generalisation experiment of the paper's Fig. 3b (bpc against sequence length with
population vs batch statistics), written as a markdown table, TensorBoard scalars and, when
matplotlib is installed, a PNG.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from bnrnn.checkpoint import load_checkpoint, load_weights, population_source
from bnrnn.config import load_config, read_run_config
from bnrnn.device import precision_context, resolve_device
from bnrnn.errors import BnrnnError
from bnrnn.nn.population import time_norms
from bnrnn.runfolder import checkpoint_file, make_writable_folder
from bnrnn.scoring import DESCRIPTIONS, reestimate, score
from bnrnn.tasks import build_task

log = logging.getLogger("bnrnn")

PAPER_LENGTHS = (50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)


def lengths_table(rows: list[dict[str, float]]) -> str:
    """Fig. 3b as markdown, with the paper's BN-LSTM numbers at the same lengths."""
    from bnrnn.paper import length_curves

    paper = length_curves()

    def paper_at(key: str, length: int) -> str:
        value = paper[key].at(length)
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| sequence length | sequences | test bpc, population statistics | test bpc, batch statistics "
        "| paper, population | paper, batch |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['length']} | {row['sequences']} | {row['bpc_population']:.4f} | {row['bpc_batch']:.4f} "
            f"| {paper_at('population', row['length'])} | {paper_at('batch', row['length'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_lengths(rows: list[dict[str, float]], train_length: int, path: Path, title: str) -> bool:
    """Fig. 3b as a PNG; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from bnrnn.paper import length_curves

    lengths = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    ax.plot(lengths, [r["bpc_population"] for r in rows], "o-", label="ours: population statistics")
    ax.plot(lengths, [r["bpc_batch"] for r in rows], "s--", label="ours: batch statistics")
    for (key, curve), style in zip(length_curves().items(), ("^:", "o-", "s--")):
        ax.plot(curve.x, curve.y, style, color="black", alpha=0.3 if key == "lstm" else 0.7, ms=3, lw=1,
                label=curve.label)
    ax.axvline(train_length, color="grey", lw=0.8, ls=":", label=f"T_max = {train_length}")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("bits per character")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def evaluate_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    split: str = "test",
    reestimate_stats: bool = False,
    reestimate_batches: int | None = None,
    reestimate_batch_size: int | None = None,
    lengths: list[int] | None = None,
    batch_size: int | None = None,
    data_root: str | None = None,
    device_name: str | None = None,
    out_dir: str | Path | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Score one run's checkpoint; write eval.json (and the Fig. 3b outputs) into ``out_dir``
    (default RUN_DIR/eval); return what was written to eval.json. ``precision`` ("32" or
    "bf16"): score in it instead of the run's ``trainer.precision``."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    cfg = read_run_config(run_dir, "bnrnn eval")
    if data_root is not None:
        cfg.data.root = data_root
    if device_name is not None:
        cfg.device.name = device_name
    if precision is not None:
        cfg.trainer.precision = precision
    cfg = load_config(cfg)
    if split not in ("valid", "test"):
        raise BnrnnError(f"unknown split '{split}'; choose valid or test")
    ckpt_path = checkpoint_file(run_dir, checkpoint)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"
    created = not out_dir.exists()
    make_writable_folder(out_dir, "the output folder (--out)")  # before the work, not after it
    try:
        return score_run(run_dir, config_file, ckpt_path, out_dir, cfg, checkpoint, split, reestimate_stats,
                         reestimate_batches, reestimate_batch_size, lengths, batch_size)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)  # a failed eval leaves no empty folder behind
        raise


def score_run(run_dir: Path, config_file: Path, ckpt_path: Path, out_dir: Path, cfg, checkpoint: str, split: str,
              reestimate_stats: bool, reestimate_batches: int | None, reestimate_batch_size: int | None,
              lengths, batch_size: int | None) -> dict[str, Any]:
    """:func:`evaluate_run`'s work, into ``out_dir`` (which exists)."""
    payload = load_checkpoint(ckpt_path)
    device = resolve_device(cfg.device.name)
    task = build_task(cfg)
    task.keep_artifacts(run_dir)  # the run's pixel order / vocabulary must be the data's
    if lengths and not task.language_model:
        raise BnrnnError(f"--lengths needs a language-modelling task; {run_dir} trained on {cfg.task.name}")
    if lengths:
        task.check_lengths(split, list(lengths), batch_size)
    model = task.build_model(cfg.model).to(device)
    load_weights(model, payload["model"], ckpt_path, config_file)
    model.eval()

    metric, _ = task.selection
    result: dict[str, Any] = {
        "run": str(run_dir), "checkpoint": checkpoint, "step": payload["progress"]["step"], "split": split,
        "precision": cfg.trainer.precision,
    }
    normalised = bool(time_norms(model))
    # The population buffers hold the EMA's statistics, or, in a published best.pt, the
    # re-estimated ones its run's test number used: named (and keyed in eval.json) as such.
    population = population_source(payload)
    with precision_context(device, cfg.trainer.precision):
        for mode in ("ema", "batch") if normalised else ("ema",):
            key = population if mode == "ema" and normalised else mode
            result[key] = score(task, model, split, device, mode)
            log.info("%s, %s: %s %.4f", split, DESCRIPTIONS[key], metric, result[key][metric])
        if reestimate_stats:
            # Kept in the model (not only scored): the Fig. 3b sweep below uses them too.
            result["reestimate_batches"] = reestimate(task, model, device, cfg.seed, reestimate_batches, reestimate_batch_size)
            result["reestimated"] = score(task, model, split, device, "ema")
            if normalised:
                log.info("%s, %s over %d training batches: %s %.4f", split, DESCRIPTIONS["reestimated"],
                         result["reestimate_batches"], metric, result["reestimated"][metric])
    if lengths:
        rows = task.evaluate_lengths(model, split, list(lengths), device, batch_size)
        result["lengths"] = rows
        table = lengths_table(rows)
        (out_dir / "lengths.md").write_text(table)
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out_dir)) as writer:
            for row in rows:
                writer.add_scalars("fig3b/bpc", {"population": row["bpc_population"], "batch": row["bpc_batch"]},
                                   row["length"])
        stats = DESCRIPTIONS["reestimated" if reestimate_stats else population]
        title = f"{cfg.task.name} {cfg.model.name}, {split} (step {result['step']}; {stats})"
        if plot_lengths(rows, task.train_length, out_dir / "lengths.png", title):
            result["plot"] = str(out_dir / "lengths.png")
        print(table, end="")
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result
