"""bnrnn: reproduce and extend Recurrent Batch Normalization (Cooijmans et al., ICLR 2017)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use: torch takes seconds to import, and the command line starts
    # with `import bnrnn` whatever it then does.
    if name == "BNLSTM":
        from bnrnn.layer import BNLSTM

        return BNLSTM
    raise AttributeError(f"module 'bnrnn' has no attribute {name!r}")
