"""Build the recurrent layer from the model config."""

from __future__ import annotations

from omegaconf import DictConfig

from bnrnn.layer import BNLSTM
from bnrnn.schema import layer_arguments


def build_rnn(model_cfg: DictConfig, input_size: int, train_length: int) -> BNLSTM:
    """The (BN-)LSTM of ``model.num_layers`` layers (each two directions with
    ``model.bidirectional``), time-major, with a learned initial state; T_max defaults to the
    task's training sequence length. Every other keyword comes from the schema's
    ``layer_arg`` keys (:func:`bnrnn.schema.layer_arguments`)."""
    return BNLSTM(input_size, model_cfg.hidden_size, model_cfg.num_layers, bidirectional=model_cfg.bidirectional,
                  max_steps=model_cfg.t_max or train_length, learn_initial_state=True, **layer_arguments(model_cfg))
