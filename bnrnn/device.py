"""device=auto|cpu|cuda -> torch.device."""

from __future__ import annotations

import torch

from bnrnn.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for, but PyTorch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(name)
