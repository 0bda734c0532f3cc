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


def population_statistics(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"x"|"h"|"c": {"mean": (T_max, F), "var": (T_max, F)}} for each norm the model has."""
    out = {}
    for term in NORMS:
        prefix = f"rnn.bn_{term}."
        if prefix + "running_mean" in state_dict:
            out[term] = {"mean": state_dict[prefix + "running_mean"].double(),
                         "var": state_dict[prefix + "running_var"].double()}
    return out


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
    from bnrnn.runfolder import make_writable_folder

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"
    make_writable_folder(out_dir, "the output folder (--out)")
    payload = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt")
    stats = population_statistics(payload["model"])
    if not stats:
        raise BnrnnError(f"{run_dir}'s model has no batch norm, so no population statistics to draw")
    data = {"run": str(run_dir), "checkpoint": checkpoint, "step": payload["progress"]["step"], **summary(stats)}
    (out_dir / "population.json").write_text(json.dumps(data))
    figure = out_dir / "population.png"
    draw(data, figure)
    return {"json": out_dir / "population.json", "figure": figure}


def draw(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [t for t in NORMS if t in data]
    fig, axes = plt.subplots(2, len(terms), figsize=(4.2 * len(terms), 6.4), squeeze=False, sharex="col")
    for col, term in enumerate(terms):
        entry = data[term]
        steps = list(range(entry["steps"]))
        for row, name in enumerate(("mean", "var")):
            ax = axes[row][col]
            ax.fill_between(steps, entry[name]["p10"], entry[name]["p90"], color="0.85",
                            label="10th-90th percentile, all features")
            ax.plot(steps, entry[name]["p50"], color="0.4", lw=1, label="median, all features")
            for f, curve in zip(entry["features"], entry[name]["shown"]):
                ax.plot(steps, curve, lw=1, label=f"feature {f}")
            ax.axvline(entry["steps"] - 1, color="k", ls="--", lw=0.8, label="T_max - 1: reused beyond")
            if entry["steps"] > 50:
                ax.set_xscale("symlog", linthresh=10)
            ax.set_title(f"{NORMS[term]}: population {'mean' if name == 'mean' else 'variance'}", fontsize=9)
            if row == 1:
                ax.set_xlabel("time step t")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Population statistics per time step, {data['run']} ({data['checkpoint']}.pt, step {data['step']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
