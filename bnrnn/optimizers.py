"""The optimiser a trainer config builds, and its settings applied again on a resume."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

log = logging.getLogger("bnrnn")


def build_optimizer(trainer: DictConfig, params) -> torch.optim.Optimizer:
    if trainer.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=trainer.lr, alpha=trainer.rmsprop_alpha, eps=trainer.rmsprop_eps, momentum=trainer.momentum,
            weight_decay=trainer.weight_decay,
        )
    if trainer.optimizer == "adam":
        return torch.optim.Adam(params, lr=trainer.lr, betas=tuple(trainer.betas), weight_decay=trainer.weight_decay)
    return torch.optim.SGD(params, lr=trainer.lr, momentum=trainer.momentum, weight_decay=trainer.weight_decay)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, trainer_cfg: DictConfig) -> None:
    """Set the config's lr, momentum, betas... on a restored optimiser.

    ``load_state_dict`` brings back the hyperparameters saved with the state; without this a
    resume with a new ``trainer.lr`` would go on at the old one while config.yaml says otherwise.
    """
    dummy = torch.zeros(1, requires_grad=True)
    settings = {k: v for k, v in build_optimizer(trainer_cfg, [dummy]).param_groups[0].items() if k != "params"}
    for group in optimizer.param_groups:
        group.update(settings)
        if isinstance(optimizer, torch.optim.RMSprop) and group["momentum"] > 0:
            # momentum switched on by the resume: RMSprop makes the buffer only for a fresh state
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
