"""Build the recurrent layer from the model config."""

from __future__ import annotations

from omegaconf import DictConfig

from bnrnn.nn import BNLSTM


def build_rnn(model_cfg: DictConfig, input_size: int, train_length: int) -> BNLSTM:
    """The (BN-)LSTM layer; T_max defaults to the task's training sequence length."""
    return BNLSTM(
        input_size=input_size,
        hidden_size=model_cfg.hidden_size,
        max_steps=model_cfg.t_max or train_length,
        bn_x=model_cfg.bn.x,
        bn_h=model_cfg.bn.h,
        bn_c=model_cfg.bn.c,
        gamma_init=model_cfg.gamma_init,
        momentum=model_cfg.momentum,
        eps=model_cfg.eps,
        forget_bias=model_cfg.forget_bias,
        h0_noise=model_cfg.h0_noise,
        backend=model_cfg.backend,
        norm=model_cfg.norm,
        cuda_graphs=model_cfg.cuda_graphs,
        init=model_cfg.init,
    )
