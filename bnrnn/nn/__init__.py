"""Neural-network building blocks: the norms (per-time-step batch norm and others), the
(BN-)LSTM layer, task heads."""

from bnrnn.nn.heads import CharLanguageModel, SequenceClassifier
from bnrnn.nn.lstm import LSTMLayer
from bnrnn.nn.norms import Norm, Statistics, TimeBatchNorm

__all__ = ["LSTMLayer", "CharLanguageModel", "Norm", "SequenceClassifier", "Statistics", "TimeBatchNorm"]
