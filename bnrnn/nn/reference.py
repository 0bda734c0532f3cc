"""The paper's model, as the paper writes it: per-time-step batch norm and the BN-LSTM.

Cooijmans et al. (2017), eqs. 5-8. For a time step t, features over a minibatch of B:

    BN(h; gamma, beta) = beta + gamma * (h - E[h]) / sqrt(Var[h] + eps)          (5)

with E and Var the batch mean and (biased) variance of *that step* in training, and the
population statistics of that step at inference (the last step's beyond T_max). The LSTM:

    (i~, f~, g~, o~) = BN(W_h h_{t-1}; gamma_h, 0) + BN(W_x x_t; gamma_x, 0) + b     (6)
    c_t = sigmoid(f~) * c_{t-1} + sigmoid(i~) * tanh(g~)                             (7)
    h_t = sigmoid(o~) * tanh(BN(c_t; gamma_c, beta_c))                               (8)

The x and h terms carry no beta of their own (the bias b plays that role), the cell
*update* is never normalised, and each of the three norms can be switched off
(all off: a vanilla LSTM; BN_x alone: Laurent et al.'s BN-input LSTM). With layer norm
(Ba et al., 2016: :class:`LayerNormTerm`) each term is normalised over its own features
instead of over the batch, with a gain and a bias each, and no statistics are kept.

:func:`reference_forward` is this, step by step: every fast path in
:mod:`bnrnn.nn.backends` is tested against it (tests/test_bnlstm_reference.py,
tests/test_backends.py, tests/test_cpu_extension.py, tests/test_triton_path.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]


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
        # Set to a list, it receives the per-step batch variance (averaged over the features,
        # (T,)) of the first sequence normalised with batch statistics in evaluation mode:
        # what TensorBoard shows of W_h h at validation (bnrnn.train.batch_variance_watch).
        self.batch_var_watch: list[torch.Tensor] | None = None
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

    def watch_batch_variance(self, t0: int, var: torch.Tensor) -> None:
        """Keep the batch variance of evaluation-mode steps t0.., var (steps, F), if watched
        (:attr:`batch_var_watch`, a list of (steps,) pieces): those of the first sequence, up
        to T_max steps, whether it comes at once, a step at a time (the reference) or in
        chunks (a stream)."""
        watch = self.batch_var_watch
        if watch is None or t0 != sum(len(piece) for piece in watch) or t0 >= self.max_steps:
            return
        watch.append(var.detach()[: self.max_steps - t0].mean(dim=1).float().cpu())

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
                self.watch_batch_variance(t0, var)
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


class LayerNormTerm(nn.Module):
    """Layer norm of one term (Ba et al., 2016): each row normalised over its F features,
    LN(a) = gain * (a - mean_F(a)) / sqrt(var_F(a) + eps) + bias, the same at every time step.

    The same calls as :class:`TimeBatchNorm` (``forward(x, t)``, ``forward_sequence(x, t0)``),
    so the reference step takes either. Parameters: weight (the gain, init ``gain_init``)
    and bias (0), each (F,).
    """

    def __init__(self, num_features: int, gain_init: float = 1.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps, self.gain_init = eps, gain_init
        self.weight = nn.Parameter(torch.full((num_features,), float(gain_init)))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.gain_init)
        nn.init.zeros_(self.bias)

    def forward_sequence(self, x: torch.Tensor, t0: int = 0) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.forward_sequence(x, t)


def reference_forward(layer, x: torch.Tensor, state: State | None = None, t0: int = 0,
                      step_hook: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, State]:
    """Eqs. 6-8 over a sequence, one step at a time, for a :class:`~bnrnn.nn.lstm.BNLSTM` layer.

    Args:
        layer: the parameters (weight_ih (4H, I), weight_hh (4H, H), bias (4H,)) and the
            norms bn_x, bn_h (4H features), bn_c (H features); None where switched off.
        x: (T, B, I), time-major.
        state: (h, c), each (B, H); None for the layer's learned initial state.
        t0: the time index of x[0], for the per-step statistics of a sequence cut in pieces.
        step_hook: ``step_hook(t, h_t)`` sees every hidden state (B, H) as a node of the graph
            (e.g. to read dL/dh_t, the paper's Fig. 1).
    Returns:
        the hidden states (T, B, H), and the final (h_T, c_T).
    """
    h, c = layer.initial_state(x.shape[1]) if state is None else state
    # W_x x for all steps in one product; its per-step statistics do not depend on h.
    wx = torch.matmul(x, layer.weight_ih.t())
    if layer.bn_x is not None:
        wx = layer.bn_x.forward_sequence(wx, t0)
    wx = wx + layer.bias
    outputs = []
    # unbind(0), not wx[t]: indexing a tensor that needs grad makes every step's backward
    # allocate a full (T, B, 4H) zero gradient.
    for step, wx_t in enumerate(wx.unbind(0)):
        wh = torch.mm(h, layer.weight_hh.t())
        if layer.bn_h is not None:
            wh = layer.bn_h(wh, t0 + step)
        i, f, g, o = (wx_t + wh).chunk(4, dim=1)  # gate order of torch.nn.LSTM
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = c if layer.bn_c is None else layer.bn_c(c, t0 + step)
        h = torch.sigmoid(o) * torch.tanh(c_out)
        if step_hook is not None:
            step_hook(t0 + step, h)
        outputs.append(h)
    return torch.stack(outputs), (h, c)
