"""What to record when a training step goes non-finite, and what it most likely means.

A diverged BN-LSTM has a handful of usual causes, and each leaves a different trace:

- bad data: the input batch itself holds NaN or inf;
- a collapsed batch variance: some feature has (almost) the same value for every example
  (e.g. the black leading pixels of MNIST with a shared h0), so BN's backward gain
  gamma / sqrt(var + eps) approaches gamma / sqrt(eps) ~ 300 gamma per step and the
  gradient overflows even though the loss is finite;
- an overflowing forward pass (weights grown too large: learning rate too high);
- an exploding gradient with a finite loss (no or too loose clipping).

:func:`divergence_report` gathers the evidence for one step; :func:`likely_cause` turns it
into a sentence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bnrnn.nn.norms import Norm

# A batch variance below this many eps counts as collapsed (BN's gain is then within ~3x
# of its maximum gamma / sqrt(eps)).
COLLAPSED_VARIANCE_EPS = 10.0


def tensors_in(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a batch (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        return [t for item in batch for t in tensors_in(item)]
    return []


def batch_is_finite(batch: Any) -> bool:
    return all(torch.isfinite(t).all().item() for t in tensors_in(batch) if t.is_floating_point())


def finite_or_text(value: float) -> float | str:
    """JSON-safe: non-finite floats as the strings 'nan', 'inf', '-inf'."""
    return value if math.isfinite(value) else str(value)


def gradient_norms(model: nn.Module) -> dict[str, float | str]:
    """L2 norm of each parameter's gradient (parameters without one are left out)."""
    return {
        name: finite_or_text(p.grad.detach().float().norm().item())
        for name, p in model.named_parameters() if p.grad is not None
    }


def norm_summaries(model: nn.Module) -> dict[str, dict[str, float | str]]:
    """Per norm: gamma min/max/mean and, for batch norm, the smallest batch variance of the
    last sequence folded into its population."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Norm):
            gamma = module.weight.detach()
            entry = {
                "gamma_min": finite_or_text(gamma.min().item()),
                "gamma_max": finite_or_text(gamma.max().item()),
                "gamma_mean": finite_or_text(gamma.mean().item()),
                "eps": module.eps,
            }
            if module.keeps_population and module.last_batch_var_min is not None:
                entry["batch_var_min"] = finite_or_text(module.last_batch_var_min.item())
            out[name] = entry
    return out


def divergence_report(model: nn.Module, loss: torch.Tensor, grad_norm: torch.Tensor, batch: Any, step: int) -> dict[str, Any]:
    """Everything known about a non-finite step, JSON-serialisable."""
    grads = gradient_norms(model)
    report = {
        "step": step,
        "loss": finite_or_text(loss.item()),
        "grad_norm": finite_or_text(grad_norm.item()),
        "input_finite": batch_is_finite(batch),
        "nonfinite_grads": [name for name, value in grads.items() if isinstance(value, str)],
        "nonfinite_params": [name for name, p in model.named_parameters() if not torch.isfinite(p).all()],
        "grad_norms": grads,
        "norms": norm_summaries(model),
    }
    report["likely_cause"] = likely_cause(report)
    return report


def collapsed_norms(report: dict[str, Any]) -> list[str]:
    out = []
    for name, entry in report["norms"].items():
        var = entry.get("batch_var_min")
        if isinstance(var, float) and var < COLLAPSED_VARIANCE_EPS * entry["eps"]:
            out.append(name)
    return out


def likely_cause(report: dict[str, Any]) -> str:
    """One sentence naming the most likely cause and what to try."""
    if not report["input_finite"]:
        return "the input batch holds NaN or inf values: the data is broken, not the model"
    if report["nonfinite_params"]:
        return (f"parameters are already non-finite ({', '.join(report['nonfinite_params'][:3])}); "
                f"resume from the last good checkpoint with a lower trainer.lr")
    collapsed = collapsed_norms(report)
    loss_finite = not isinstance(report["loss"], str)
    recurrent = [name for name in collapsed if not name.endswith("norm_x")]
    if recurrent and loss_finite:
        return (f"the batch variance collapsed to ~0 in {', '.join(recurrent)}, so batch norm's gain "
                f"gamma/sqrt(eps) blew up the gradient: add noise to the initial state (model.h0_noise, "
                f"e.g. 0.1) or use a larger batch")
    if collapsed and loss_finite:
        return (f"the input term has zero batch variance at some steps ({', '.join(collapsed)}: identical "
                f"inputs such as black pixels) and the gradient overflowed: lower model.gamma_init or trainer.lr")
    if not loss_finite:
        return "the forward pass overflowed (non-finite loss with finite inputs): lower trainer.lr"
    return ("the gradient overflowed with a finite loss: lower trainer.lr or set trainer.clip_norm "
            "(clipping cannot rescue an already non-finite gradient)")
