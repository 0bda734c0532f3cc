"""Build the recurrent layer from the model config."""

from __future__ import annotations

from omegaconf import DictConfig

from bnrnn.nn import BNLSTM
from bnrnn.nn.stack import StackedLSTM
from bnrnn.schema import layer_arguments


def build_rnn(model_cfg: DictConfig, input_size: int, train_length: int) -> BNLSTM | StackedLSTM:
    """The (BN-)LSTM: one layer, or a stack of ``model.num_layers`` (each two directions with
    ``model.bidirectional``); T_max defaults to the task's training sequence length. A single
    forward layer is a plain BNLSTM, so that its parameter names stay those of older runs."""
    options = layer_options(model_cfg)
    if model_cfg.num_layers == 1 and not model_cfg.bidirectional:
        return BNLSTM(input_size, model_cfg.hidden_size, model_cfg.t_max or train_length, **options)
    return StackedLSTM(input_size, model_cfg.hidden_size, model_cfg.t_max or train_length, model_cfg.num_layers,
                       model_cfg.bidirectional, **options)


def layer_options(model_cfg: DictConfig) -> dict:
    """The keyword arguments every :class:`BNLSTM` layer of the model shares: the keys the
    schema declares with a ``layer_arg``."""
    return layer_arguments(model_cfg)
