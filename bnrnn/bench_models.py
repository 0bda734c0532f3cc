"""What ``bnrnn bench`` times: the shapes, the models (our layer's variants and
``torch.nn.LSTM``) and one training step."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from bnrnn.nn import LSTMLayer


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: T steps, input width I, hidden H, batch B; one-hot inputs for PTB."""

    name: str
    T: int
    I: int
    H: int
    B: int
    one_hot: bool = False

    def inputs(self, device: torch.device, seed: int = 0) -> torch.Tensor:
        """(T, B, I) float32: Gaussian pixels, or one-hot symbols."""
        g = torch.Generator().manual_seed(seed)
        if self.one_hot:
            symbols = torch.randint(self.I, (self.T, self.B), generator=g)
            return nn.functional.one_hot(symbols, self.I).float().to(device)
        return torch.randn(self.T, self.B, self.I, generator=g).to(device)


SHAPES = {
    "seqmnist": Shape("seqmnist", T=784, I=1, H=100, B=64),
    "ptb": Shape("ptb", T=100, I=50, H=1000, B=64, one_hot=True),
}

# name -> LSTMLayer keyword arguments; "nn.LSTM" is torch's (cuDNN on a GPU).
VANILLA = dict(norm_x=False, norm_h=False, norm_c=False)
BN_INPUT = dict(norm_x=True, norm_h=False, norm_c=False)
MODELS = {
    "nn.LSTM": None,
    "ours vanilla": VANILLA,
    "BN-input": BN_INPUT,
    "BN-LSTM": {},
    "BN-LSTM reference": dict(backend="reference"),
    "LN-LSTM": dict(norm="layer", gamma_init=1.0),  # layer norm (Ba et al.): the aten loop on every device
    "LN-LSTM reference": dict(norm="layer", gamma_init=1.0, backend="reference"),
}
# The rows the training table's ratio columns are relative to.
# On a GPU, also the triton backend's parts: its kernels launched step by step (no CUDA
# graphs), and the aten backend it replaces.
GPU_VARIANTS = {
    "ours vanilla, no graphs": dict(VANILLA, cuda_graphs=False),
    "BN-LSTM, no graphs": dict(cuda_graphs=False),
    "BN-LSTM, aten backend": dict(backend="aten"),
}
# On the CPU, the aten backend the cpu backend replaces.
CPU_VARIANTS = {
    "BN-LSTM, aten backend": dict(backend="aten"),
}
# Under torch.autocast(bf16): the GEMMs with bf16 operands (the statistics, the gates and the
# cell state float32), on every device.
LOW_PRECISION = {"BN-LSTM, bf16 GEMMs": dict(autocast=torch.bfloat16)}



def variants(device: torch.device) -> dict[str, dict]:
    """The extra rows timed (and checked) on this device."""
    return {**(GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS), **LOW_PRECISION}


class AutocastLayer(LSTMLayer):
    """An :class:`LSTMLayer` whose forward runs under ``torch.autocast(dtype=autocast_dtype)``
    (None: without): the bench's rows of GEMMs in bf16."""

    autocast_dtype: torch.dtype | None = None

    def forward(self, x, state=None, t0=0, stats=None):
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return super().forward(x, state, t0, stats)


def parse_shape(text: str) -> Shape:
    """A preset name, or ``T,I,H,B`` for a custom shape."""
    if text in SHAPES:
        return SHAPES[text]
    try:
        T, I, H, B = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape '{text}' is neither {' nor '.join(SHAPES)} nor T,I,H,B") from None
    return Shape(text, T, I, H, B)


def build(model: str, shape: Shape, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    options = {**MODELS, **variants(device)}[model]
    if options is None:
        return nn.LSTM(shape.I, shape.H).to(device)
    # h0_noise 0: the timed work is the same, and the numerics check needs determinism.
    options = dict(options)
    autocast = options.pop("autocast", None)
    layer = AutocastLayer(shape.I, shape.H, max_steps=shape.T, **options).to(device)
    layer.autocast_dtype = autocast
    return layer


def training_step(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, state=None) -> torch.Tensor:
    """Forward and backward of one batch (from ``state``, or the layer's initial state);
    returns the outputs (T, B, H)."""
    for p in layer.parameters():
        p.grad = None
    out, _ = layer(x, state)
    (out * weight).sum().backward()
    return out
