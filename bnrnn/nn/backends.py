"""Which implementation runs a BN-LSTM layer's recurrence: one interface, one registry.

Every backend is a :class:`Backend`: it declares the norms it computes and says, in one
sentence, why it cannot run an input (device, dtype, a missing kernel); it runs the layer
through two methods of one signature each:

    train(layer, x, h0, c0, t0, needs_grad, stats, gemm_dtype) -> (output (T, B, H), (h_T, c_T))
        batch statistics (folded into the population as ``stats`` says)
    infer(layer, x, h0, c0, t0, gemm_dtype) -> (output, (h_T, c_T))
        population statistics, or no norm at all and no gradient

with x (T, B, I) time-major and h0, c0 (B, H). The core backends sit in :mod:`bnrnn.nn`:
``reference`` (the paper's equations step by step, :mod:`bnrnn.nn.reference`; every norm)
and ``aten`` (the recurrence as one autograd Function of ATen ops,
:mod:`bnrnn.nn.aten_recurrence`; batch and layer norm). The compiled kernels are plug-ins
of :mod:`bnrnn.kernels` that register what they can run: ``cpu`` (the C++ loops) and
``triton`` (the CUDA kernels), batch norm only.

``model.backend`` names one, or ``auto`` (the default): the backend with the highest
``priority`` that computes the layer's norm and can run the input. A named backend that
cannot is refused with a sentence that names one that can; none reroutes quietly. The
backend that runs is logged once per process. All compute the same function: tests hold
each to the reference.

Under ``torch.autocast`` a backend that lists the autocast dtype in ``gemm_dtypes`` (aten and
the reference: bf16 and fp16) gets it as ``gemm_dtype`` and runs its GEMMs with operands in it, keeping the
statistics, the gates and the cell state in the parameters' dtype; ``auto`` prefers such a
backend. One that does not computes in the parameters' dtype, and says so once.
"""

from __future__ import annotations

import importlib
import logging
from typing import ClassVar

import torch

from bnrnn.nn.norms import Statistics

State = tuple[torch.Tensor, torch.Tensor]

log = logging.getLogger("bnrnn")

AUTO = "auto"
# The modules whose import registers backends: the core, then the kernel plug-ins.
PROVIDERS = ("bnrnn.nn.reference", "bnrnn.nn.aten_backend", "bnrnn.kernels")


class Backend:
    """The interface (see the module's docstring)."""

    name: ClassVar[str]
    norms: ClassVar[tuple[str, ...] | None] = None  # the norm kinds it computes; None: every norm
    priority: ClassVar[int] = 0  # auto takes the highest that can run the input
    gemm_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()  # the autocast dtypes its GEMMs can take

    def cannot_run(self, x: torch.Tensor) -> str | None:
        """Why this backend cannot run a sequence ``x`` (T, B, I) here (one clause, e.g. "it
        needs a CUDA GPU"), or None. No side effects: nothing is built."""
        return None

    def computes(self, norm: str | None) -> bool:
        """Whether it computes the norm kind ``norm`` (None: a layer with every norm off)."""
        return norm is None or self.norms is None or norm in self.norms

    def ready(self) -> bool:
        """Prepare to run (the cpu backend builds its loops on first use); False if it cannot,
        and the aten backend then takes over, as the warning the failure gave says."""
        return True

    def train(self, layer, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, t0: int, needs_grad: bool,
              stats: Statistics, gemm_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def infer(self, layer, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, t0: int,
              gemm_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, State]:
        raise NotImplementedError


BACKENDS: dict[str, Backend] = {}
_logged: set[str] = set()
_discovered = False
_by_priority: dict[str, Backend] | None = None  # BACKENDS ordered, made again after a register


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make the backend ``cls.name`` available (one instance)."""
    global _by_priority
    BACKENDS[cls.name] = cls()
    _by_priority = None
    return cls


def registered() -> dict[str, Backend]:
    """Every backend, highest priority first (the providers imported once)."""
    global _discovered, _by_priority
    if not _discovered:
        _discovered = True
        for module in PROVIDERS:
            importlib.import_module(module)
    if _by_priority is None:
        _by_priority = dict(sorted(BACKENDS.items(), key=lambda item: -item[1].priority))
    return _by_priority


def names() -> tuple[str, ...]:
    """The values ``model.backend`` takes: auto, then every backend."""
    return (AUTO, *registered())


def available(name: str, x: torch.Tensor) -> bool:
    """Whether backend ``name`` can run a sequence ``x`` (T, B, I): no side effects."""
    backend = registered().get(name)
    return backend is not None and backend.cannot_run(x) is None


def norm_kind(layer) -> str | None:
    """The layer's norm kind (``model.norm``), or None where every norm is off."""
    return layer.norm if layer.norms() else None


def select(requested: str, x: torch.Tensor, norm: str | None = None, gemm_dtype: torch.dtype | None = None) -> Backend:
    """The backend that runs the norm kind ``norm`` (None: every norm off) over ``x``:
    ``requested``, or for ``auto`` the highest priority one that computes the norm and can
    run ``x`` (with ``gemm_dtype``, autocast's: one whose GEMMs take it, where one can).
    ValueError with one sentence if a named backend cannot, naming one that can."""
    backends = registered()
    capable = [b for b in backends.values() if b.computes(norm) and b.cannot_run(x) is None]
    if requested == AUTO:
        in_low_precision = [b for b in capable if gemm_dtype in b.gemm_dtypes]
        return (in_low_precision or capable)[0]  # the reference runs anything
    if requested not in backends:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(names())}")
    backend = backends[requested]
    if not backend.computes(norm):
        raise ValueError(f"model.backend={backend.name} cannot run model.norm={norm}: it computes "
                         f"{' and '.join(backend.norms)} norm; use model.backend={capable[0].name} (or auto)")
    reason = backend.cannot_run(x)
    if reason is not None:
        raise ValueError(f"model.backend={backend.name} cannot run this input ({x.device}, {x.dtype}): {reason}; "
                         f"use model.backend={capable[0].name} (or auto)")
    return backend


def announce(backend: Backend, layer) -> None:
    if backend.name not in _logged:
        _logged.add(backend.name)
        log.info("bnrnn: the recurrence runs on the %s backend (model.backend=%s)", backend.name, layer.backend)


def announce_full_precision(backend: Backend, gemm_dtype: torch.dtype, dtype: torch.dtype) -> None:
    key = f"{backend.name} {gemm_dtype}"
    if key not in _logged:
        _logged.add(key)
        able = [b.name for b in registered().values() if gemm_dtype in b.gemm_dtypes]
        log.warning("bnrnn: the %s backend cannot run its GEMMs in %s: under autocast it computes in %s%s",
                    backend.name, str(gemm_dtype).removeprefix("torch."), str(dtype).removeprefix("torch."),
                    f" (model.backend={able[0]} or auto can)" if able else "")


def run(layer, x: torch.Tensor, state: State | None, t0: int, stats: Statistics,
        gemm_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, State]:
    """``layer``'s forward over ``x`` (T, B, I) with the norms' statistics ``stats``: output
    (T, B, H) and the final (h, c).

    Under ``torch.autocast`` the fused recurrences run with autocast off, in the parameters'
    dtype, and are handed autocast's dtype as ``gemm_dtype`` where their GEMMs take it (see
    the module's docstring): autocast itself would give their float32 buffers bf16 products.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = layer.weight_hh.dtype
        with torch.autocast(device, enabled=False):
            state = None if state is None else (state[0].to(dtype), state[1].to(dtype))
            return run(layer, x.to(dtype), state, t0, stats, torch.get_autocast_dtype(device))
    backend = select(layer.backend, x, norm_kind(layer), gemm_dtype)
    if not backend.ready():
        backend = registered()["aten"]
    announce(backend, layer)
    if gemm_dtype is not None and gemm_dtype not in backend.gemm_dtypes:
        announce_full_precision(backend, gemm_dtype, x.dtype)
        gemm_dtype = None
    h0, c0 = layer.initial_state(x.shape[1], stats) if state is None else state
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or h0.requires_grad or c0.requires_grad or any(p.requires_grad for p in layer.parameters())
    )
    population = stats is Statistics.POPULATION and any(norm.keeps_population for norm in layer.norms())
    if population and needs_grad:
        # Gradients through population statistics (analysis in eval mode): only the
        # reference covers them.
        return registered()["reference"].train(layer, x, h0, c0, t0, needs_grad, stats)
    if population or not layer.norms() and not needs_grad:
        # Population statistics, or no norm at all and no gradient (a plain LSTM's inference):
        # the inference path, which keeps nothing per step for a backward.
        return backend.infer(layer, x, h0, c0, t0, gemm_dtype)
    return backend.train(layer, x, h0, c0, t0, needs_grad, stats, gemm_dtype)


def population_affine(layer, t0: int, steps: int):
    """The population-statistics norms of steps t0.. as affine maps, for inference:
    (shift (T, 4H), x_scale, h_scale (T, 4H) or None, c_scale, c_shift (T, H) or None).

    BN_x(W_x x) = (W_x x) * s_x + m_x is W_x with its rows scaled (applied to the
    precomputed W_x x, the same product); its shift, BN_h's shift and b become one per-step
    bias ``shift``; BN_h's scale s_h is applied to W_h h in the fused multiply-add that adds
    the input term (T_max scaled copies of W_h would cost T_max times its memory for no
    fewer operations); BN_c stays one affine step."""
    shift = layer.bias.expand(steps, -1)  # the input term is W_x x * s_x + (m_x + b + m_h)
    x_scale = h_scale = c_scale = c_shift = None
    if layer.norm_x is not None:
        x_scale, x_shift = layer.norm_x.affine_at(t0, steps)
        shift = shift + x_shift
    if layer.norm_h is not None:
        h_scale, h_shift = layer.norm_h.affine_at(t0, steps)
        shift = shift + h_shift
    if layer.norm_c is not None:
        c_scale, c_shift = layer.norm_c.affine_at(t0, steps)
    return shift, x_scale, h_scale, c_scale, c_shift


def fold_into_population(layer, found: dict[str, torch.Tensor], t0: int, stats: Statistics, terms: str) -> None:
    """What ``stats`` does with a sequence's batch statistics as a fused recurrence returns
    them (``mean_<term>``, ``invstd_<term>``, each (T, F)), for each term of ``terms``
    ("xhc": BN_x, BN_h, BN_c) the layer normalises (:meth:`TimeBatchNorm.fold`)."""
    if stats is Statistics.POPULATION:
        return
    for term in terms:
        bn = getattr(layer, "norm_" + term)
        if bn is None:
            continue
        mean, invstd = found["mean_" + term].detach(), found["invstd_" + term].detach()
        var = invstd.pow(-2).sub_(bn.eps).clamp_(min=0.0)  # the biased batch variance
        bn.fold(t0, mean, var, stats)


def folded_input_term(layer, x: torch.Tensor, t0: int, project) -> tuple[torch.Tensor, tuple]:
    """The inference input term of every step, W_x x * s_x + shift (T, B, 4H), with W_x x
    from ``project(x, weight, None)`` (into a pooled buffer, which the term overwrites in one
    pass: no new (T, B, 4H) tensor, whose fresh pages would cost more than the pass), and
    the (h_scale, c_scale, c_shift) of :func:`population_affine` the loop applies."""
    shift, x_scale, h_scale, c_scale, c_shift = population_affine(layer, t0, x.shape[0])
    wx = project(x.contiguous(), layer.weight_ih, None)
    if x_scale is not None:
        xin = torch.addcmul(shift.unsqueeze(1), wx, x_scale.unsqueeze(1), out=wx)
    else:
        xin = wx.add_(shift.unsqueeze(1))
    return xin, (h_scale, c_scale, c_shift)
