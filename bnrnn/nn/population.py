"""Population statistics after training: re-estimation.

The EMA kept during training lags the weights; for their final numbers the authors
re-estimated the population statistics with the weights frozen, averaging minibatch
statistics over the training set (:attr:`bnrnn.nn.norms.Statistics.REESTIMATE`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bnrnn.nn.norms import Norm, Statistics


def time_norms(model: nn.Module) -> list[Norm]:
    """The model's norms that keep population statistics per time step."""
    return [m for m in model.modules() if isinstance(m, Norm) and m.keeps_population]


@torch.no_grad()
def reestimate_population_statistics(
    model: nn.Module, batches: Iterable[Any], run_batch: Callable[[nn.Module, Any, Statistics], Any]
) -> int:
    """Replace every population slot by the plain average of the batch statistics over
    ``batches``, weights frozen: each batch goes through ``run_batch(model, batch,
    Statistics.REESTIMATE)`` (the layers draw their training-time h0 noise, as with any batch
    statistics: seed the RNG around this for a repeatable estimate).

    Returns the number of batches used; the model comes back in evaluation mode.
    """
    norms = time_norms(model)
    if not norms:
        return 0
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
    count = 0
    for batch in batches:
        run_batch(model, batch, Statistics.REESTIMATE)
        count += 1
    if count == 0:
        raise ValueError("re-estimating population statistics needs at least one batch")
    return count
