"""What the training loop watches of the model: the norms' gains and statistics for
TensorBoard, the gradient norm, and the diagnostics of a non-finite step."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from bnrnn.diagnostics import divergence_report
from bnrnn.layer import norm_name
from bnrnn.runlog import RunLogger

log = logging.getLogger("bnrnn")


DIAGNOSTICS = "diagnostics"


def norms_by_term(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """("x" | "h" | "c", norm) for each normalisation of the model's recurrent layer; in a
    stack of layers or directions the term names the layer too ("x_layer2_reverse")."""
    rnn = getattr(model, "rnn", None)
    if rnn is None:
        return []
    single = len(rnn.cells) == 1
    return [(norm_name(term, None if single else label), norm)
            for cell, label in zip(rnn.cells, rnn.labels)
            for term, norm in (("x", cell.norm_x), ("h", cell.norm_h), ("c", cell.norm_c)) if norm is not None]


def gamma_summary(model: nn.Module) -> dict[str, float]:
    """Mean gamma of each normalisation (x, h, c): watching these shows saturation coming."""
    return {f"gamma_{term}_mean": bn.weight.detach().abs().mean().item() for term, bn in norms_by_term(model)}


def norm_histograms(model: nn.Module) -> dict[str, torch.Tensor]:
    """What to watch of each norm (x, h, c) as histograms: gamma over its features (shrinking
    or saturating gammas are the paper's Fig. 6), and the population variance of each time
    step averaged over the features (its first steps move, then it settles)."""
    out = {}
    for term, bn in norms_by_term(model):
        out[f"norms/gamma_{term}"] = bn.weight.detach().cpu()
        if bn.keeps_population:  # batch norm keeps population statistics; layer norm none
            out[f"norms/population_var_{term}_per_step"] = bn.running_var.detach().mean(dim=1).cpu()
    return out


@contextmanager
def batch_variance_watch(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each BN_h of the model keeps the per-step batch variance of W_h h
    (averaged over its features) of the first sequence evaluated with batch statistics (up
    to T_max steps); on
    leaving, the dict yielded holds them as ``norms/batch_var_<term>_per_step`` (T,) for
    TensorBoard's histograms (none where no sequence was evaluated so)."""
    watched = [(term, bn) for term, bn in norms_by_term(model) if term.startswith("h") and bn.keeps_population]
    found: dict[str, torch.Tensor] = {}
    for _, bn in watched:
        bn.watch_variance()
    try:
        yield found
    finally:
        for term, bn in watched:
            variance = bn.watched_variance()
            if variance is not None:
                found[f"norms/batch_var_{term}_per_step"] = variance


def total_gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together; non-finite only if a gradient is.

    An exploding (but finite) gradient, e.g. 1e35 after 784 steps of a vanilla LSTM, has a
    squared norm beyond float32's range: measured in float32 the norm would be inf and the
    step would be skipped although clipping can rescue it. Such norms are measured again in
    float64.
    """
    norm = torch.nn.utils.get_total_norm(grads)
    if not torch.isfinite(norm) and all(torch.isfinite(g).all() for g in grads):
        norm = torch.nn.utils.get_total_norm([g.double() for g in grads])
    return norm


def report_skipped_step(model: nn.Module, loss, grad_norm, batch, step: int, attempt: int, out_dir: Path,
                        logger: RunLogger) -> dict:
    """Write the diagnostics of a non-finite step to diagnostics/step-N-tryK.json (K counts the
    consecutive failed tries at step N, each on the next batch), and log a summary."""
    report = divergence_report(model, loss, grad_norm, batch, step)
    path = out_dir / DIAGNOSTICS / f"step-{step:08d}-try{attempt}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    logger.log("diverge", step, {
        "nonfinite_step": 1, "loss": report["loss"], "grad_norm": report["grad_norm"],
        "nonfinite_grads": report["nonfinite_grads"], "likely_cause": report["likely_cause"],
        "diagnostics": str(path),
    })
    logger.flush()
    # Name what was not finite: a finite loss with an overflowing gradient is another problem.
    what = "loss and gradient" if not torch.isfinite(loss) else "gradient (the loss was finite)"
    log.warning("step %d: non-finite %s: loss %s, gradient norm %s (non-finite in %s); update skipped; likely cause: "
                "%s; see %s", step, what, report["loss"], report["grad_norm"],
                ", ".join(report["nonfinite_grads"][:5]) or "-", report["likely_cause"], path)
    return report
