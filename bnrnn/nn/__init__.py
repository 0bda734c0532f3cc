"""Neural-network building blocks: the norms (per-time-step batch norm and others), the
(BN-)LSTM layer, task heads."""

from bnrnn.nn.heads import CharLanguageModel, SequenceClassifier
from bnrnn.nn.lstm import BNLSTM
from bnrnn.nn.norms import Norm, Statistics, TimeBatchNorm

__all__ = ["BNLSTM", "CharLanguageModel", "Norm", "SequenceClassifier", "Statistics", "TimeBatchNorm"]
