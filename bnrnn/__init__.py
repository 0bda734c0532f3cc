"""bnrnn: reproduce and extend Recurrent Batch Normalization (Cooijmans et al., ICLR 2017)."""

__version__ = "0.1.0"
