"""The ``triton`` backend: the recurrence as Triton kernels on a CUDA GPU. The cell's
arithmetic (:mod:`~bnrnn.kernels.triton.cell`), launched one step at a time
(:mod:`~bnrnn.kernels.triton.steps`) or as one whole-sequence kernel
(:mod:`~bnrnn.kernels.triton.sequence`), wrapped as an autograd Function with CUDA-graph
replay (:mod:`~bnrnn.kernels.triton.recurrence`), registered by
:mod:`~bnrnn.kernels.triton.backend`."""

from bnrnn.kernels.triton import backend  # noqa: F401 - registers the backend
