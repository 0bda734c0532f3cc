"""The BN-LSTM as a layer for other people's models, with ``torch.nn.LSTM``'s interface.

    from bnrnn import BNLSTM
    lstm = BNLSTM(input_size=32, hidden_size=128, num_layers=2, batch_first=True, max_steps=100)
    output, (h_n, c_n) = lstm(x)                      # x (B, T, 32): output (B, T, 128)
    output, (h_n, c_n) = lstm(x, lengths=lengths)     # padded batch, per-sequence lengths
    output, (h_n, c_n) = lstm(packed)                 # a PackedSequence in, one out

Every layer and direction is a :class:`bnrnn.nn.lstm.LSTMLayer`, on any of its backends. The
trainer's models are this class too (:func:`bnrnn.models.build_rnn`), with a learned initial
state and the noise on it. With ``norm_terms=()`` the layer computes ``nn.LSTM``'s function
(its two biases are one here: copy ``bias_ih + bias_hh``).

Parameter names: ``cells.{index}.*``, index = layer * D + direction (0 forward, 1 reverse),
the order of :attr:`BNLSTM.labels`. The reverse direction's time step t is the input's
T - 1 - t, so its population slot t holds the statistics of t steps from the end.

Variable lengths: at time step t the batch statistics are those of the sequences still
running (their count is the step's batch size), so padding never enters a mean, a
variance, a population-statistics update or a gradient; each sequence's ``h_n`` and
``c_n`` are taken at its own last step, and the reverse direction starts at each
sequence's own end. Such a batch runs one call of the cell per stretch of steps in which no
sequence ends (the running sequences a prefix of the batch sorted longest first, as in a
PackedSequence), each on the fastest backend; a batch whose sequences all have the full
length runs as one sequence.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from bnrnn.nn.lstm import LSTMLayer
from bnrnn.nn.norms import Statistics

State = tuple[torch.Tensor, torch.Tensor]


def layer_labels(num_layers: int, bidirectional: bool) -> list[str]:
    """The name of each layer and direction in :attr:`BNLSTM.cells`' order: "layer1",
    "layer1 reverse", "layer2", ... (1-based)."""
    directions = ("", " reverse") if bidirectional else ("",)
    return [f"layer{layer + 1}{direction}" for layer in range(num_layers) for direction in directions]


def norm_name(term: str, label: str | None) -> str:
    """How logs and figures name a norm: "h" in a single-cell layer (``label`` None),
    "h_layer2_reverse" for the norm of W_h h in the cell labelled "layer2 reverse"."""
    return term if label is None else f"{term}_{label.replace(' ', '_')}"


class BNLSTM(nn.Module):
    """A multi-layer LSTM with per-time-step normalisation of its terms (Cooijmans et al.).

    Args (as ``torch.nn.LSTM``'s):
        input_size, hidden_size, num_layers, bias, batch_first, bidirectional;
        dropout: on each layer's outputs but the last, in training.
    Normalisation:
        norm_terms: which terms are normalised: any of "x" (W_x x_t), "h" (W_h h_{t-1}) and
            "c" (the cell before its tanh); () gives the plain LSTM.
        norm: "batch" (the paper's), "layer" or "rms".
        max_steps: the number of per-step statistics slots, i.e. the training length; steps
            past it use the last slot's population statistics. Needed with batch norm.
        gamma_init: initial gain of every norm (the paper's 0.1).
        momentum: the EMA rate of the population statistics (the paper's 0.01 on MNIST,
            0.05 on PTB).
        eps: added to every variance.
        stats_min_sequences: the fewest sequences a step's batch statistics are taken over
            (1: every step's own). At a step where fewer run (the tail of a variable-length
            batch, or a batch smaller than this), the batch norms use their population
            statistics there, and fold nothing into them: the variance of 2 or 3 sequences
            is near 0, and batch norm's backward gain gamma / sqrt(var + eps) there blows
            gradients up (docs/results/sentences.md).
        backend: the cell's implementation ("auto": the fastest that can run the input).
    The paper's training set-up (nn.LSTM's defaults when left out):
        learn_initial_state: a learned (h_0, c_0) per cell when ``hx`` is None (else zeros).
        h0_noise: std of Gaussian noise on that h_0 wherever the norms use batch statistics.
        forget_bias: the forget gate's initial bias (1.0); init: "orthogonal" or
            "identity_g" (:class:`~bnrnn.nn.lstm.LSTMLayer`); cuda_graphs: on the triton
            backend, replay each training shape as CUDA graphs.

    Shapes (B batch, T steps, D directions, L layers): input (T, B, I), or (B, T, I) with
    ``batch_first``; hx (h_0, c_0), each (D * L, B, H); output (T, B, D * H) or (B, T, D * H);
    h_n and c_n (D * L, B, H).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 norm_terms: tuple[str, ...] = ("x", "h", "c"), norm: str = "batch", max_steps: int | None = None,
                 gamma_init: float = 0.1, momentum: float = 0.01, eps: float = 1e-5, backend: str = "auto",
                 stats_min_sequences: int = 1, learn_initial_state: bool = False, h0_noise: float = 0.0,
                 forget_bias: float = 1.0, init: str = "orthogonal", cuda_graphs: bool = True) -> None:
        super().__init__()
        unknown = set(norm_terms) - {"x", "h", "c"}
        if unknown:
            raise ValueError(f"norm_terms may hold 'x', 'h' and 'c', not {sorted(unknown)}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if stats_min_sequences < 1:
            raise ValueError(f"stats_min_sequences must be at least 1, got {stats_min_sequences}")
        if norm == "batch" and norm_terms and max_steps is None:
            raise ValueError("batch norm keeps statistics per time step: set max_steps, the training length "
                             "(e.g. max_steps=784 for sequential MNIST)")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.dropout, self.bidirectional = batch_first, dropout, bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.max_steps, self.stats_min_sequences = max_steps, stats_min_sequences
        options = dict(norm_x="x" in norm_terms, norm_h="h" in norm_terms, norm_c="c" in norm_terms, norm=norm,
                       gamma_init=gamma_init, momentum=momentum, eps=eps, backend=backend, bias=bias,
                       learn_initial_state=learn_initial_state, h0_noise=h0_noise, forget_bias=forget_bias,
                       init=init, cuda_graphs=cuda_graphs)
        self.cells = nn.ModuleList(
            LSTMLayer(input_size if layer == 0 else hidden_size * self.num_directions, hidden_size, max_steps or 1,
                      **options)
            for layer in range(num_layers) for _ in range(self.num_directions))

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}, "
                f"dropout={self.dropout}, bidirectional={self.bidirectional}")

    @property
    def output_size(self) -> int:
        """Features of each output step: D * H."""
        return self.hidden_size * self.num_directions

    @property
    def labels(self) -> list[str]:
        """One name per entry of :attr:`cells` (:func:`layer_labels`)."""
        return layer_labels(self.num_layers, self.bidirectional)

    @property
    def backend(self) -> str:
        """The backend every cell asks for (``"auto"``, ``"aten"``, ...)."""
        return self.cells[0].backend

    @backend.setter
    def backend(self, name: str) -> None:
        for cell in self.cells:
            cell.backend = name

    def forward(self, input: torch.Tensor | PackedSequence, hx: State | None = None,
                lengths: torch.Tensor | list[int] | None = None, stats: Statistics | None = None,
                t0: int = 0) -> tuple[torch.Tensor | PackedSequence, State]:
        """``output, (h_n, c_n)``, as ``nn.LSTM``. ``lengths`` (B,): each sequence's length in a
        padded batch (or give a PackedSequence). ``stats``: which statistics the norms use
        (None: the batch's in ``train()``, the population in ``eval()``). ``t0``: the time
        index of the input's first step, for a long sequence streamed in pieces with the
        state carried over (``hx`` the previous piece's ``(h_n, c_n)``); forward only."""
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, I) in the batch's own order
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        lengths = self.checked_lengths(lengths, x)
        if t0 and (self.bidirectional or lengths is not None):
            raise ValueError("t0 streams a sequence in pieces: not with a reverse direction or with lengths "
                             "(each piece would start at another place in each sequence)")

        def run(cell: LSTMLayer, seq: torch.Tensor, carried: State, reverse: bool) -> tuple[torch.Tensor, State]:
            if lengths is not None:
                return run_masked(cell, seq, carried, lengths, reverse, stats, self.stats_min_sequences)
            used = statistics_over(cell, stats, seq.shape[1], self.stats_min_sequences)
            out, final = cell(seq.flip(0) if reverse else seq, carried, t0, used)
            return (out.flip(0) if reverse else out), final

        output, (h_n, c_n) = self.through_cells(x, self.initial_states(hx, x, stats), run)
        if packed:
            return packed_like(output, input), (h_n, c_n)
        return (output.transpose(0, 1) if self.batch_first else output), (h_n, c_n)

    def through_cells(self, x: torch.Tensor, states: list[State], run) -> tuple[torch.Tensor, State]:
        """Every layer and direction over ``x`` (T, B, I), each by ``run(cell, x, (h, c),
        reverse)`` -> (outputs (T, B, H) in the input's time order, final (h, c)); each layer
        reads the one below, directions concatenated, with dropout between layers. Returns
        the last layer's outputs (T, B, D * H) and (h_n, c_n), each (D * L, B, H)."""
        inputs, finals = x, []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                out, final = run(self.cells[index], inputs, states[index], direction == 1)
                outputs.append(out)
                finals.append(final)
            inputs = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                inputs = nn.functional.dropout(inputs, self.dropout, training=True)
        return inputs, (torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals]))

    def forward_in_chunks(self, x: torch.Tensor, chunk: int, hx: State | None = None,
                          stats: Statistics | None = None) -> State:
        """:meth:`forward`'s ``(h_n, c_n)`` over ``x`` (in the layer's layout), holding the
        recurrences' buffers for ``chunk`` steps at a time. Every step's batch statistics
        depend only on that step's inputs and state, so in training mode this folds the same
        statistics into the population as one pass (the authors re-estimated with batches of
        5000 MNIST images, whose 784 steps at once take about 11 GB). With a reverse
        direction each layer's whole output (T, B, D * H) is kept for the next layer."""
        x = x.transpose(0, 1) if self.batch_first else x
        if not self.bidirectional:
            for t0 in range(0, x.shape[0], chunk):
                _, hx = self.run_time_major(x[t0:t0 + chunk], hx, stats, t0)
            return hx

        def in_chunks(cell: LSTMLayer, seq: torch.Tensor, carried: State, reverse: bool) -> tuple[torch.Tensor, State]:
            seq, pieces = (seq.flip(0) if reverse else seq), []
            used = statistics_over(cell, stats, seq.shape[1], self.stats_min_sequences)
            for t0 in range(0, seq.shape[0], chunk):
                out, carried = cell(seq[t0:t0 + chunk], carried, t0, used)
                pieces.append(out)
            out = torch.cat(pieces)
            return (out.flip(0) if reverse else out), carried

        return self.through_cells(x, self.initial_states(hx, x, stats), in_chunks)[1]

    def run_time_major(self, x: torch.Tensor, hx: State | None, stats: Statistics | None, t0: int):
        """:meth:`forward` on a time-major ``x`` (T, B, I) whatever ``batch_first`` says."""
        if not self.batch_first:
            return self(x, hx, stats=stats, t0=t0)
        out, state = self(x.transpose(0, 1), hx, stats=stats, t0=t0)
        return out.transpose(0, 1), state

    def final_hidden(self, state: State) -> torch.Tensor:
        """What a sequence classifier reads from ``(h_n, c_n)``: the last layer's final h of
        each direction, concatenated, (B, D * H)."""
        last = state[0][-self.num_directions:]
        return last[0] if self.num_directions == 1 else torch.cat(list(last), dim=1)

    def checked_lengths(self, lengths: torch.Tensor | list[int] | None, x: torch.Tensor) -> torch.Tensor | None:
        """``lengths`` as a CPU tensor (B,), or None where every sequence runs to the end (the
        whole-sequence path); ValueError for lengths that do not fit ``x`` (T, B, I)."""
        if lengths is None:
            return None
        steps, batch = x.shape[0], x.shape[1]
        lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
        if lengths.shape != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > steps:
            raise ValueError(f"lengths must hold one length per sequence, each in 1..{steps}; got {lengths.tolist()}")
        return None if bool((lengths == steps).all()) else lengths

    def initial_states(self, hx: State | None, x: torch.Tensor, stats: Statistics | None) -> list[State]:
        """One (h, c) per cell, each (B, H): from ``hx``, else each cell's initial state (zeros,
        or the learned one with its noise)."""
        count, batch = self.num_layers * self.num_directions, x.shape[1]
        if hx is None:
            return [cell.initial_state(batch, stats) for cell in self.cells]
        h0, c0 = hx
        expected = (count, batch, self.hidden_size)
        if tuple(h0.shape) != expected or tuple(c0.shape) != expected:
            raise ValueError(f"hx must be (h_0, c_0), each of shape {expected}; got {tuple(h0.shape)} and "
                             f"{tuple(c0.shape)}")
        return [(h0[i], c0[i]) for i in range(count)]


def statistics_over(cell: LSTMLayer, stats: Statistics | None, running: int, min_sequences: int) -> Statistics | None:
    """What ``cell``'s norms use at steps where ``running`` sequences run: ``stats`` (None:
    as the cell's mode says), except that batch statistics of fewer than ``min_sequences``
    sequences give way to the population's (:class:`BNLSTM`'s ``stats_min_sequences``)."""
    if running >= min_sequences or not Statistics.of(cell, stats).from_batch:
        return stats
    return Statistics.POPULATION


def run_masked(cell: LSTMLayer, x: torch.Tensor, state: State, lengths: torch.Tensor, reverse: bool,
               stats: Statistics | None, min_sequences: int = 1) -> tuple[torch.Tensor, State]:
    """``cell`` over a padded batch ``x`` (T, B, I) whose sequence b has ``lengths[b]`` steps:
    step t of the cell sees only the sequences still running (longest first), so its batch
    statistics, its population update and its gradient cover no padding; where fewer than
    ``min_sequences`` run, its norms use the population statistics (:func:`statistics_over`).
    ``reverse``: each sequence read from its own end. Returns outputs (T, B, H), zero at
    padding, and each sequence's (h, c) after its own last step, in the batch's order.

    The running set only changes where a sequence ends, so the steps between two such ends
    run as one call of the cell (time offset ``t0`` = the segment's first step) on the
    running prefix of the batch: as many calls as there are distinct lengths, each on the
    cell's fastest backend."""
    steps, batch = x.shape[0], x.shape[1]
    order = torch.argsort(-lengths, stable=True)  # longest first: the running ones are a prefix
    sorted_lengths = lengths[order]
    xs = x[:, order.to(x.device)]
    if reverse:
        xs = within_lengths_reversed(xs, sorted_lengths)
    h, c = state[0][order.to(x.device)], state[1][order.to(x.device)]
    ends = sorted({0, *(length for length in sorted_lengths.tolist() if length < steps), steps})
    outputs = []
    for start, end in zip(ends[:-1], ends[1:]):
        running = int((sorted_lengths > start).sum())  # the same at every step of [start, end)
        if running == 0:  # every sequence has ended: the rest of the batch is padding
            outputs.append(xs.new_zeros(steps - start, batch, cell.hidden_size))
            break
        used = statistics_over(cell, stats, running, min_sequences)
        out, (h_b, c_b) = cell(xs[start:end, :running], (h[:running], c[:running]), start, used)
        outputs.append(torch.cat([out, out.new_zeros(end - start, batch - running, out.shape[2])], dim=1))
        h, c = torch.cat([h_b, h[running:]]), torch.cat([c_b, c[running:]])  # the ended keep their last state
    out = torch.cat(outputs)
    if reverse:
        out = within_lengths_reversed(out, sorted_lengths)
    back = torch.argsort(order).to(x.device)
    return out[:, back], (h[back], c[back])


def within_lengths_reversed(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x`` (T, B, F) with each sequence's first ``lengths[b]`` steps in reverse order and its
    padding where it was."""
    steps = x.shape[0]
    t = torch.arange(steps).unsqueeze(1)  # (T, 1)
    index = torch.where(t < lengths, lengths - 1 - t, t).to(x.device)  # (T, B)
    return x.gather(0, index.unsqueeze(2).expand_as(x))


def packed_like(padded: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """``padded`` (T, B, F) packed as ``like`` is: its batch sizes and its order of the batch."""
    order = like.sorted_indices if like.sorted_indices is not None else torch.arange(padded.shape[1])
    order = order.to(padded.device)
    data = torch.cat([padded[t, order[:size]] for t, size in enumerate(like.batch_sizes.tolist())])
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
