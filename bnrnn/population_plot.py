"""``bnrnn eval RUN --stats``: a run's population statistics against the time step.

The paper's appendix (and the reason statistics are kept per step): the mean and variance
of each normalised term move a lot over the first ~10 steps and then settle, which is also
why the last step's statistics can stand in for every step beyond T_max. This draws, for
each norm (x, h, c) of the checkpoint, the population mean and variance of a few features
and the spread (10th to 90th percentile) over all features, for t = 0 .. T_max - 1, with
the last slot marked. It reads the checkpoint's buffers only: no data set is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bnrnn.checkpoint import load_checkpoint

NORMS = {"x": "BN_x (W_x x)", "h": "BN_h (W_h h)", "c": "BN_c (c)"}
SHOWN_FEATURES = 4


def population_statistics(state_dict: dict[str, torch.Tensor],
                          labels: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {"mean": (T_max, F), "var": (T_max, F)}} for each norm the model has, from its
    state dict (``rnn.cells.{i}.*``, ``labels`` one per cell, :attr:`bnrnn.BNLSTM.labels`):
    name "x" | "h" | "c" for a single cell, "x_layer2_reverse" and so on in a stack."""
    from bnrnn.layer import norm_name

    out = {}
    for index, label in enumerate(labels):
        for term in NORMS:
            prefix = f"rnn.cells.{index}.norm_{term}."
            if prefix + "running_mean" in state_dict:
                out[norm_name(term, label if len(labels) > 1 else None)] = {
                    "mean": state_dict[prefix + "running_mean"].double(),
                    "var": state_dict[prefix + "running_var"].double()}
    return out


def title(name: str) -> str:
    """"h" -> "BN_h (W_h h)"; "h_layer2_reverse" -> "BN_h (W_h h), layer2 reverse"."""
    term, _, layer = name.partition("_")
    return NORMS[term] + (f", {layer.replace('_', ' ')}" if layer else "")


def summary(stats: dict[str, dict[str, torch.Tensor]], features: int = SHOWN_FEATURES) -> dict[str, Any]:
    """What the figure draws, as plain lists: per norm and statistic, the first ``features``
    features' curves and the 10th / 50th / 90th percentiles over all features, per step."""
    out: dict[str, Any] = {}
    for term, both in stats.items():
        entry: dict[str, Any] = {"steps": both["mean"].shape[0], "features": list(range(min(features, both["mean"].shape[1])))}
        for name, values in both.items():  # values (T, F)
            q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype), dim=1)  # (3, T)
            entry[name] = {
                "shown": values[:, entry["features"]].t().tolist(),  # [feature][t]
                "p10": q[0].tolist(), "p50": q[1].tolist(), "p90": q[2].tolist(),
            }
        out[term] = entry
    return out


def plot_population(run_dir: str | Path, checkpoint: str = "best", out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write population.png and population.json for a run's checkpoint; return their paths."""
    from bnrnn.errors import BnrnnError
    from bnrnn.runfolder import checkpoint_file, make_writable_folder

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"
    payload = load_checkpoint(checkpoint_file(run_dir, checkpoint))
    stats = population_statistics(payload["model"], stack_labels(payload.get("config", {}).get("model", {})))
    if not stats:
        raise BnrnnError(f"{run_dir}'s model has no batch norm, so no population statistics to draw")
    data = {"run": str(run_dir), "checkpoint": checkpoint, "step": payload["progress"]["step"], **summary(stats)}
    make_writable_folder(out_dir, "the output folder (--out)")  # once there is something to write into it
    (out_dir / "population.json").write_text(json.dumps(data))
    figure = out_dir / "population.png"
    draw(data, figure)
    return {"json": out_dir / "population.json", "figure": figure}


def stack_labels(model: dict[str, Any]) -> list[str]:
    """The labels of a checkpoint's cells, one per layer and direction (from its saved model
    settings; one layer in checkpoints from before stacks)."""
    from bnrnn.layer import layer_labels

    return layer_labels(model.get("num_layers", 1), model.get("bidirectional", False))


def draw(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in data if k.partition("_")[0] in NORMS]  # "x", or "x_layer2_reverse" in a stack
    terms = [t for t in NORMS if any(k.partition("_")[0] == t for k in names)]
    layers = list(dict.fromkeys(k.partition("_")[2] for k in names))
    height = 3.2 * len(layers) * 2 + 0.8  # inches: 3.2 per row, 0.8 for the legend and the title
    fig, axes = plt.subplots(2 * len(layers), len(terms), figsize=(4.2 * len(terms), height), squeeze=False,
                             sharex="col")
    for key in names:
        term, _, layer = key.partition("_")
        col, first_row = terms.index(term), 2 * layers.index(layer)
        entry = data[key]
        steps = list(range(entry["steps"]))
        for row, name in enumerate(("mean", "var"), start=first_row):
            ax = axes[row][col]
            ax.fill_between(steps, entry[name]["p10"], entry[name]["p90"], color="0.85",
                            label="10th-90th percentile, all features")
            ax.plot(steps, entry[name]["p50"], color="0.4", lw=1, label="median, all features")
            for f, curve in zip(entry["features"], entry[name]["shown"]):
                ax.plot(steps, curve, lw=1, label=f"feature {f}")
            ax.axvline(entry["steps"] - 1, color="k", ls="--", lw=0.8, label="T_max - 1: reused beyond")
            if entry["steps"] > 50:
                ax.set_xscale("symlog", linthresh=10)
            ax.set_title(f"{title(key)}: population {'mean' if name == 'mean' else 'variance'}", fontsize=9)
            if row == len(axes) - 1:
                ax.set_xlabel("time step t")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Population statistics per time step, {data['run']} ({data['checkpoint']}.pt, step {data['step']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1 - 0.3 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
