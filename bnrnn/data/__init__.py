"""Data sets and batching: MNIST pixel sequences, Penn Treebank characters."""
