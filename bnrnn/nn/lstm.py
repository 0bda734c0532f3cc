"""The LSTM layer with optional recurrent batch normalisation: its parameters, its
initialisation and its initial state. What it computes is :mod:`bnrnn.nn.reference`
(Cooijmans et al., eqs. 6-8); which implementation computes it is :mod:`bnrnn.nn.backends`.

Each of the three normalisations is a switch (``norm_x``, ``norm_h``, ``norm_c``): all off is a
vanilla LSTM, ``norm_x`` alone is Laurent et al.'s BN-input LSTM, all on is the paper's
BN-LSTM. The cell *update* is never normalised. The x and h terms carry no beta of their own:
the single bias ``b`` (forget part initialised to 1) plays that role.

Gate order along the 4H axis is (i, f, g, o), as in ``torch.nn.LSTM``, so weights can be
copied between the two (``b`` equals ``bias_ih + bias_hh``).
"""

from __future__ import annotations

import torch
from torch import nn

from bnrnn.nn import backends
from bnrnn.nn.norms import NORMS, Norm, Statistics, make_norm
from bnrnn.nn.reference import State

INITS = ("orthogonal", "identity_g")


class LSTMLayer(nn.Module):
    """One layer and direction of the (BN-)LSTM, time-major, with switchable per-time-step
    normalisation: the cell that every backend runs and :class:`bnrnn.BNLSTM` stacks.

    Args:
        input_size: I, features per time step.
        hidden_size: H.
        max_steps: T_max, the number of population-statistics slots (training length).
        norm_x, norm_h, norm_c: normalise W_x x_t, W_h h_{t-1}, c_t.
        gamma_init: initial gamma of every normalisation (paper: 0.1).
        momentum: EMA rate of the population statistics (paper: 0.01 MNIST, 0.05 PTB).
        eps: added to the variance (paper: 1e-5).
        forget_bias: initial forget-gate bias (1.0).
        h0_noise: std of Gaussian noise added to the learned h0 in training. The first
            ~70 pixels of every MNIST image are black, so without it every example has the
            same state, W_h h has zero batch variance and BN's backward gain gamma/sqrt(eps)
            compounds over those steps until the gradient overflows.
        backend: which implementation runs the recurrence (:mod:`bnrnn.nn.backends`):
            ``"auto"`` (the fastest that can run the input), ``"triton"``, ``"cpu"``,
            ``"aten"`` or ``"reference"``. All compute the same function.
        bias: learn the gate bias (False: zeros, as nn.LSTM's ``bias=False``).
        learn_initial_state: learn h0 and c0 (False: zeros, as nn.LSTM's default state).
        init: ``"orthogonal"``: every (H, H) / (H, I) gate block of W_h and W_x orthogonal on
            its own. ``"identity_g"``: the authors' ``--init id``: the identity in the cell
            candidate's block of W_h, one orthogonal matrix over the other three blocks
            together (i, f, o; (3H, H) with orthonormal columns) and W_x orthogonal as one
            (4H, I) matrix.
        cuda_graphs: on the triton backend, replay each training sequence shape as captured
            CUDA graphs (:mod:`bnrnn.kernels.triton.recurrence`) instead of launching every step.

    Parameters:
        weight_ih (4H, I), weight_hh (4H, H), bias (4H,), h0 (H,), c0 (H,).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        norm_x: bool = True,
        norm_h: bool = True,
        norm_c: bool = True,
        gamma_init: float = 0.1,
        momentum: float | None = 0.01,
        eps: float = 1e-5,
        forget_bias: float = 1.0,
        h0_noise: float = 0.0,
        backend: str = "auto",
        norm: str = "batch",
        cuda_graphs: bool = True,
        init: str = "orthogonal",
        bias: bool = True,
        learn_initial_state: bool = True,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if backend not in backends.names():
            raise ValueError(f"backend must be one of {', '.join(backends.names())}, got {backend!r}")
        self.init = init
        self.backend = backend
        self.norm = norm
        self.cuda_graphs = cuda_graphs
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.max_steps = max_steps
        self.forget_bias = forget_bias
        self.h0_noise = h0_noise
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        # Without a bias (nn.LSTM's bias=False) or a learned initial state (nn.LSTM's zero
        # state), the same names hold zeros as buffers: one code path computes every variant.
        self.has_bias = bias
        if bias:
            self.bias = nn.Parameter(torch.empty(gates))
        else:
            self.register_buffer("bias", torch.zeros(gates))
        if learn_initial_state:
            self.h0 = nn.Parameter(torch.zeros(hidden_size))
            self.c0 = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.register_buffer("h0", torch.zeros(hidden_size))
            self.register_buffer("c0", torch.zeros(hidden_size))

        def make(features: int, learn_bias: bool) -> Norm:
            return make_norm(norm, features, max_steps, gamma_init, learn_bias, momentum, eps)

        self.norm_x = make(gates, False) if norm_x else None
        self.norm_h = make(gates, False) if norm_h else None
        self.norm_c = make(hidden_size, True) if norm_c else None
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
            if self.has_bias:
                self.bias[H : 2 * H].fill_(self.forget_bias)
            self.h0.zero_()
            self.c0.zero_()
        for bn in self.norms():
            bn.reset_parameters()

    def norms(self) -> list[Norm]:
        return [bn for bn in (self.norm_x, self.norm_h, self.norm_c) if bn is not None]

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, max_steps={self.max_steps}, backend={self.backend}"

    def initial_state(self, batch_size: int, stats: Statistics | None = None) -> State:
        """Learned (h0, c0) broadcast to the batch, each (B, H). h0 is noisy wherever the norms
        use batch statistics (``stats``; None: in training): the statistics are then those of
        the inputs the layer was trained on. (On MNIST this matters: without the noise every
        image has the same state over the leading black pixels, W_h h has no variance there,
        and statistics gathered so give the first varying pixels a gain gamma / sqrt(var + eps)
        that training never saw: docs/performance.md has the accuracies.)"""
        h0 = self.h0.expand(batch_size, -1)
        c0 = self.c0.expand(batch_size, -1)
        if Statistics.of(self, stats).from_batch and self.h0_noise > 0:
            h0 = h0 + self.h0_noise * torch.randn_like(h0)
        return h0, c0

    def forward(self, x: torch.Tensor, state: State | None = None, t0: int = 0,
                stats: Statistics | None = None) -> tuple[torch.Tensor, State]:
        """Run the layer over a sequence.

        Args:
            x: (T, B, I) inputs, time-major.
            state: (h, c), each (B, H), or None for the learned initial state.
            t0: time index of x[0], for the per-step statistics when a long sequence is
                processed in consecutive chunks with the state carried over.
            stats: the statistics the norms use (:class:`~bnrnn.nn.norms.Statistics`);
                None: batch statistics folded into the population in ``train()``, the
                population in ``eval()``.
        Returns:
            output (T, B, H) of all hidden states, and the final (h_T, c_T).
        """
        return backends.run(self, x, state, t0, Statistics.of(self, stats))

    def norm_tensors(self) -> tuple[tuple, torch.Tensor | None, tuple[float, float, float]]:
        """(gamma_x, gamma_h, gamma_c), beta_c, (eps_x, eps_h, eps_c) of the fast paths; None
        (eps 0) for a norm that is off."""
        norms = (self.norm_x, self.norm_h, self.norm_c)
        gammas = tuple(bn.weight if bn is not None else None for bn in norms)
        eps = tuple(bn.eps if bn is not None else 0.0 for bn in norms)
        return gammas, (self.norm_c.bias if self.norm_c is not None else None), eps
