"""The compiled CPU recurrence (``csrc/recurrence_cpu.cpp``): built on first use, cached.

The C++ source is compiled with the machine's C++ compiler through
:func:`torch.utils.cpp_extension.load` the first time a CPU fast path needs it (under a
minute, once per CPU kind, torch version, source and copy of bnrnn; later processes load
the cached build from ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). It registers the ops
``torch.ops.bnrnn_cpu.recurrence_forward``, ``recurrence_backward``, ``population_forward``
and ``activations`` (the float activations, for their tests).

Asking whether it can run (:func:`usable`) never builds it: the ``cpu`` backend of
:mod:`bnrnn.nn.backends` calls :func:`load` when it first runs. When it cannot be built (no
compiler, no ninja) the ``aten`` backend runs instead, which computes the same function, and
a warning says so once. ``model.backend=aten`` skips the build altogether.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import threading
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "recurrence_cpu.cpp"
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
EXTENSION_NAME = "bnrnn_cpu"
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_failure: str | None = None


def cpu_fingerprint() -> str | None:
    """A short hash of this CPU's instruction-set flags (Linux) and the torch version, or
    None where unknown.

    The build targets the CPU it runs on (``-march=native``: AVX2/AVX-512 for the loops), so
    its name carries this hash: a cache directory shared by different machines (a cluster's
    home directory) then holds one build per CPU kind instead of one that crashes elsewhere.
    The torch version is in it because torch.utils.cpp_extension would otherwise reuse a
    build made against another torch's headers.
    """
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1] for line in info if line.startswith(("flags", "Features"))), None)
    except OSError:
        return None
    if flags is None:
        return None
    key = platform.machine() + ":" + " ".join(sorted(flags.split())) + ":" + torch.__version__
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch runs its threads on OpenMP with GCC's runtime (Linux): the
    loops then split the batch in two parts that run on two of torch's threads at once
    (``BATCH_PARTS`` in the source). The extension links libgomp.so.1, the one torch
    loaded, so both share one pool of threads. Elsewhere the parts run one after the other
    (bit-identical results, slower)."""
    if platform.system() == "Linux" and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


# -fno-trapping-math: the activations' clamps and branch-free selects are float compares,
# which may raise the invalid flag on a NaN; under the default -ftrapping-math GCC (12) keeps
# them as branches and leaves every activation loop scalar. Nothing here reads the FP
# exception flags, and the flag allows no reassociation: the same values, computed 8 lanes
# at a time (docs/performance.md, "Measurements behind the code's thresholds").
# -fno-math-errno: sqrt without the errno branch, so the statistics' per-feature 1/sqrt in
# double vectorises too (nothing here reads errno; a negative argument still gives NaN).
MATH_FLAGS = ["-fno-trapping-math", "-fno-math-errno"]


def headers_flag() -> str:
    """A define carrying a hash of the headers the source includes: torch.utils.cpp_extension
    rebuilds when the sources or the flags change, and would not see an edited header."""
    digest = hashlib.sha1(b"".join(path.read_bytes() for path in HEADERS)).hexdigest()[:10]
    return f"-DHEADERS_DIGEST_{digest}"


def checkout_tag(source: Path = SOURCE) -> str:
    """A short hash of where the source lies, so that each copy of bnrnn (a second clone, a
    git worktree, another virtual environment) builds into a cache directory of its own.

    torch.utils.cpp_extension keys a build by its name alone, and its build file names the
    source by path: two copies using one name rebuilt the extension each time a process of
    the other copy had used it last (about 25 s at every switch)."""
    return hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:6]


def build_options() -> tuple[str, list[str]]:
    """(extension name, compiler flags) for this machine and this copy of the source."""
    fingerprint = cpu_fingerprint()
    if fingerprint is None:
        name, target = f"{EXTENSION_NAME}_generic_{torch.__version__.replace('.', '_').replace('+', '_')}", []
    else:
        name, target = f"{EXTENSION_NAME}_{fingerprint}", ["-march=native"]
    return f"{name}_{checkout_tag()}", ["-O3", *target, *MATH_FLAGS, headers_flag()]


def import_cpp_extension():
    """torch.utils.cpp_extension, without the warning it logs on import when a CUDA build of
    torch finds no CUDA toolkit (irrelevant here: the source is C++ only)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def load() -> bool:
    """Build (first time) and load the extension; True when its ops are registered."""
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            cpp_extension = import_cpp_extension()
            log.info("bnrnn: loading the compiled CPU recurrence (the first build takes under a minute)")
            name, flags = build_options()

            def build(openmp: list[str]) -> None:
                cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags + openmp,
                                   extra_ldflags=openmp, is_python_module=False, verbose=False)

            try:
                build(openmp_flags())
            except Exception:  # a compiler without OpenMP: the same loops, GEMMs after them
                if not openmp_flags():
                    raise
                log.info("bnrnn: building the compiled CPU recurrence without OpenMP")
                build([])
            _loaded = hasattr(torch.ops.bnrnn_cpu, "recurrence_forward")
            if not _loaded:
                _failure = "the built library registered no ops"
        except Exception as error:  # noqa: BLE001 - any build failure falls back to the ATen loop
            _loaded, _failure = False, f"{type(error).__name__}: {error}".strip()
        if not _loaded:
            warnings.warn(
                f"bnrnn: the compiled CPU recurrence is unavailable ({_failure.splitlines()[0]}); "
                "the aten backend runs instead (the same results, slower: docs/performance.md)",
                RuntimeWarning,
                stacklevel=2,
            )
        return _loaded


def own_gemm() -> bool:
    """Whether the compiled loops' float GEMMs run on the extension's own AVX-512 kernel
    (``csrc/small_gemm.h``; a build for a CPU with AVX-512, unless :func:`gemm_limit` says
    otherwise) rather than on torch's BLAS and oneDNN."""
    return load() and torch.ops.bnrnn_cpu.own_gemm()


GEMM_KINDS = ("own", "blas", "aten")  # best first


@contextlib.contextmanager
def gemm_limit(kind: str):
    """Within the block, the compiled loops use at best ``kind`` for their GEMMs: ``"blas"``
    (torch's BLAS and oneDNN instead of the own kernel, as on a CPU without AVX-512) or
    ``"aten"`` (ATen's mm for everything). For the tests and the bench's comparisons."""
    if not load():
        raise RuntimeError(f"the compiled CPU recurrence is unavailable: {failure()}")
    torch.ops.bnrnn_cpu.set_gemm_ceiling(GEMM_KINDS.index(kind))
    try:
        yield
    finally:
        torch.ops.bnrnn_cpu.set_gemm_ceiling(0)


def failure() -> str | None:
    """Why the extension did not load (None when it did or was not tried)."""
    return _failure


def usable(sequence: torch.Tensor) -> bool:
    """Whether the compiled loops can run a recurrence over ``sequence`` (its input x or input
    term, (T, B, .)): a CPU float32/float64 tensor, and the extension not known to be
    unbuildable. Builds nothing."""
    return sequence.device.type == "cpu" and sequence.dtype in (torch.float32, torch.float64) and _loaded is not False
