"""Which implementation runs a BN-LSTM layer's recurrence: one ordered list, one switch.

``model.backend`` (``BNLSTM(backend=...)``) picks one of

=========== ================================================================ ==============
name        what runs                                                        where
=========== ================================================================ ==============
triton      Triton step kernels, replayed as CUDA graphs (``cuda_graphs``);  CUDA, float32
            inference as one whole-sequence kernel
cpu         the compiled C++ loops of ``csrc/`` (built on first use)         CPU
aten        the recurrence as one autograd Function of ATen ops               any device
reference   the paper's equations step by step (:mod:`bnrnn.nn.reference`)   any device
=========== ================================================================ ==============

``auto`` (the default) takes the first of triton, cpu, aten that can run the input. The
layer-normalised LSTM (``norm="layer"``) runs on aten under every name but ``reference``:
the compiled and Triton loops compute batch norm only. Any other norm of
:mod:`bnrnn.nn.norms` runs on the reference, which ``auto`` then takes, and which a named
fast backend refuses in one sentence. All
compute the same function (tests hold each to the reference). Asking whether a backend
can run (``available``) has no side effects; the compiled CPU loops are built the first
time the ``cpu`` backend runs, and if that fails the ``aten`` backend takes over, with a
warning. The backend that runs is logged once per process.

Each backend has two paths: training statistics (each step's batch statistics, folded
into the population) and inference with population statistics, where BN_x and BN_h are
per-step affine maps folded into the input term and a per-step scale of W_h h, so that
only BN_c stays a separate (one-op) affine step.
"""

from __future__ import annotations

import logging

import torch

from bnrnn.nn import cpu_extension, cpu_recurrence, triton_lstm, triton_sequence
from bnrnn.nn.cpu_recurrence import CompiledLSTMRecurrence
from bnrnn.nn.aten_recurrence import (FusedLSTMRecurrence, InputProjection, Norms, population_recurrence, project_input,
                            recurrence_forward)
from bnrnn.nn.gpu_recurrence import TritonLSTMRecurrence
from bnrnn.nn.norms import Statistics
from bnrnn.nn.reference import State, reference_forward

log = logging.getLogger("bnrnn")

NAMES = ("auto", "triton", "cpu", "aten", "reference")
AUTO_ORDER = ("triton", "cpu", "aten")
_logged: set[str] = set()


def available(name: str, x: torch.Tensor) -> bool:
    """Whether backend ``name`` can run a sequence ``x`` (T, B, I): no side effects."""
    if name == "triton":
        return triton_lstm.available(x)
    if name == "cpu":
        return cpu_extension.usable(x)
    return name in ("aten", "reference")


def select(requested: str, x: torch.Tensor) -> str:
    """The backend that runs ``x``: ``requested``, or for ``auto`` the first of AUTO_ORDER that can.

    ValueError with one sentence if a named backend cannot run this input.
    """
    if requested == "auto":
        return next(name for name in AUTO_ORDER if available(name, x))
    if requested not in NAMES:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(NAMES)}")
    if not available(requested, x):
        where = {"triton": "a CUDA GPU, float32 and the triton package",
                 "cpu": "a float CPU tensor and a compiled extension (see the warning above)"}[requested]
        raise ValueError(f"model.backend={requested} cannot run this input ({x.device}, {x.dtype}): it needs {where}")
    return requested


def announce(name: str, layer) -> None:
    if name not in _logged:
        _logged.add(name)
        log.info("bnrnn: the recurrence runs on the %s backend (model.backend=%s)", name, layer.backend)


FAST_NORMS = ("batch", "layer")  # the norms the fast backends compute (layer norm: aten only)


def run(layer, x: torch.Tensor, state: State | None, t0: int, stats: Statistics) -> tuple[torch.Tensor, State]:
    """``layer``'s forward over ``x`` (T, B, I) with the norms' statistics ``stats``: output
    (T, B, H) and the final (h, c).

    Under ``torch.autocast`` the fused recurrences (aten, cpu, triton) compute in the
    parameters' dtype, autocast off: their kernels and saved statistics are written for one
    dtype, and a bf16 GEMM inside them met float32 buffers. The reference follows autocast."""
    if torch.is_autocast_enabled(x.device.type) and layer.backend != "reference":
        dtype = layer.weight_hh.dtype
        with torch.autocast(x.device.type, enabled=False):
            state = None if state is None else (state[0].to(dtype), state[1].to(dtype))
            return run(layer, x.to(dtype), state, t0, stats)
    if layer.norms() and layer.norm not in FAST_NORMS:
        return other_norm_forward(layer, x, state, t0, stats)
    name = select(layer.backend, x)
    if layer.norm == "layer":
        return layer_norm_forward(name, layer, x, state, t0, stats)
    if name == "cpu" and not cpu_extension.load():  # the first run builds it; on failure, aten
        name = "aten"
    announce(name, layer)
    if state is None:
        state = layer.initial_state(x.shape[1], stats)
    h0, c0 = state
    norms = layer.norms()
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or h0.requires_grad or c0.requires_grad or any(p.requires_grad for p in layer.parameters())
    )
    population = stats is Statistics.POPULATION
    if name == "reference" or norms and population and needs_grad:
        # Gradients through population statistics (analysis in eval mode): only the
        # reference covers them.
        return reference_forward(layer, x, state, t0, stats=stats)
    if norms and population or not norms and not needs_grad:
        # Population statistics, or no norm at all and no gradient (a plain LSTM's inference):
        # the inference path, which keeps nothing per step for a backward.
        return population_forward(name, layer, x, h0, c0, t0)
    return TRAINING[name](layer, x, h0, c0, t0, needs_grad, stats)


def other_norm_forward(layer, x: torch.Tensor, state: State | None, t0: int,
                       stats: Statistics) -> tuple[torch.Tensor, State]:
    """A norm no fast backend computes (:data:`FAST_NORMS`): the reference runs it, under
    ``auto`` too; a named fast backend refuses."""
    if layer.backend not in ("auto", "reference"):
        raise ValueError(f"model.backend={layer.backend} cannot run model.norm={layer.norm}: the fast backends compute "
                         f"{' and '.join(FAST_NORMS)} norm; use model.backend=reference (or auto)")
    announce("reference", layer)
    return reference_forward(layer, x, state, t0, stats=stats)


def layer_norm_forward(name: str, layer, x: torch.Tensor, state: State | None, t0: int,
                       stats: Statistics) -> tuple[torch.Tensor, State]:
    """The layer-normalised LSTM: on the reference, or else on the aten loop (one autograd
    Function; the compiled and Triton loops do batch norm only). Layer norm has no batch
    statistics, so training and inference are one computation.

    LN_x(W_x x) needs no recurrence: it is one op over every step, here in autograd, and
    every bias (LN_x's, LN_h's, b) is added to it, since the terms are summed.
    """
    if name == "reference":
        announce(name, layer)
        return reference_forward(layer, x, state, t0, stats=stats)
    announce("aten", layer)
    h0, c0 = layer.initial_state(x.shape[1], stats) if state is None else state
    wx = InputProjection.apply(x, layer.weight_ih, None)
    bias = layer.bias if layer.bn_h is None else layer.bias + layer.bn_h.bias
    xin = (wx if layer.bn_x is None else layer.bn_x.forward_sequence(wx)) + bias
    (_, gamma_h, gamma_c), beta_c, eps = layer.norm_tensors()
    hs, c_last = FusedLSTMRecurrence.apply(xin, layer.weight_hh, None, None, gamma_h, gamma_c, beta_c, h0, c0, eps,
                                           {}, True)
    return hs, (hs[-1], c_last)


def aten_training(layer, x, h0, c0, t0: int, needs_grad: bool, mode: Statistics) -> tuple[torch.Tensor, State]:
    # W_x x for all steps in one GEMM; b rides along unless it is BN_x's beta.
    wx = InputProjection.apply(x, layer.weight_ih, layer.bias if layer.bn_x is None else None)
    (gamma_x, gamma_h, gamma_c), beta_c, eps = layer.norm_tensors()
    beta_x = layer.bias if layer.bn_x is not None else None  # b is BN_x's beta
    if needs_grad:
        stats: dict[str, torch.Tensor] = {}
        hs, c_last = FusedLSTMRecurrence.apply(
            wx, layer.weight_hh, gamma_x, beta_x, gamma_h, gamma_c, beta_c, h0, c0, eps, stats)
    else:
        with torch.no_grad():
            norms = Norms(gamma_x, beta_x, gamma_h, gamma_c, beta_c, eps)
            hs, cs, stats = recurrence_forward(wx, layer.weight_hh, norms, h0, c0, False)
        c_last = cs[-1]
    layer.fold_into_population(stats, t0, mode, ("x", layer.bn_x), ("h", layer.bn_h), ("c", layer.bn_c))
    return hs, (hs[-1], c_last)


def cpu_training(layer, x, h0, c0, t0: int, needs_grad: bool, mode: Statistics) -> tuple[torch.Tensor, State]:
    (gamma_x, gamma_h, gamma_c), beta_c, eps = layer.norm_tensors()
    if needs_grad:
        stats: dict[str, torch.Tensor] = {}
        hs, c_last = CompiledLSTMRecurrence.apply(x, layer.weight_ih, layer.bias, layer.weight_hh, gamma_x, gamma_h,
                                                  gamma_c, beta_c, h0, c0, eps, stats)
    else:
        with torch.no_grad():
            hs, cs, stats = cpu_recurrence.run_forward(x, layer.weight_ih, layer.bias, layer.weight_hh, gamma_x,
                                                       gamma_h, gamma_c, beta_c, eps, h0, c0)
        c_last = cs[-1]
    layer.fold_into_population(stats, t0, mode, ("x", layer.bn_x), ("h", layer.bn_h), ("c", layer.bn_c))
    return hs, (hs[-1], c_last)


def triton_training(layer, x, h0, c0, t0: int, needs_grad: bool, mode: Statistics) -> tuple[torch.Tensor, State]:
    """The input term for all steps in autograd ops (BN_x's statistics are over (T, B, 4H) at
    once, with no recurrence), the recurrence on the Triton step kernels."""
    wx = torch.matmul(x, layer.weight_ih.t())
    xin = (wx if layer.bn_x is None else layer.bn_x.forward_sequence(wx, t0, mode)) + layer.bias
    (_, gamma_h, gamma_c), beta_c, (_, eps_h, eps_c) = layer.norm_tensors()
    h0, c0 = h0.contiguous(), c0.contiguous()
    if needs_grad:
        stats: dict[str, torch.Tensor] = {}
        hs, c_last = TritonLSTMRecurrence.apply(xin, layer.weight_hh, gamma_h, gamma_c, beta_c, h0, c0,
                                                (eps_h, eps_c), stats, layer.cuda_graphs)
    else:
        with torch.no_grad():
            params = triton_lstm.Parameters(layer.weight_hh, gamma_h, gamma_c, beta_c, eps_h, eps_c)
            out = triton_lstm.run_sequence(xin.contiguous(), params, h0, c0)
        hs, c_last, stats = out.hs, out.cs[-1], out.statistics()
    layer.fold_into_population(stats, t0, mode, ("h", layer.bn_h), ("c", layer.bn_c))
    return hs, (hs[-1], c_last)


TRAINING = {"aten": aten_training, "cpu": cpu_training, "triton": triton_training}


def population_forward(name: str, layer, x, h0, c0, t0: int) -> tuple[torch.Tensor, State]:
    """Inference with population statistics on backend ``name``, x (T, B, I).

    BN_x(W_x x) = (W_x x) * s_x + m_x is W_x with its rows scaled (applied to the precomputed
    W_x x, the same product); its shift, BN_h's shift and b become one per-step bias; BN_h's
    scale s_h is applied to W_h h in the fused multiply-add that adds the input term (T_max
    scaled copies of W_h would cost T_max times its memory for no fewer operations). On the
    compiled CPU loop a narrow input (seqMNIST's one pixel) never forms W_x x: the loop takes
    x_t times W_x^T scaled per step.
    """
    steps = x.shape[0]
    with torch.no_grad():
        shift = layer.bias.expand(steps, -1)  # the input term is W_x x * s_x + (m_x + b + m_h)
        scale = h_scale = c_scale = c_shift = None
        if layer.bn_x is not None:
            scale, x_shift = layer.bn_x.affine_at(t0, steps)
            shift = shift + x_shift
        if layer.bn_h is not None:
            h_scale, h_shift = layer.bn_h.affine_at(t0, steps)
            shift = shift + h_shift
        if layer.bn_c is not None:
            c_scale, c_shift = layer.bn_c.affine_at(t0, steps)
        if name == "cpu" and x.shape[2] <= cpu_recurrence.NARROW_INPUT_MAX:
            coef = layer.weight_ih.t().unsqueeze(0).expand(steps, -1, -1)  # (T, I, 4H)
            if scale is not None:
                coef = coef * scale.unsqueeze(1)
            hs, c_last = cpu_recurrence.population_forward(x, layer.weight_hh, h_scale, c_scale, c_shift, h0, c0,
                                                           x_coef=coef, x_shift=shift)
            return hs, (hs[-1], c_last)
        # W_x x into a pooled buffer, and the input term written over it in one pass: no new
        # (T, B, 4H) tensor, whose fresh pages would cost more than the pass.
        wx = (cpu_recurrence.project_input if name == "cpu" else project_input)(x.contiguous(), layer.weight_ih, None)
        if scale is not None:
            xin = torch.addcmul(shift.unsqueeze(1), wx, scale.unsqueeze(1), out=wx)
        else:
            xin = wx.add_(shift.unsqueeze(1))
        whole = (triton_sequence.sequence_config(steps, xin.shape[1], layer.hidden_size, xin.device)
                 if name == "triton" else None)
        if whole is not None:  # one kernel launch for the sequence
            hs, c_last = triton_sequence.run_inference(
                xin.contiguous(), layer.weight_hh,
                *(None if t is None else t.contiguous() for t in (h_scale, c_scale, c_shift)),
                h0.contiguous(), c0.contiguous(), whole)
        elif name == "cpu":
            hs, c_last = cpu_recurrence.population_forward(xin, layer.weight_hh, h_scale, c_scale, c_shift, h0, c0)
        else:
            hs, c_last = population_recurrence(xin, layer.weight_hh, h_scale, c_scale, c_shift, h0, c0)
    return hs, (hs[-1], c_last)
