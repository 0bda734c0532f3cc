"""Neural-network building blocks: per-time-step batch norm, the (BN-)LSTM layer, task heads."""

from bnrnn.nn.heads import CharLanguageModel, SequenceClassifier
from bnrnn.nn.lstm import BNLSTM
from bnrnn.nn.reference import TimeBatchNorm

__all__ = ["BNLSTM", "CharLanguageModel", "SequenceClassifier", "TimeBatchNorm"]
