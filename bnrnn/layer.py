"""The BN-LSTM as a layer for other people's models, with ``torch.nn.LSTM``'s interface.

    from bnrnn import BNLSTM
    lstm = BNLSTM(input_size=32, hidden_size=128, num_layers=2, batch_first=True, max_steps=100)
    output, (h_n, c_n) = lstm(x)                      # x (B, T, 32): output (B, T, 128)
    output, (h_n, c_n) = lstm(x, lengths=lengths)     # padded batch, per-sequence lengths
    output, (h_n, c_n) = lstm(packed)                 # a PackedSequence in, one out

Every layer and direction is a :class:`bnrnn.nn.lstm.BNLSTM`, the cell the trainer's models
run, on any of its backends. With ``norm_terms=()`` the layer computes ``nn.LSTM``'s
function (its two biases are one here: copy ``bias_ih + bias_hh``).

Variable lengths: at time step t the batch statistics are those of the sequences still
running (their count is the step's batch size), so padding never enters a mean, a
variance, a population-statistics update or a gradient; each sequence's ``h_n`` and
``c_n`` are taken at its own last step, and the reverse direction starts at each
sequence's own end. Such a batch runs one time step per call of the cell (in
PackedSequence order: longest first); a batch whose sequences all have the full length
runs as one sequence, on the fastest backend.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from bnrnn.nn.lstm import BNLSTM as Cell
from bnrnn.nn.norms import Statistics

State = tuple[torch.Tensor, torch.Tensor]


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
        backend: the cell's implementation ("auto": the fastest that can run the input).

    Shapes (B batch, T steps, D directions, L layers): input (T, B, I), or (B, T, I) with
    ``batch_first``; hx (h_0, c_0), each (D * L, B, H), zeros when None; output
    (T, B, D * H) or (B, T, D * H); h_n and c_n (D * L, B, H).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 norm_terms: tuple[str, ...] = ("x", "h", "c"), norm: str = "batch", max_steps: int | None = None,
                 gamma_init: float = 0.1, momentum: float = 0.01, eps: float = 1e-5, backend: str = "auto") -> None:
        super().__init__()
        unknown = set(norm_terms) - {"x", "h", "c"}
        if unknown:
            raise ValueError(f"norm_terms may hold 'x', 'h' and 'c', not {sorted(unknown)}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm == "batch" and norm_terms and max_steps is None:
            raise ValueError("batch norm keeps statistics per time step: set max_steps, the training length "
                             "(e.g. max_steps=784 for sequential MNIST)")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.dropout, self.bidirectional = batch_first, dropout, bidirectional
        self.num_directions = 2 if bidirectional else 1
        options = dict(bn_x="x" in norm_terms, bn_h="h" in norm_terms, bn_c="c" in norm_terms, norm=norm,
                       gamma_init=gamma_init, momentum=momentum, eps=eps, backend=backend, bias=bias,
                       learn_initial_state=False)
        self.cells = nn.ModuleList(
            Cell(input_size if layer == 0 else hidden_size * self.num_directions, hidden_size, max_steps or 1,
                 **options)
            for layer in range(num_layers) for _ in range(self.num_directions))

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}, "
                f"dropout={self.dropout}, bidirectional={self.bidirectional}")

    def forward(self, input: torch.Tensor | PackedSequence, hx: State | None = None,
                lengths: torch.Tensor | list[int] | None = None,
                stats: Statistics | None = None) -> tuple[torch.Tensor | PackedSequence, State]:
        """``output, (h_n, c_n)``, as ``nn.LSTM``. ``lengths`` (B,): each sequence's length in a
        padded batch (or give a PackedSequence). ``stats``: which statistics the norms use
        (None: the batch's in ``train()``, the population in ``eval()``)."""
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, I) in the batch's own order
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        steps, batch = x.shape[0], x.shape[1]
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
            if lengths.shape != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > steps:
                raise ValueError(f"lengths must hold one length per sequence, each in 1..{steps}; got "
                                 f"{lengths.tolist()}")
            if bool((lengths == steps).all()):
                lengths = None  # every sequence runs to the end: the whole-sequence path
        states = self.initial_states(hx, x)
        inputs, finals = x, []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                cell = self.cells[layer * self.num_directions + direction]
                carried = states[layer * self.num_directions + direction]
                if lengths is None:
                    seq = inputs if direction == 0 else inputs.flip(0)
                    out, final = cell(seq, carried, 0, stats)
                    out = out if direction == 0 else out.flip(0)
                else:
                    out, final = run_masked(cell, inputs, carried, lengths, reverse=direction == 1, stats=stats)
                outputs.append(out)
                finals.append(final)
            inputs = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                inputs = nn.functional.dropout(inputs, self.dropout, training=True)
        h_n = torch.stack([h for h, _ in finals])
        c_n = torch.stack([c for _, c in finals])
        if packed:
            return packed_like(inputs, input), (h_n, c_n)
        return (inputs.transpose(0, 1) if self.batch_first else inputs), (h_n, c_n)

    def initial_states(self, hx: State | None, x: torch.Tensor) -> list[State]:
        """One (h, c) per cell, each (B, H): from ``hx`` or zeros."""
        count, batch, size = self.num_layers * self.num_directions, x.shape[1], (x.shape[1], self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(size)
            return [(zeros, zeros)] * count
        h0, c0 = hx
        expected = (count, batch, self.hidden_size)
        if tuple(h0.shape) != expected or tuple(c0.shape) != expected:
            raise ValueError(f"hx must be (h_0, c_0), each of shape {expected}; got {tuple(h0.shape)} and "
                             f"{tuple(c0.shape)}")
        return [(h0[i], c0[i]) for i in range(count)]


def run_masked(cell: Cell, x: torch.Tensor, state: State, lengths: torch.Tensor, reverse: bool,
               stats: Statistics | None) -> tuple[torch.Tensor, State]:
    """``cell`` over a padded batch ``x`` (T, B, I) whose sequence b has ``lengths[b]`` steps:
    step t of the cell sees only the sequences still running (longest first), so its batch
    statistics, its population update and its gradient cover no padding. ``reverse``: each
    sequence read from its own end. Returns outputs (T, B, H), zero at padding, and each
    sequence's (h, c) after its own last step, in the batch's order."""
    steps, batch = x.shape[0], x.shape[1]
    order = torch.argsort(-lengths, stable=True)  # longest first: the running ones are a prefix
    running = [int((lengths > t).sum()) for t in range(steps)]
    xs = x[:, order.to(x.device)]
    if reverse:
        xs = within_lengths_reversed(xs, lengths[order])
    h, c = state[0][order.to(x.device)], state[1][order.to(x.device)]
    outputs = []
    for t in range(steps):
        b = running[t]
        if b == 0:  # every sequence has ended: the rest of the batch is padding
            outputs.append(xs.new_zeros(batch, cell.hidden_size))
            continue
        out, (h_b, c_b) = cell(xs[t:t + 1, :b], (h[:b], c[:b]), t, stats)
        outputs.append(torch.cat([out[0], out.new_zeros(batch - b, out.shape[2])]))
        h, c = torch.cat([h_b, h[b:]]), torch.cat([c_b, c[b:]])  # the ended ones keep their last state
    out = torch.stack(outputs)
    if reverse:
        out = within_lengths_reversed(out, lengths[order])
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
