"""The LSTM layer with optional recurrent batch normalisation (Cooijmans et al., eqs. 6-8).

    (i~, f~, g~, o~) = BN_t(W_h h_{t-1}; gamma_h) + BN_t(W_x x_t; gamma_x) + b
    c_t = sigmoid(f~) * c_{t-1} + sigmoid(i~) * tanh(g~)
    h_t = sigmoid(o~) * tanh(BN_t(c_t; gamma_c, beta_c))

Each of the three normalisations is a switch (``bn_x``, ``bn_h``, ``bn_c``): all off is a
vanilla LSTM, ``bn_x`` alone is Laurent et al.'s BN-input LSTM, all on is the paper's
BN-LSTM. The cell *update* is never normalised. The x and h terms carry no beta of their own:
the single bias ``b`` (forget part initialised to 1) plays that role.

Gate order along the 4H axis is (i, f, g, o), as in ``torch.nn.LSTM``, so weights can be
copied between the two (``b`` equals ``bias_ih + bias_hh``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bnrnn.nn import cpu_kernels, cpu_recurrence, triton_lstm, triton_sequence
from bnrnn.nn.cpu_recurrence import CompiledLSTMRecurrence
from bnrnn.nn.fused import (FusedLSTMRecurrence, InputProjection, Norms, population_recurrence, project_input,
                            recurrence_forward)
from bnrnn.nn.gpu_recurrence import TritonLSTMRecurrence
from bnrnn.nn.timebn import TimeBatchNorm

State = tuple[torch.Tensor, torch.Tensor]
INITS = ("orthogonal", "identity_g")


class BNLSTM(nn.Module):
    """Single-layer, time-major LSTM with switchable per-time-step batch normalisation.

    Args:
        input_size: I, features per time step.
        hidden_size: H.
        max_steps: T_max, the number of population-statistics slots (training length).
        bn_x, bn_h, bn_c: normalise W_x x_t, W_h h_{t-1}, c_t.
        gamma_init: initial gamma of every normalisation (paper: 0.1).
        momentum: EMA rate of the population statistics (paper: 0.01 MNIST, 0.05 PTB).
        eps: added to the variance (paper: 1e-5).
        forget_bias: initial forget-gate bias (1.0).
        h0_noise: std of Gaussian noise added to the learned h0 in training. The first
            ~70 pixels of every MNIST image are black, so without it every example has the
            same state, W_h h has zero batch variance and BN's backward gain gamma/sqrt(eps)
            compounds over those steps until the gradient overflows.
        fused: use the fast path (:mod:`bnrnn.nn.fused` on CPU, the Triton kernels of
            :mod:`bnrnn.nn.triton_lstm` on a CUDA GPU); False runs the readable
            step-by-step reference. Both compute the same function.
        gpu_kernels: on a CUDA GPU, the fast path runs on the Triton kernels; False keeps
            the ATen loop of :mod:`bnrnn.nn.fused` there too (for comparison).
        cpu_kernels: on the CPU, the fast path's time loops run in the
            compiled extension of :mod:`bnrnn.nn.cpu_kernels`; False keeps the ATen loop.
        init: ``"orthogonal"``: every (H, H) / (H, I) gate block of W_h and W_x orthogonal on
            its own. ``"identity_g"``: the authors' ``--init id``: the identity in the cell
            candidate's block of W_h, one orthogonal matrix over the other three blocks
            together (i, f, o; (3H, H) with orthonormal columns) and W_x orthogonal as one
            (4H, I) matrix.
        cuda_graphs: on the GPU fast path, replay each training sequence shape as captured
            CUDA graphs (:mod:`bnrnn.nn.gpu_recurrence`) instead of launching every step.

    Parameters:
        weight_ih (4H, I), weight_hh (4H, H), bias (4H,), h0 (H,), c0 (H,).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        bn_x: bool = True,
        bn_h: bool = True,
        bn_c: bool = True,
        gamma_init: float = 0.1,
        momentum: float | None = 0.01,
        eps: float = 1e-5,
        forget_bias: float = 1.0,
        h0_noise: float = 0.0,
        fused: bool = True,
        gpu_kernels: bool = True,
        cuda_graphs: bool = True,
        cpu_kernels: bool = True,
        init: str = "orthogonal",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.init = init
        self.fused = fused
        self.gpu_kernels = gpu_kernels
        self.cpu_kernels = cpu_kernels
        self.cuda_graphs = cuda_graphs
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.max_steps = max_steps
        self.forget_bias = forget_bias
        self.h0_noise = h0_noise
        # Evaluation that must see the statistics of training (batch-statistics validation,
        # re-estimating the population) draws the h0 noise too: see bnrnn.nn.population.
        self.h0_noise_in_eval = False
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias = nn.Parameter(torch.empty(gates))
        self.h0 = nn.Parameter(torch.zeros(hidden_size))
        self.c0 = nn.Parameter(torch.zeros(hidden_size))

        def norm(features: int, learn_bias: bool) -> TimeBatchNorm:
            return TimeBatchNorm(features, max_steps, gamma_init, learn_bias, momentum, eps)

        self.bn_x = norm(gates, False) if bn_x else None
        self.bn_h = norm(gates, False) if bn_h else None
        self.bn_c = norm(hidden_size, True) if bn_c else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights as ``init`` says, zero bias except the forget gate's, zero h0/c0."""
        H = self.hidden_size
        with torch.no_grad():
            if self.init == "identity_g":
                nn.init.orthogonal_(self.weight_ih)
                i, f, g, o = self.weight_hh.split(H, dim=0)
                others = torch.empty(3 * H, H)
                nn.init.orthogonal_(others)
                for block, values in zip((i, f, o), others.split(H, dim=0)):
                    block.copy_(values)
                g.copy_(torch.eye(H))
            else:
                for weight in (self.weight_ih, self.weight_hh):
                    for block in weight.split(H, dim=0):
                        nn.init.orthogonal_(block)
            self.bias.zero_()
            self.bias[H : 2 * H].fill_(self.forget_bias)
            self.h0.zero_()
            self.c0.zero_()
        for bn in self.norms():
            bn.reset_parameters()

    def norms(self) -> list[TimeBatchNorm]:
        return [bn for bn in (self.bn_x, self.bn_h, self.bn_c) if bn is not None]

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, max_steps={self.max_steps}"

    def initial_state(self, batch_size: int) -> State:
        """Learned (h0, c0) broadcast to the batch, each (B, H); h0 noisy in training."""
        h0 = self.h0.expand(batch_size, -1)
        c0 = self.c0.expand(batch_size, -1)
        if (self.training or self.h0_noise_in_eval) and self.h0_noise > 0:
            h0 = h0 + self.h0_noise * torch.randn_like(h0)
        return h0, c0

    def forward(self, x: torch.Tensor, state: State | None = None, t0: int = 0) -> tuple[torch.Tensor, State]:
        """Run the layer over a sequence.

        Args:
            x: (T, B, I) inputs, time-major.
            state: (h, c), each (B, H), or None for the learned initial state.
            t0: time index of x[0], for the per-step statistics when a long sequence is
                processed in consecutive chunks with the state carried over.
        Returns:
            output (T, B, H) of all hidden states, and the final (h_T, c_T).
        """
        if self.fused:
            return self.forward_fused(x, state, t0)
        return self.forward_reference(x, state, t0)

    def forward_in_chunks(self, x: torch.Tensor, chunk: int, state: State | None = None) -> State:
        """Run over ``x`` (T, B, I) in consecutive pieces of ``chunk`` steps, the state carried
        over, and return only the final (h_T, c_T).

        Every step's batch statistics depend only on that step's inputs and state, so in
        training mode this folds the same statistics into the population as one pass over
        the whole sequence, while holding (chunk, B, .) buffers instead of (T, B, .): the
        authors re-estimated with batches of 5000 MNIST images, whose 784 steps at once
        take about 11 GB.
        """
        for t0 in range(0, x.shape[0], chunk):
            _, state = self(x[t0:t0 + chunk], state, t0)
        if state is None:
            state = self.initial_state(x.shape[1])
        return state

    def forward_fused(self, x: torch.Tensor, state: State | None = None, t0: int = 0) -> tuple[torch.Tensor, State]:
        """The fast path: the recurrence as one autograd Function (batch statistics) or a
        folded no-grad loop (population statistics). Same arguments and results as forward."""
        if state is None:
            state = self.initial_state(x.shape[1])
        h0, c0 = state
        norms = self.norms()
        batch_stats = [bn.uses_batch_stats for bn in norms]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or h0.requires_grad or c0.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if any(batch_stats) and not all(batch_stats) or (not any(batch_stats) and norms and needs_grad):
            # Mixed statistics modes, or gradients through population statistics (rare:
            # analysis in eval mode): the reference path covers them.
            return self.forward_reference(x, state, t0)
        if norms and not any(batch_stats):
            return self.forward_folded(x, h0, c0, t0)

        if self.gpu_kernels and triton_lstm.available(x):
            return self.forward_triton(x, h0, c0, t0, needs_grad)
        if self.cpu_kernels and cpu_kernels.eligible(x, self.hidden_size):
            return self.forward_compiled(x, h0, c0, t0, needs_grad)

        # W_x x for all steps in one GEMM; b rides along unless it is BN_x's beta.
        wx = InputProjection.apply(x, self.weight_ih, self.bias if self.bn_x is None else None)

        (gamma_x, gamma_h, gamma_c), beta_c, eps = self.norm_tensors()
        beta_x = self.bias if self.bn_x is not None else None  # b is BN_x's beta
        if needs_grad:
            stats: dict[str, torch.Tensor] = {}
            hs, c_last = FusedLSTMRecurrence.apply(
                wx, self.weight_hh, gamma_x, beta_x, gamma_h, gamma_c, beta_c, h0, c0, eps, stats)
        else:
            with torch.no_grad():
                norms_ = Norms(gamma_x, beta_x, gamma_h, gamma_c, beta_c, eps)
                hs, cs, stats = recurrence_forward(wx, self.weight_hh, norms_, h0, c0, False)
            c_last = cs[-1]
        self.fold_into_population(stats, t0, ("x", self.bn_x), ("h", self.bn_h), ("c", self.bn_c))
        return hs, (hs[-1], c_last)

    def forward_compiled(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, t0: int,
                         needs_grad: bool) -> tuple[torch.Tensor, State]:
        """The CPU fast path on the compiled loops (:mod:`bnrnn.nn.cpu_recurrence`), batch
        statistics. Same arguments and results as forward."""
        (gamma_x, gamma_h, gamma_c), beta_c, eps = self.norm_tensors()
        if needs_grad:
            stats: dict[str, torch.Tensor] = {}
            hs, c_last = CompiledLSTMRecurrence.apply(x, self.weight_ih, self.bias, self.weight_hh, gamma_x, gamma_h,
                                                      gamma_c, beta_c, h0, c0, eps, stats)
        else:
            with torch.no_grad():
                hs, cs, stats = cpu_recurrence.run_forward(x, self.weight_ih, self.bias, self.weight_hh, gamma_x,
                                                           gamma_h, gamma_c, beta_c, eps, h0, c0)
            c_last = cs[-1]
        self.fold_into_population(stats, t0, ("x", self.bn_x), ("h", self.bn_h), ("c", self.bn_c))
        return hs, (hs[-1], c_last)

    def forward_triton(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, t0: int,
                       needs_grad: bool) -> tuple[torch.Tensor, State]:
        """The GPU fast path with batch statistics: the input term for all steps in
        autograd ops (BN_x's statistics are over (T, B, 4H) at once, with no recurrence), the
        recurrence on the Triton step kernels. Same arguments and results as forward."""
        wx = torch.matmul(x, self.weight_ih.t())
        xin = (wx if self.bn_x is None else self.bn_x.forward_sequence(wx, t0)) + self.bias
        (_, gamma_h, gamma_c), beta_c, (_, eps_h, eps_c) = self.norm_tensors()
        h0, c0 = h0.contiguous(), c0.contiguous()
        if needs_grad:
            stats: dict[str, torch.Tensor] = {}
            hs, c_last = TritonLSTMRecurrence.apply(xin, self.weight_hh, gamma_h, gamma_c, beta_c, h0, c0,
                                                    (eps_h, eps_c), stats, self.cuda_graphs)
        else:
            with torch.no_grad():
                params = triton_lstm.Parameters(self.weight_hh, gamma_h, gamma_c, beta_c, eps_h, eps_c)
                out = triton_lstm.run_sequence(xin.contiguous(), params, h0, c0)
            hs, c_last, stats = out.hs, out.cs[-1], out.statistics()
        self.fold_into_population(stats, t0, ("h", self.bn_h), ("c", self.bn_c))
        return hs, (hs[-1], c_last)

    def norm_tensors(self) -> tuple[tuple, torch.Tensor | None, tuple[float, float, float]]:
        """(gamma_x, gamma_h, gamma_c), beta_c, (eps_x, eps_h, eps_c) of the fast paths; None
        (eps 0) for a norm that is off."""
        norms = (self.bn_x, self.bn_h, self.bn_c)
        gammas = tuple(bn.weight if bn is not None else None for bn in norms)
        eps = tuple(bn.eps if bn is not None else 0.0 for bn in norms)
        return gammas, (self.bn_c.bias if self.bn_c is not None else None), eps

    @staticmethod
    def fold_into_population(stats: dict[str, torch.Tensor], t0: int, *terms: tuple[str, TimeBatchNorm | None]) -> None:
        """Fold a sequence's batch statistics (``mean_<term>``, ``invstd_<term>``, each
        (T, F)) into the population of each (term, norm) given (training mode only)."""
        for term, bn in terms:
            if bn is not None and bn.training:
                mean, invstd = stats["mean_" + term].detach(), stats["invstd_" + term].detach()
                var = invstd.pow(-2).sub_(bn.eps).clamp_(min=0.0)  # the biased batch variance
                bn.update_running_stats(t0, mean, var)

    def forward_folded(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, t0: int) -> tuple[torch.Tensor, State]:
        """Inference with population statistics, x (T, B, I).

        BN_x and BN_h are affine per step: BN_x(W_x x) = (W_x x) * s_x + m_x is W_x with its rows
        scaled (applied to the precomputed W_x x, which is the same product); its shift, BN_h's
        shift and b become one per-step bias; BN_h's scale s_h is applied to W_h h in the same
        fused multiply-add that adds the input term (T_max scaled copies of W_h would cost
        T_max times its memory for no fewer operations). BN_c stays one affine op per step.
        On the compiled CPU loop a narrow input (seqMNIST's one pixel) never forms W_x x: the
        loop takes x_t times W_x^T scaled per step.
        """
        steps = x.shape[0]
        with torch.no_grad():
            # the input term is W_x x * s_x + (m_x + b + m_h), per step
            shift = self.bias.expand(steps, -1)
            scale = h_scale = c_scale = c_shift = None
            if self.bn_x is not None:
                scale, x_shift = self.bn_x.affine_at(t0, steps)
                shift = shift + x_shift
            if self.bn_h is not None:
                h_scale, h_shift = self.bn_h.affine_at(t0, steps)
                shift = shift + h_shift
            if self.bn_c is not None:
                c_scale, c_shift = self.bn_c.affine_at(t0, steps)
            on_gpu = self.gpu_kernels and triton_lstm.available(x)
            compiled = not on_gpu and self.cpu_kernels and cpu_kernels.eligible(x, self.hidden_size)
            if compiled and x.shape[2] <= cpu_recurrence.NARROW_INPUT_MAX:
                coef = self.weight_ih.t().unsqueeze(0).expand(steps, -1, -1)  # (T, I, 4H)
                if scale is not None:
                    coef = coef * scale.unsqueeze(1)
                hs, c_last = cpu_recurrence.population_forward(x, self.weight_hh, h_scale, c_scale, c_shift, h0, c0,
                                                               x_coef=coef, x_shift=shift)
                return hs, (hs[-1], c_last)
            # W_x x into a pooled buffer, and the input term written over it in one pass: no new
            # (T, B, 4H) tensor (80 MB at seqMNIST, whose fresh pages cost more than the pass).
            wx = (cpu_recurrence.project_input if compiled else project_input)(x.contiguous(), self.weight_ih, None)
            if scale is not None:
                xin = torch.addcmul(shift.unsqueeze(1), wx, scale.unsqueeze(1), out=wx)
            else:
                xin = wx.add_(shift.unsqueeze(1))
            whole = triton_sequence.sequence_config(steps, xin.shape[1], self.hidden_size, xin.device) if on_gpu else None
            if whole is not None:  # one kernel launch for the sequence (GPU)
                hs, c_last = triton_sequence.run_inference(
                    xin.contiguous(), self.weight_hh, *(None if t is None else t.contiguous() for t in
                                                        (h_scale, c_scale, c_shift)),
                    h0.contiguous(), c0.contiguous(), whole)
            elif compiled:
                hs, c_last = cpu_recurrence.population_forward(xin, self.weight_hh, h_scale, c_scale, c_shift, h0, c0)
            else:
                hs, c_last = population_recurrence(xin, self.weight_hh, h_scale, c_scale, c_shift, h0, c0)
        return hs, (hs[-1], c_last)

    def forward_reference(
        self, x: torch.Tensor, state: State | None = None, t0: int = 0,
        step_hook: Callable[[int, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, State]:
        """The readable step-by-step implementation (the reference for faster paths).

        ``step_hook(t, h_t)``, if given, sees every hidden state (B, H) as a node of the
        graph, e.g. to ``retain_grad()`` it and read the total dL/dh_t (Fig. 1).
        """
        if state is None:
            state = self.initial_state(x.shape[1])
        h, c = state
        # The input projection (and its statistics) for all steps at once: one GEMM.
        wx = torch.matmul(x, self.weight_ih.t())
        if self.bn_x is not None:
            wx = self.bn_x.forward_sequence(wx, t0)
        wx = wx + self.bias
        outputs = []
        # unbind(0), not wx[t]: indexing a tensor that needs grad makes every step's backward
        # allocate a full (T, B, 4H) zero gradient.
        for step, wx_t in enumerate(wx.unbind(0)):
            wh = torch.mm(h, self.weight_hh.t())
            if self.bn_h is not None:
                wh = self.bn_h(wh, t0 + step)
            i, f, g, o = (wx_t + wh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            c_out = c if self.bn_c is None else self.bn_c(c, t0 + step)
            h = torch.sigmoid(o) * torch.tanh(c_out)
            if step_hook is not None:
                step_hook(t0 + step, h)
            outputs.append(h)
        return torch.stack(outputs), (h, c)
