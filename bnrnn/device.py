"""device=auto|cpu|cuda -> torch.device; trainer.precision -> the autocast it runs under."""

from __future__ import annotations

import torch

from bnrnn.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for, but PyTorch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(name)


# trainer.precision -> autocast's dtype (None: full precision)
PRECISIONS = {"32": None, "bf16": torch.bfloat16}


def precision_context(device: torch.device, precision: str):
    """``torch.autocast`` as ``trainer.precision`` asks: "bf16" gives the recurrences' GEMMs
    bf16 operands, their statistics, gates and cell state staying float32
    (:mod:`bnrnn.nn.backends`), and the heads' GEMMs bf16 as autocast does; "32": off."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
