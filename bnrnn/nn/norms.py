"""The normalisations of an LSTM term, behind one interface, and the statistics they use.

A :class:`Norm` normalises one term of the cell (W_x x_t, W_h h_{t-1} or c_t; F features)
at time step t:

    norm.forward_sequence(x, t0, stats)   x (T, B, F), step i at time t0 + i -> (T, B, F)
    norm(x, t, stats)                     x (B, F), one step                  -> (B, F)

with a gain ``weight`` (F,) initialised to ``gamma_init`` and, where the norm has one, a
bias (F,). ``stats`` (a :class:`Statistics`) says what a norm that keeps population
statistics normalises with and what it does to them; it is an argument of every forward,
from the model down, never a flag set on the norm from outside. None means PyTorch's
convention: batch statistics folded into the population in ``train()``, the population in
``eval()``.

A new normalisation is one class here, registered by name (:func:`register`): the LSTM
layer builds it from ``model.norm`` and the reference (:mod:`bnrnn.nn.reference`) runs it
with no other edit. The fast backends run only the norms they declare.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import torch
from torch import nn


class Statistics(enum.Enum):
    """What a batch norm normalises with, and what it does to its population statistics."""

    TRAIN = "train"  # each step's batch statistics, folded into the population (EMA)
    BATCH = "batch"  # each step's batch statistics; the population untouched
    POPULATION = "population"  # the population's, slot min(t, T_max - 1)
    REESTIMATE = "reestimate"  # each step's batch statistics, averaged into the population

    @property
    def from_batch(self) -> bool:
        """Normalise with the batch's own statistics (the model then sees inputs as in
        training: the LSTM draws its h0 noise)."""
        return self is not Statistics.POPULATION

    @property
    def updates_population(self) -> bool:
        return self in (Statistics.TRAIN, Statistics.REESTIMATE)

    @staticmethod
    def of(module: nn.Module, stats: Statistics | None = None) -> Statistics:
        """``stats``, or where None, what ``module.training`` means: TRAIN or POPULATION."""
        if stats is not None:
            return stats
        return Statistics.TRAIN if module.training else Statistics.POPULATION


NORMS: dict[str, type[Norm]] = {}


def register(name: str):
    """Class decorator: the norm ``model.norm=<name>`` builds."""

    def add(cls: type[Norm]) -> type[Norm]:
        cls.name = name
        NORMS[name] = cls
        return cls

    return add


def make_norm(name: str, num_features: int, max_steps: int, gamma_init: float, learn_bias: bool,
              momentum: float | None, eps: float) -> Norm:
    """The registered norm ``name`` for a term of ``num_features``; ``learn_bias``: the term
    has a bias of its own (the cell term; the x and h terms share the LSTM's bias b)."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose one of {', '.join(NORMS)}")
    return NORMS[name].build(num_features, max_steps, gamma_init, learn_bias, momentum, eps)


class Norm(nn.Module):
    """The interface (see the module's docstring). Subclasses define :meth:`normalise`."""

    name: ClassVar[str]
    keeps_population: ClassVar[bool] = False  # population statistics per time step (buffers)

    def __init__(self, num_features: int, gamma_init: float, learn_bias: bool, eps: float) -> None:
        super().__init__()
        self.num_features, self.gamma_init, self.eps = num_features, gamma_init, eps
        self.weight = nn.Parameter(torch.full((num_features,), float(gamma_init)))
        self.bias = nn.Parameter(torch.zeros(num_features)) if learn_bias else None

    @classmethod
    def build(cls, num_features: int, max_steps: int, gamma_init: float, learn_bias: bool, momentum: float | None,
              eps: float) -> Norm:
        """The norm of one term, from the layer's settings (a row-wise norm needs neither
        ``max_steps`` nor ``momentum``)."""
        return cls(num_features, gamma_init, learn_bias, eps)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def normalise(self, x: torch.Tensor, t0: int, stats: Statistics) -> torch.Tensor:
        """``x`` (T, B, F) normalised, before the gain and bias."""
        raise NotImplementedError

    def forward_sequence(self, x: torch.Tensor, t0: int = 0, stats: Statistics | None = None) -> torch.Tensor:
        """Normalise a whole sequence: ``x`` (T, B, F), step i at time t0 + i."""
        y = self.normalise(x, t0, Statistics.of(self, stats)) * self.weight
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor, t: int, stats: Statistics | None = None) -> torch.Tensor:
        """Normalise one time step: ``x`` (B, F) at time index ``t`` (0-based)."""
        return self.forward_sequence(x.unsqueeze(0), t, stats).squeeze(0)


@register("batch")
class TimeBatchNorm(Norm):
    """Per-time-step batch norm (Cooijmans et al., eq. 5) over features F.

    Parameters: weight (gamma, init ``gamma_init``, the paper's 0.1) and, with
    ``learn_bias``, bias (beta), each (F,).
    Buffers:
        running_mean, running_var: (max_steps, F), starting at 0 and 1.
        num_batches_tracked: (max_steps,) int64, minibatches folded into each slot.

    ``momentum`` is the EMA rate alpha of :attr:`Statistics.TRAIN`:
    ``running = (1 - alpha) * running + alpha * batch``; ``None`` makes it a plain
    cumulative average since :meth:`reset_running_stats`, as :attr:`Statistics.REESTIMATE`
    always is (the authors re-estimated their final statistics so, with frozen weights). The
    population variance is the *biased* batch variance, the one the normalisation uses.

    Steps t >= max_steps are normalised with their own batch statistics but fold into no
    slot; with population statistics they use the last slot (the last that has folded a
    batch, :meth:`last_slot`).

    For diagnostics, :attr:`last_batch_var_min` holds the smallest batch variance of the
    last sequence folded into the population (a collapsed variance gives a gain of
    gamma / sqrt(eps)), and :meth:`watch_variance` records, once, the per-step batch
    variance of the next sequence normalised with :attr:`Statistics.BATCH`.
    """

    keeps_population = True

    def __init__(self, num_features: int, max_steps: int, gamma_init: float = 0.1, learn_bias: bool = False,
                 momentum: float | None = 0.01, eps: float = 1e-5) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        super().__init__(num_features, gamma_init, learn_bias, eps)
        self.max_steps = max_steps
        self.momentum = momentum
        self.last_batch_var_min: torch.Tensor | None = None
        self._watched: list[torch.Tensor] | None = None
        self._last_slot: tuple[torch.Tensor, int, int] | None = None  # (num_batches_tracked, its version, slot)
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features))
        self.register_buffer("running_var", torch.ones(max_steps, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(max_steps, dtype=torch.long))

    @classmethod
    def build(cls, num_features: int, max_steps: int, gamma_init: float, learn_bias: bool, momentum: float | None,
              eps: float) -> TimeBatchNorm:
        return cls(num_features, max_steps, gamma_init, learn_bias, momentum, eps)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, max_steps={self.max_steps}, momentum={self.momentum}, eps={self.eps}, "
                f"learn_bias={self.bias is not None}")

    # -- statistics ---------------------------------------------------------------------------

    def slot_indices(self, t0: int, steps: int, device: torch.device) -> torch.Tensor:
        """Population slot for each of the time steps t0 .. t0+steps-1: (steps,) int64; a
        step past the last slot with statistics (:meth:`last_slot`) reads that one."""
        return torch.arange(t0, t0 + steps, device=device).clamp_(max=self.last_slot())

    def last_slot(self) -> int:
        """The last population slot that holds statistics: the last that has folded a batch,
        or T_max - 1 while none has. Variable-length training can leave the last slots
        without a batch (no batch had enough sequences running there, see
        :class:`bnrnn.BNLSTM`'s ``stats_min_sequences``); they would hold only their initial 0
        and 1, so the steps past the last filled slot reuse it, as steps past T_max do.
        Cached against the tensor ``num_batches_tracked`` and its version counter, which
        every fold, reset and load changes (one device sync per change, not per step)."""
        tracked = self.num_batches_tracked
        cached = self._last_slot
        if cached is None or cached[0] is not tracked or cached[1] != tracked._version:
            filled = tracked.nonzero()
            cached = self._last_slot = (tracked, tracked._version,
                                        int(filled.max()) if filled.numel() else self.max_steps - 1)
        return cached[2]

    @torch.no_grad()
    def fold(self, t0: int, mean: torch.Tensor, var: torch.Tensor, stats: Statistics) -> None:
        """What ``stats`` does with the batch statistics of steps t0.. (mean and biased var,
        each (steps, F)): fold them into the population slots (TRAIN: the EMA; REESTIMATE:
        the cumulative average), or show them to the variance watch (BATCH)."""
        if stats is Statistics.BATCH:
            self._record_variance(t0, var)
            return
        if not stats.updates_population:
            return
        batch_min = var.min()  # t0 = 0 starts a sequence; the reference comes here once per step
        if t0 > 0 and self.last_batch_var_min is not None:
            batch_min = torch.minimum(self.last_batch_var_min, batch_min)
        self.last_batch_var_min = batch_min
        steps = min(mean.shape[0], self.max_steps - t0)
        if steps <= 0:
            return
        slots = slice(t0, t0 + steps)
        mean, var = mean[:steps].to(self.running_mean.dtype), var[:steps].to(self.running_var.dtype)
        self.num_batches_tracked[slots] += 1
        if stats is Statistics.REESTIMATE or self.momentum is None:
            rate = (1.0 / self.num_batches_tracked[slots].to(mean.dtype)).unsqueeze(1)  # running += (x - running) / n
        else:
            rate = self.momentum
        self.running_mean[slots].lerp_(mean, rate)
        self.running_var[slots].lerp_(var, rate)

    def watch_variance(self) -> None:
        """Record the per-step batch variance (averaged over the features) of the next
        sequence normalised with :attr:`Statistics.BATCH`, up to T_max steps, whether it comes
        at once, a step at a time or in chunks; :meth:`watched_variance` returns it."""
        self._watched = []

    def watched_variance(self) -> torch.Tensor | None:
        """The recording :meth:`watch_variance` asked for, (steps,), or None; recording stops."""
        watched, self._watched = self._watched, None
        return torch.cat(watched) if watched else None

    def _record_variance(self, t0: int, var: torch.Tensor) -> None:
        watched = self._watched
        if watched is None or t0 != sum(len(piece) for piece in watched) or t0 >= self.max_steps:
            return
        watched.append(var.detach()[: self.max_steps - t0].mean(dim=1).float().cpu())

    def statistics(self, x: torch.Tensor, t0: int, stats: Statistics) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance to normalise ``x`` (T, B, F) with, each (T, 1, F), as ``stats``
        says (and folded as it says)."""
        if stats.from_batch:
            var, mean = torch.var_mean(x, dim=1, unbiased=False)
            self.fold(t0, mean.detach(), var.detach(), stats)
        else:
            slots = self.slot_indices(t0, x.shape[0], x.device)
            mean, var = self.running_mean[slots], self.running_var[slots]
        return mean.unsqueeze(1), var.unsqueeze(1)

    # -- normalisation ------------------------------------------------------------------------

    def normalise(self, x: torch.Tensor, t0: int, stats: Statistics) -> torch.Tensor:
        mean, var = self.statistics(x, t0, stats)
        return (x - mean) * torch.rsqrt(var + self.eps)

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


@register("layer")
class LayerNorm(Norm):
    """Layer norm of one term (Ba et al., 2016): each row normalised over its F features,
    LN(a) = gain * (a - mean_F(a)) / sqrt(var_F(a) + eps) + bias, the same at every step and
    in every statistics mode. Every term has a bias (the x and h terms' add to b)."""

    def __init__(self, num_features: int, gamma_init: float = 1.0, learn_bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__(num_features, gamma_init, True, eps)

    def normalise(self, x: torch.Tensor, t0: int, stats: Statistics) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], None, None, self.eps)

    def forward_sequence(self, x: torch.Tensor, t0: int = 0, stats: Statistics | None = None) -> torch.Tensor:
        # one op with the gain and bias, as the fast path computes it
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


@register("rms")
class RMSNorm(Norm):
    """RMS norm of one term (Zhang and Sennrich, 2019): each row divided by its root mean
    square over its F features, RMS(a) = gain * a / sqrt(mean_F(a^2) + eps), no centring and
    no statistics kept; the cell term alone has a bias (as in the BN-LSTM)."""

    def normalise(self, x: torch.Tensor, t0: int, stats: Statistics) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + self.eps)
