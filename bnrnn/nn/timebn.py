"""Batch normalisation with separate statistics for every time step (Cooijmans et al., eq. 5).

The statistics are per feature over the minibatch and *per time step*: step t is normalised
with the mean and biased variance of step t's activations only. gamma (and beta, where it is
not redundant with a bias that follows) are shared over time. Population statistics are kept
for t = 0 .. max_steps - 1; beyond that the last step's statistics are reused, which is how
the paper generalises to sequences longer than those seen in training.
"""

from __future__ import annotations

import torch
from torch import nn


class TimeBatchNorm(nn.Module):
    """Per-time-step batch norm over features F.

    Parameters:
        weight: gamma, shape (F,), initialised to ``gamma_init`` (the paper's 0.1).
        bias: beta, shape (F,), only when ``learn_bias`` (the cell term; the x and h terms
            share the LSTM's single bias instead).
    Buffers:
        running_mean, running_var: (max_steps, F), starting at 0 and 1.
        num_batches_tracked: (max_steps,) int64, minibatches folded into each slot.

    ``momentum`` is the exponential-moving-average rate alpha:
    ``running = (1 - alpha) * running + alpha * batch``. With ``momentum=None`` the running
    statistics are a plain cumulative average over the batches seen since
    :meth:`reset_running_stats` (used to re-estimate population statistics with frozen
    weights, as the authors did for their final numbers). The population variance is the
    *biased* batch variance, the quantity the normalisation itself uses.

    ``batch_stats_in_eval`` (a plain attribute, off by default) makes evaluation mode use the
    batch statistics of each step too, without touching the population: the "batch
    statistics" arm of the paper's Fig. 3b (see :func:`bnrnn.nn.population.batch_statistics`).

    In training mode, steps t >= max_steps are normalised with their own batch statistics
    but do not update any population slot (slot max_steps - 1 holds step max_steps - 1's).
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        gamma_init: float = 0.1,
        learn_bias: bool = False,
        momentum: float | None = 0.01,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.num_features = num_features
        self.max_steps = max_steps
        self.gamma_init = gamma_init
        self.momentum = momentum
        self.eps = eps
        self.batch_stats_in_eval = False
        # Smallest batch variance of the last training forward (a 0-d tensor, for the
        # divergence diagnostics: a collapsed variance makes BN's gain gamma/sqrt(eps) huge).
        self.last_batch_var_min: torch.Tensor | None = None
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features)) if learn_bias else None
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features))
        self.register_buffer("running_var", torch.ones(max_steps, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(max_steps, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_steps={self.max_steps}, momentum={self.momentum}, "
            f"eps={self.eps}, learn_bias={self.bias is not None}"
        )

    # -- statistics ---------------------------------------------------------------------------

    def slot_indices(self, t0: int, steps: int, device: torch.device) -> torch.Tensor:
        """Population slot for each of the time steps t0 .. t0+steps-1: (steps,) int64."""
        return torch.arange(t0, t0 + steps, device=device).clamp_(max=self.max_steps - 1)

    @property
    def uses_batch_stats(self) -> bool:
        return self.training or self.batch_stats_in_eval

    @torch.no_grad()
    def update_running_stats(self, t0: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Fold batch statistics of steps t0.. (each (steps, F)) into the population slots."""
        # t0 = 0 starts a new sequence; the reference path comes here once per step.
        batch_min = var.min()
        if t0 > 0 and self.last_batch_var_min is not None:
            batch_min = torch.minimum(self.last_batch_var_min, batch_min)
        self.last_batch_var_min = batch_min
        steps = min(mean.shape[0], self.max_steps - t0)
        if steps <= 0:
            return
        slots = slice(t0, t0 + steps)
        mean, var = mean[:steps].to(self.running_mean.dtype), var[:steps].to(self.running_var.dtype)
        self.num_batches_tracked[slots] += 1
        if self.momentum is None:
            # cumulative average: running += (batch - running) / n
            rate = (1.0 / self.num_batches_tracked[slots].to(mean.dtype)).unsqueeze(1)
        else:
            rate = self.momentum
        self.running_mean[slots].lerp_(mean, rate)
        self.running_var[slots].lerp_(var, rate)

    def statistics(self, x: torch.Tensor, t0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance to normalise ``x`` (T, B, F) with: each (T, 1, F).

        Training: batch statistics of each step (and the population update as a side effect).
        Evaluation: population statistics, slot min(t, max_steps - 1), unless
        ``batch_stats_in_eval``.
        """
        if self.uses_batch_stats:
            var, mean = torch.var_mean(x, dim=1, unbiased=False)
            if self.training:
                self.update_running_stats(t0, mean.detach(), var.detach())
        else:
            slots = self.slot_indices(t0, x.shape[0], x.device)
            mean, var = self.running_mean[slots], self.running_var[slots]
        return mean.unsqueeze(1), var.unsqueeze(1)

    # -- normalisation ------------------------------------------------------------------------

    def forward_sequence(self, x: torch.Tensor, t0: int = 0) -> torch.Tensor:
        """Normalise a whole sequence at once: ``x`` (T, B, F), step i is time t0 + i."""
        mean, var = self.statistics(x, t0)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Normalise one time step: ``x`` (B, F) at time index ``t`` (0-based)."""
        return self.forward_sequence(x.unsqueeze(0), t).squeeze(0)

    def affine_at(self, t0: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Population-statistics normalisation as ``y = x * scale + shift``: each (steps, F).

        Used to fold BN into the adjacent weights at inference.
        """
        slots = self.slot_indices(t0, steps, self.running_mean.device)
        scale = self.weight * torch.rsqrt(self.running_var[slots] + self.eps)
        shift = -self.running_mean[slots] * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift
