"""The ``cpu`` backend: the recurrence as compiled C++ loops (``csrc/``, built on first use by
:mod:`~bnrnn.kernels.cpu.extension`), wrapped as an autograd Function in
:mod:`~bnrnn.kernels.cpu.recurrence`, registered by :mod:`~bnrnn.kernels.cpu.backend`."""

from bnrnn.kernels.cpu import backend  # noqa: F401 - registers the backend
