"""Stacked and bidirectional (BN-)LSTM layers: ``model.num_layers``, ``model.bidirectional``.

Each layer and direction is a :class:`~bnrnn.nn.lstm.BNLSTM` of its own: its own weights,
gammas, learned initial state and per-time-step statistics, and its own fast path (the
backends see one layer at a time). Layer l > 0 reads layer l - 1's output, both directions
concatenated (T, B, D * H), D = 2 if bidirectional else 1.

The reverse direction reads the sequence from its end: its time step t is the input's step
T - 1 - t, so its population slot t holds the statistics of t steps from the end (T_max and
the last slot's reuse count from there too). It needs the whole sequence, so a state or
time offset carried in from a previous piece is refused (a language model, which streams
and predicts the next symbol, cannot be bidirectional: the config says so first).

Parameter names: ``layers.{index}.*`` with index = layer * D + direction (0 forward,
1 reverse), the order of :attr:`labels`. A single forward layer is a plain BNLSTM
(:func:`bnrnn.models.build_rnn`), so its checkpoints keep their names.
"""

from __future__ import annotations

import torch
from torch import nn

from bnrnn.nn.lstm import BNLSTM
from bnrnn.nn.norms import Statistics

States = list[tuple[torch.Tensor, torch.Tensor]]


def norm_name(term: str, label: str | None) -> str:
    """How logs and figures name a norm: "h" in a single layer (``label`` None), "h_layer2_reverse"
    for BN_h of a stack's entry labelled "layer2 reverse"."""
    return term if label is None else f"{term}_{label.replace(' ', '_')}"


def layer_labels(num_layers: int, bidirectional: bool) -> list[str]:
    """The name of each layer and direction in :attr:`StackedLSTM.layers`' order: "layer1",
    "layer1 reverse", "layer2", ... (1-based)."""
    directions = ("", " reverse") if bidirectional else ("",)
    return [f"layer{layer + 1}{direction}" for layer in range(num_layers) for direction in directions]


class StackedLSTM(nn.Module):
    """``num_layers`` layers of :class:`BNLSTM`, each one or two directions, time-major.

    Args:
        input_size: I; hidden_size: H per layer and direction; max_steps: T_max.
        num_layers: L >= 1; bidirectional: a reverse direction in every layer.
        **layer_options: every other :class:`BNLSTM` argument, the same for every layer.
    """

    def __init__(self, input_size: int, hidden_size: int, max_steps: int, num_layers: int = 1,
                 bidirectional: bool = False, **layer_options) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.input_size, self.hidden_size, self.max_steps = input_size, hidden_size, max_steps
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.layers = nn.ModuleList(
            BNLSTM(input_size if layer == 0 else hidden_size * self.num_directions, hidden_size, max_steps,
                   **layer_options)
            for layer in range(num_layers) for _ in range(self.num_directions))

    @property
    def output_size(self) -> int:
        """Features of each output step: H times the number of directions."""
        return self.hidden_size * self.num_directions

    @property
    def labels(self) -> list[str]:
        """One name per entry of :attr:`layers` (:func:`layer_labels`)."""
        return layer_labels(self.num_layers, self.bidirectional)

    @property
    def backend(self) -> str:
        return self.layers[0].backend

    @backend.setter
    def backend(self, name: str) -> None:
        for layer in self.layers:
            layer.backend = name

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, bidirectional={self.bidirectional}"

    def forward(self, x: torch.Tensor, state: States | None = None, t0: int = 0,
                stats: Statistics | None = None) -> tuple[torch.Tensor, States]:
        """Run every layer over ``x`` (T, B, I).

        Args:
            state: one (h, c) per entry of :attr:`layers` (each (B, H)), or None for the
                learned initial states; with a reverse direction only None.
            t0: the time index of x[0] (0 with a reverse direction).
            stats: the statistics of every norm (:class:`~bnrnn.nn.norms.Statistics`; None:
                the train() / eval() convention).
        Returns:
            the last layer's outputs (T, B, D * H) and the final (h, c) of every layer and
            direction (the reverse direction's after reading x[0]).
        """
        if self.bidirectional and (state is not None or t0 != 0):
            raise ValueError("a bidirectional layer reads the whole sequence: no carried-in state or time offset")
        return self.through_layers(x, state, lambda rnn, seq, carried: rnn(seq, carried, t0, stats))

    def through_layers(self, x: torch.Tensor, state: States | None, run) -> tuple[torch.Tensor, States]:
        """Every layer and direction over ``x`` (T, B, I), each by ``run(rnn, seq, carried)`` ->
        (outputs (T, B, H), final (h, c)): the reverse direction gets ``seq`` flipped in time
        and its outputs are flipped back; each layer reads the one below, directions
        concatenated. Returns the last layer's outputs and every final state."""
        states: States = []
        inputs = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                carried = None if state is None else state[index]
                if direction == 0:
                    out, final = run(self.layers[index], inputs, carried)
                else:  # the reverse direction's step t is the input's T - 1 - t
                    out, final = run(self.layers[index], inputs.flip(0), carried)
                    out = out.flip(0)
                outputs.append(out)
                states.append(final)
            inputs = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        return inputs, states

    def final_hidden(self, state: States) -> torch.Tensor:
        """What a sequence classifier reads: the last layer's final h of each direction,
        concatenated, (B, D * H)."""
        last = state[-self.num_directions:]
        return last[0][0] if len(last) == 1 else torch.cat([h for h, _ in last], dim=1)

    def forward_in_chunks(self, x: torch.Tensor, chunk: int, state: States | None = None,
                          stats: Statistics | None = None) -> States:
        """:meth:`forward`'s final states over ``x`` (T, B, I), holding (chunk, B, .) buffers
        of the recurrences at a time (see :meth:`BNLSTM.forward_in_chunks`); with a reverse
        direction each layer's whole output (T, B, D * H) is kept for the next layer."""
        if not self.bidirectional:
            for t0 in range(0, x.shape[0], chunk):
                _, state = self(x[t0:t0 + chunk], state, t0, stats)
            return state
        if state is not None:
            raise ValueError("a bidirectional layer reads the whole sequence: no carried-in state")

        def in_chunks(rnn: BNLSTM, seq: torch.Tensor, carried) -> tuple[torch.Tensor, tuple]:
            pieces = []
            for t0 in range(0, seq.shape[0], chunk):
                out, carried = rnn(seq[t0:t0 + chunk], carried, t0, stats)
                pieces.append(out)
            return torch.cat(pieces), carried

        return self.through_layers(x, None, in_chunks)[1]
