"""Kernel plug-ins: backends of :mod:`bnrnn.nn.backends` written outside PyTorch's ops.

Importing this package registers each one: ``cpu`` (C++ loops compiled on first use,
:mod:`bnrnn.kernels.cpu`) and ``triton`` (CUDA kernels, :mod:`bnrnn.kernels.triton`). Each
declares what it runs (batch norm; the device and dtypes in its ``cannot_run``) and says in
one sentence why it cannot run an input; the core backends (``aten``, ``reference``) run
everything else. A new kernel is one subpackage here with a :class:`~bnrnn.nn.backends.Backend`
registered in its ``__init__``, imported below.
"""

from bnrnn.kernels import cpu, triton  # noqa: F401 - registers their backends
